"""``reproduce``: every stage of the paper in order, cached and resumable, then the figures,
``summary.json`` and ``report.md``."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..config import setting
from ..errors import UserError
from ..reproduce import load_config, reproduce
from ..reproduce.config import PROFILE_ALIASES
from .common import ModelOptions, device_profile

log = logging.getLogger(__name__)

PROFILES = ("auto", "gpu", "cpu")


@dataclass
class ReproduceCommand:
    out: str = ""  # the run folder; empty: runs/MODEL
    model: ModelOptions = field(default_factory=ModelOptions)
    config: str = setting("", "TOML file of stage settings (see configs/reproduce.toml)")
    quick: bool = setting(False, "the profile for 2 CPU cores (same as profile cpu)")
    profile: str = setting("auto", "stage sizes: gpu (the paper's), cpu (minutes on 2 cores), or auto (gpu on a "
                                   "GPU, else cpu)")
    redo: str = setting("", "comma-separated stages to compute again, with every stage after them")
    figures: bool = setting(True, "draw the figures")
    data_dir: str | None = None
    progress: bool = True


@dataclass
class ReproduceOutcome:
    out: str
    record: dict  # summary.json
    times: dict  # stages.json

    def summary(self) -> dict:
        """The one-line JSON summary (``--json``; a sweep's result row)."""
        return self.record


def reproduce_profile(cmd: ReproduceCommand) -> str:
    """'cpu' on a CPU unless told otherwise (the paper's sizes take hours there)."""
    profile = PROFILE_ALIASES.get(cmd.profile, cmd.profile)
    if profile not in PROFILES:
        raise UserError(f"unknown profile '{cmd.profile}'; use {', '.join(PROFILES)}")
    if cmd.quick:
        return "cpu"
    return device_profile(profile, cmd.model)


def run_reproduce(cmd: ReproduceCommand) -> ReproduceOutcome:
    profile = reproduce_profile(cmd)
    if not cmd.quick and cmd.profile == "auto":
        log.info("profile %s (%s; --profile gpu|cpu to choose)", profile,
                 "a GPU: the paper's sizes" if profile == "gpu" else "no GPU: sized for 2 CPU cores")
    cfg = load_config(cmd.config or None, profile)
    m = cmd.model
    out = cmd.out or f"runs/{m.model.replace('/', '_')}"
    redo = [r.strip() for r in cmd.redo.split(",") if r.strip()]
    summary = reproduce(m.model, out, cfg, device=m.device, dtype=m.dtype, data_dir=cmd.data_dir,
                        progress=cmd.progress, redo=redo, figures=cmd.figures, placement=m.placement)
    times = json.loads((Path(out) / "stages.json").read_text())
    return ReproduceOutcome(out, summary, times)
