"""``orthogonalize``: bake the direction's ablation into the weights and save the model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..directions.rdo import cone_basis
from ..errors import UserError
from ..interventions.orthogonalize import export_orthogonalized
from .common import ModelOptions, direction_of, provenance


@dataclass
class OrthogonalizeCommand:
    direction: str = ""  # the direction run folder
    out: str = ""  # folder for the edited model
    model: ModelOptions = field(default_factory=ModelOptions)
    allow_other_model: bool = False
    cone: bool = False  # the whole cone of an RDO run (cone.safetensors), not its direction
    preserve_norms: bool = False  # each attention and MLP output matrix keeps its row norms (heretic's, exact)
    progress: bool = True


@dataclass
class OrthogonalizeOutcome:
    out: Path
    record: dict  # what the saved model records about its source

    def summary(self) -> dict:
        return {"out": str(self.out), **self.record}


def run_orthogonalize(cmd: OrthogonalizeCommand) -> OrthogonalizeOutcome:
    if not cmd.direction or not cmd.out:
        raise UserError("orthogonalize needs a direction run (--direction) and a folder (--out)")
    cm = cmd.model.load(progress=cmd.progress)
    direction, info = direction_of(cm, cmd.direction, cmd.allow_other_model)
    record = {"source_model": cmd.model.model, **provenance(info)}
    if cmd.cone:
        direction = cone_basis(Path(cmd.direction).expanduser())
        record["cone_dim"] = direction.shape[0]
    if cmd.preserve_norms:
        record["preserve_norms"] = True
    return OrthogonalizeOutcome(export_orthogonalized(cm, direction, cmd.out, record,
                                                      preserve_norms=cmd.preserve_norms), record)
