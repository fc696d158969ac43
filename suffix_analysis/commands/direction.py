"""``direction``: extract and select the refusal direction into a run folder."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..directions.run import DirectionConfig, run_direction, sample_prompts
from ..errors import UserError
from .common import ModelOptions


@dataclass
class DirectionCommand:
    """One direction run into ``out`` (rerunning skips finished stages)."""

    out: str = ""
    model: ModelOptions = field(default_factory=ModelOptions)
    config: DirectionConfig = field(default_factory=DirectionConfig)
    data_dir: str | None = None
    progress: bool = True


@dataclass
class DirectionOutcome:
    """The selected direction's record (``direction.json``) and the model's depth."""

    out: str
    info: dict
    n_layers: int

    def summary(self) -> dict:
        """The one-line JSON summary (``--json``; a sweep's result row)."""
        return self.info


def run_direction_command(cmd: DirectionCommand) -> DirectionOutcome:
    if not cmd.out:
        raise UserError("direction needs a run folder (--out)")
    cmd.config.validate()
    sample_prompts(cmd.config, cmd.data_dir)  # bad instruction sets fail before the model loads
    cm = cmd.model.load(progress=cmd.progress)
    info = run_direction(cm, cmd.out, cmd.config, cmd.data_dir, progress=cmd.progress)
    return DirectionOutcome(cmd.out, info, cm.n_layers)
