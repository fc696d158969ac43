"""``edit``: the Pareto edit, a per-layer weight profile for the orthogonalization searched
against refusals and KL (``edits/pareto.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..edits.pareto import ParetoConfig, run_pareto
from ..errors import UserError
from .common import DirectionRunCommand, RecordOutcome, device_profile, profiled_config


@dataclass
class EditCommand(DirectionRunCommand):
    """One Pareto search into ``out`` over the direction (or cone) of ``direction`` (rerunning
    resumes). ``settings``: ParetoConfig fields by name, over the profile's defaults."""


class EditOutcome(RecordOutcome):
    """The chosen edit's record (``edit.json``)."""


def edit_config(cmd: EditCommand) -> ParetoConfig:
    return profiled_config(ParetoConfig, device_profile(cmd.profile, cmd.model), cmd.settings, "edit")


def run_edit_command(cmd: EditCommand) -> EditOutcome:
    if not cmd.direction or not cmd.out:
        raise UserError("edit needs a direction run (--direction; a direction or RDO run) and a run folder (--out)")
    cfg = edit_config(cmd)  # bad settings fail before the model loads
    cm = cmd.model.load(progress=cmd.progress)
    return EditOutcome(cmd.out, run_pareto(cm, cmd.direction, cmd.out, cfg, cmd.data_dir, progress=cmd.progress))
