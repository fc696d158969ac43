"""``rdo``: learn a refusal direction by gradient from a direction run (``directions/rdo.py``)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

from ..config import for_profile, profile_defaults
from ..directions.rdo import RDOConfig, run_rdo
from ..errors import UserError
from .common import ModelOptions, device_profile

log = logging.getLogger(__name__)


@dataclass
class RDOCommand:
    """One RDO run into ``out`` from the direction run ``direction`` (rerunning resumes).
    ``settings``: RDOConfig fields by name, over the profile's defaults."""

    direction: str = ""
    out: str = ""
    model: ModelOptions = field(default_factory=ModelOptions)
    settings: dict = field(default_factory=dict)
    profile: str = "auto"  # 'gpu', 'cpu' or 'auto' (follows the device)
    data_dir: str | None = None
    progress: bool = True


@dataclass
class RDOOutcome:
    """The learned direction's record (``direction.json``)."""

    out: str
    info: dict

    def summary(self) -> dict:
        return self.info


def rdo_config(cmd: RDOCommand) -> RDOConfig:
    names = {f.name for f in dataclasses.fields(RDOConfig)}
    unknown = sorted(set(cmd.settings) - names)
    if unknown:
        raise UserError(f"rdo has no setting '{unknown[0]}'; its settings: {', '.join(sorted(names))}")
    profile = device_profile(cmd.profile, cmd.model)
    cfg = for_profile(RDOConfig, profile, **cmd.settings)
    cfg.validate()
    picked = [k for k in profile_defaults(RDOConfig, profile) if k not in cmd.settings]
    if picked:
        log.info("%s profile: %s (the paper's sizes: --profile gpu)", profile.upper(),
                 ", ".join(f"{k}={getattr(cfg, k)}" for k in picked))
    return cfg


def run_rdo_command(cmd: RDOCommand) -> RDOOutcome:
    if not cmd.direction or not cmd.out:
        raise UserError("rdo needs the direction run it starts from (--direction) and a run folder (--out)")
    cfg = rdo_config(cmd)  # bad settings fail before the model loads
    cm = cmd.model.load(progress=cmd.progress)
    return RDOOutcome(cmd.out, run_rdo(cm, cmd.direction, cmd.out, cfg, cmd.data_dir, progress=cmd.progress))
