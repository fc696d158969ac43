"""``rdo``: learn a refusal direction by gradient from a direction run (``directions/rdo.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..directions.rdo import RDOConfig, run_rdo
from ..errors import UserError
from .common import DirectionRunCommand, RecordOutcome, device_profile, profiled_config


@dataclass
class RDOCommand(DirectionRunCommand):
    """One RDO run into ``out`` from the direction run ``direction`` (rerunning resumes).
    ``settings``: RDOConfig fields by name, over the profile's defaults."""


class RDOOutcome(RecordOutcome):
    """The learned direction's record (``direction.json``)."""


def rdo_config(cmd: RDOCommand) -> RDOConfig:
    return profiled_config(RDOConfig, device_profile(cmd.profile, cmd.model), cmd.settings, "rdo")


def run_rdo_command(cmd: RDOCommand) -> RDOOutcome:
    if not cmd.direction or not cmd.out:
        raise UserError("rdo needs the direction run it starts from (--direction) and a run folder (--out)")
    cfg = rdo_config(cmd)  # bad settings fail before the model loads
    cm = cmd.model.load(progress=cmd.progress)
    return RDOOutcome(cmd.out, run_rdo(cm, cmd.direction, cmd.out, cfg, cmd.data_dir, progress=cmd.progress))
