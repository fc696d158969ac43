"""What every command shares: the model it loads, the device profile, the direction and suffix
it reads, its judges and interventions."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..attacks.targets import default_target, load_targets
from ..config import for_profile, profile_defaults, setting
from ..directions.run import load_direction
from ..errors import UserError
from ..evaluation.compliance import ComplianceConfig
from ..evaluation.refusal import make_judges
from ..interventions.directional import ablate_direction, add_direction
from ..models.loading import ChatModel, load_model
from ..models.placement import Placement

log = logging.getLogger(__name__)

REFUSING_MODEL = "smollm2-135m-refusal"  # the default wherever a command studies refusal


@dataclass(frozen=True)
class ModelOptions:
    """Which model a command loads, and where."""

    model: str = setting(REFUSING_MODEL, "preset name, Hugging Face id, model folder or .gguf file")
    preset: str = setting("", "preset that supplies template and refusal tokens for a folder or HF id")
    device: str = setting("auto", "cpu, cuda, cuda:1... (auto: cuda if available)")
    dtype: str = setting("auto", "float32, bfloat16, float16 (auto: float32 on CPU)")
    trust_remote_code: bool = setting(False, "allow the model's own code (Qwen-1); off unless asked")
    placement: Placement = field(default_factory=Placement)

    def load(self, progress: bool = True) -> ChatModel:
        return load_model(self.model, preset=self.preset or None, device=self.device, dtype=self.dtype,
                          trust_remote_code=self.trust_remote_code, placement=self.placement, progress=progress)

    def on_gpu(self) -> bool:
        return (self.device == "auto" and torch.cuda.is_available()) or self.device.startswith("cuda")


@dataclass
class DirectionRunCommand:
    """A command that starts from a direction run and writes a run folder (``rdo``, ``edit``):
    ``settings`` are its config's fields by name, over the profile's defaults."""

    direction: str = ""
    out: str = ""
    model: ModelOptions = field(default_factory=ModelOptions)
    settings: dict = field(default_factory=dict)
    profile: str = "auto"  # 'gpu', 'cpu' or 'auto' (follows the device)
    data_dir: str | None = None
    progress: bool = True


@dataclass
class RecordOutcome:
    """A run folder and its record (what ``--json`` prints)."""

    out: str
    info: dict

    def summary(self) -> dict:
        return self.info


def device_profile(profile: str, model: ModelOptions) -> str:
    """'gpu' (the paper's sizes) or 'cpu' (sizes that finish in minutes on a laptop); 'auto' follows the device."""
    if profile in ("gpu", "cpu"):
        return profile
    if profile != "auto":
        raise UserError(f"unknown profile '{profile}'; use auto, gpu or cpu")
    return "gpu" if model.on_gpu() else "cpu"


def profiled_config(cls, profile: str, settings: dict, what: str):
    """``cls`` (a config dataclass) from ``settings`` by name over ``profile``'s defaults,
    validated; an unknown name is a one-line error naming ``what`` and its settings. Logs
    the sizes the profile picked."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise UserError(f"{what} has no setting '{unknown[0]}'; its settings: {', '.join(sorted(names))}")
    cfg = for_profile(cls, profile, **settings)
    cfg.validate()
    picked = [k for k in profile_defaults(cls, profile) if k not in settings]
    if picked:
        log.info("%s profile: %s (--profile gpu for the full sizes of the paper or tool)", profile.upper(),
                 ", ".join(f"{k}={getattr(cfg, k)}" for k in picked))
    return cfg


def direction_of(cm: ChatModel, run: str, allow_other_model: bool = False) -> tuple[torch.Tensor, dict]:
    """(vector ``[d_model]``, record) of a direction run, checked against ``cm``."""
    return load_direction(run, cm, allow_other_model=allow_other_model)


def provenance(info: dict) -> dict:
    """What outputs record about the direction they used."""
    return {"direction_run": info["run"], "direction_model": info["model"], "direction_other_model": info["other_model"],
            "position": info["position"], "layer": info["layer"]}


def suffix_record(spec: str | None) -> dict | None:
    """The attack record (suffix.json) of a suffix given as a run folder, else None."""
    p = Path(spec).expanduser() if spec else None
    if p is None or not p.is_dir():
        return None
    f = p / "suffix.json"
    if not f.is_file():
        raise UserError(f"{p} has no suffix.json; run `suffix-analysis attack ... --out {p}` first")
    try:
        record = json.loads(f.read_text(encoding="utf-8"))
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("suffix"), str):
        raise UserError(f"{f} is not an attack record with a suffix (truncated or edited?); run "
                        f"`suffix-analysis attack ... --out {p}` again")
    return record


def suffix_text(spec: str | None) -> str | None:
    """A suffix: an attack run folder (its suffix.json) or the suffix text itself."""
    record = suffix_record(spec)
    return record["suffix"] if record is not None else (spec or None)


def judges(spec: str, config: ComplianceConfig, device: str) -> tuple:
    """(refusal judge, compliance judge or None) of ``--judge`` (empty: the default) and the
    compliance settings; logs why the default compliance judge is off, if it is."""
    config.validate()
    judge, compliance, note = make_judges(spec or None, config, device)
    if note:
        log.warning(note)
    return judge, compliance


def eval_targets(targets: str, suffix: str, instructions: list[str]) -> list[str] | None:
    """Targets for the exact-match rate: a file, ``default`` ("Sure, here is ..."), or, for a
    suffix run made with the default targets, those targets for these instructions."""
    if targets == "default":
        return [default_target(i) for i in instructions]
    if targets:
        return load_targets(targets, len(instructions))
    rec = suffix_record(suffix)
    if rec and rec.get("targets") and rec["targets"] == [default_target(i) for i in rec.get("instructions", [])]:
        return [default_target(i) for i in instructions]
    return None


INTERVENTIONS = ("none", "ablate", "actadd", "suppress")


class Defended(contextlib.AbstractContextManager):
    """Hijacking suppression as an intervention's context; ``defence`` is what it runs."""

    def __init__(self, cm: ChatModel, defence):
        from ..defences.suppression import suppressing

        self.defence, self._ctx = defence, suppressing(cm, defence)

    def __enter__(self):
        return self._ctx.__enter__()

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)

    def completion_ce(self, cm: ChatModel, instructions: list[str], completions: list[str]) -> float:
        """CE of ``completions`` under the defence (called outside the block: it runs its own)."""
        from ..defences.suppression import completion_ce

        return completion_ce(cm, self.defence, instructions, completions)


def intervention(cm: ChatModel, kind: str, run: str, allow_other_model: bool = False,
                 coeff: float = 1.0, suppression=None, data_dir: str | None = None,
                 ) -> tuple[contextlib.AbstractContextManager, dict | None]:
    """The context manager that ablates (everywhere) or adds (at its layer, times ``coeff``) the
    direction of ``run``, or suppresses attention hijacking (the defence, calibrated on train
    prompts; its layers by the direction's), and the direction's record; ``kind`` 'none': no
    change, no record."""
    if kind == "none":
        return contextlib.nullcontext(), None
    direction, info = direction_of(cm, run, allow_other_model)
    if kind == "ablate":
        return ablate_direction(cm, direction), info
    if kind == "suppress":
        from ..defences.suppression import SuppressionConfig, build_defence

        return Defended(cm, build_defence(cm, suppression or SuppressionConfig(), info["layer"], data_dir)), info
    return add_direction(cm, direction, info["layer"], coeff), info


def positive(**values: int) -> None:
    """Refuse a count below 1 (the command line's own check, for configs built elsewhere)."""
    for name, v in values.items():
        if v < 1:
            raise UserError(f"{name} must be at least 1, got {v}")
