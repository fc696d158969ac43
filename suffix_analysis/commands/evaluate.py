"""``evaluate``: refusal and side effects under ablation, addition and orthogonalization."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..artifacts import ensure_dir, write_json_atomic
from ..config import setting
from ..datasets import load_file, load_instructions
from ..defences.suppression import SuppressionConfig
from ..errors import UserError
from ..evaluation.compliance import ComplianceConfig
from ..evaluation.report import evaluate_direction
from ..models.loading import load_model
from .common import Defended, ModelOptions, direction_of, judges, positive, provenance


@dataclass
class EvaluateCommand:
    direction: str = ""  # the direction run folder
    out: str = ""  # folder for evaluation.json; empty: nothing is saved
    model: ModelOptions = field(default_factory=ModelOptions)
    allow_other_model: bool = False
    harmful: str = setting("harmful:test", "held-out harmful instructions")
    harmless: str = setting("harmless:test", "held-out harmless instructions")
    limit: int = setting(100, "at most K instructions per set")
    corpus: str = setting("", "plain text file (one text per line) for cross-entropy")
    data_dir: str | None = None
    orthogonalized: str = setting("", "an exported orthogonalized model folder to evaluate too")
    coeff: float = setting(1.0, "activation addition coefficient")
    suppress: bool = setting(False, "also evaluate hijacking suppression (the defence; its cost on harmless prompts)")
    suppression: SuppressionConfig = field(default_factory=SuppressionConfig)
    max_new_tokens: int = setting(64, "tokens generated per instruction")
    batch_size: int = setting(32, "prompts per generation batch")
    judge: str = setting("", "as for `refusal` (empty: substring,compliance where available)")
    compliance: ComplianceConfig = field(default_factory=ComplianceConfig)
    progress: bool = True


@dataclass
class EvaluateOutcome:
    rows: list[dict]  # one per condition
    info: dict  # the direction's record
    n_harmful: int
    n_harmless: int
    judges: str  # the judges' names, e.g. substring+compliance

    def summary(self) -> list[dict]:
        """The one-line JSON summary (``--json``; a sweep's result row): the rows."""
        return self.rows


def run_evaluate(cmd: EvaluateCommand) -> EvaluateOutcome:
    if not cmd.direction:
        raise UserError("evaluate needs a direction run (--direction)")
    positive(limit=cmd.limit, max_new_tokens=cmd.max_new_tokens, batch_size=cmd.batch_size)
    harmful = [x.instruction for x in load_instructions(cmd.harmful, cmd.data_dir)][: cmd.limit]
    harmless = [x.instruction for x in load_instructions(cmd.harmless, cmd.data_dir)][: cmd.limit]
    corpus = [x.instruction for x in load_file(cmd.corpus)] if cmd.corpus else None
    cm = cmd.model.load(progress=cmd.progress)
    direction, info = direction_of(cm, cmd.direction, cmd.allow_other_model)
    m = cmd.model
    ortho = (load_model(cmd.orthogonalized, device=m.device, dtype=m.dtype, placement=m.placement)
             if cmd.orthogonalized else None)
    judge, compliance = judges(cmd.judge, cmd.compliance, m.device)
    extra = []
    if cmd.suppress:
        from ..defences.suppression import build_defence

        extra.append(("hijacking suppression", Defended(cm, build_defence(cm, cmd.suppression, info["layer"],
                                                                          cmd.data_dir))))
    out = ensure_dir(cmd.out) if cmd.out else None
    rows = evaluate_direction(cm, direction, info["layer"], harmful, harmless, coeff=cmd.coeff, corpus=corpus,
                              max_new_tokens=cmd.max_new_tokens, batch_size=cmd.batch_size,
                              orthogonalized=ortho, progress=cmd.progress, judge=judge, compliance=compliance,
                              extra=extra)
    if out:
        write_json_atomic(out / "evaluation.json", {"direction": info, **provenance(info), "harmful": cmd.harmful,
                                                    "harmless": cmd.harmless, "rows": rows})
    return EvaluateOutcome(rows, info, len(harmful), len(harmless), judge.name + ("+compliance" if compliance else ""))
