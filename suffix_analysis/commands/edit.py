"""``edit``: the Pareto edit, a per-layer weight profile for the orthogonalization searched
against refusals and KL (``edits/pareto.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..edits.pareto import ParetoConfig, run_pareto
from ..errors import UserError
from .common import ModelOptions, device_profile, profiled_config


@dataclass
class EditCommand:
    """One Pareto search into ``out`` over the direction (or cone) of ``direction`` (rerunning
    resumes). ``settings``: ParetoConfig fields by name, over the profile's defaults."""

    direction: str = ""
    out: str = ""
    model: ModelOptions = field(default_factory=ModelOptions)
    settings: dict = field(default_factory=dict)
    profile: str = "auto"  # 'gpu', 'cpu' or 'auto' (follows the device)
    data_dir: str | None = None
    progress: bool = True


@dataclass
class EditOutcome:
    """The chosen edit's record (``edit.json``)."""

    out: str
    info: dict

    def summary(self) -> dict:
        return self.info


def edit_config(cmd: EditCommand) -> ParetoConfig:
    return profiled_config(ParetoConfig, device_profile(cmd.profile, cmd.model), cmd.settings, "edit")


def run_edit_command(cmd: EditCommand) -> EditOutcome:
    if not cmd.direction or not cmd.out:
        raise UserError("edit needs a direction run (--direction; a direction or RDO run) and a run folder (--out)")
    cfg = edit_config(cmd)  # bad settings fail before the model loads
    cm = cmd.model.load(progress=cmd.progress)
    return EditOutcome(cmd.out, run_pareto(cm, cmd.direction, cmd.out, cfg, cmd.data_dir, progress=cmd.progress))
