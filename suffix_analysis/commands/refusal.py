"""``refusal``: generate greedily and score refusal (with a suffix, under an intervention)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..artifacts import ensure_dir, write_json_atomic
from ..config import setting
from ..datasets import load_instructions
from ..defences.suppression import SuppressionConfig
from ..errors import UserError
from ..evaluation.compliance import ComplianceConfig
from ..evaluation.refusal import RefusalReport, evaluate_refusal
from .common import INTERVENTIONS, ModelOptions, eval_targets, intervention, judges, positive, provenance, suffix_text


@dataclass
class RefusalCommand:
    """One refusal evaluation."""

    instructions: str = setting("", "a file (.json/.csv/.txt), a shipped set (harmful:val) or a dataset name")
    out: str = ""  # folder for completions.json and refusal.json; empty: nothing is saved
    model: ModelOptions = field(default_factory=ModelOptions)
    data_dir: str | None = None
    max_new_tokens: int = setting(64, "tokens generated per instruction")
    limit: int = setting(0, "use only the first K instructions (0: all)")
    batch_size: int = setting(16, "prompts per generation batch")
    suffix: str = setting("", "append this suffix (text, or an attack run folder) to every instruction")
    targets: str = setting("", "target strings for the exact-match rate: a file, or 'default'")
    judge: str = setting("", "refusal judge and compliance judge (empty: substring,compliance where available)")
    compliance: ComplianceConfig = field(default_factory=ComplianceConfig)
    direction: str = ""  # a direction run folder, for the intervention
    allow_other_model: bool = False
    intervention: str = setting("none", "none, ablate (everywhere), actadd (at the direction's layer) or suppress "
                                        "(hijacking suppression, the defence)")
    coeff: float = setting(1.0, "activation addition coefficient")
    suppression: SuppressionConfig = field(default_factory=SuppressionConfig)
    progress: bool = True


@dataclass
class RefusalOutcome:
    """What ``run_refusal`` measured."""

    report: RefusalReport
    record: dict  # refusal.json
    info: dict | None  # the direction's record, under an intervention
    refusal_tokens: object  # what the refusal score is the log-odds of (the preset's tokens)
    out: Path | None

    def summary(self) -> dict:
        """The one-line JSON summary (``--json``; a sweep's result row)."""
        return self.record


def run_refusal(cmd: RefusalCommand) -> RefusalOutcome:
    """Generate for every instruction (with the suffix, under the intervention), judge, save."""
    if not cmd.instructions:
        raise UserError("refusal needs instructions (--instructions)")
    positive(max_new_tokens=cmd.max_new_tokens, batch_size=cmd.batch_size)
    if cmd.limit < 0:
        raise UserError(f"limit must be at least 0 (0: all), got {cmd.limit}")
    if cmd.intervention not in INTERVENTIONS:
        raise UserError(f"unknown intervention '{cmd.intervention}'; use {', '.join(INTERVENTIONS)}")
    items = load_instructions(cmd.instructions, cmd.data_dir)
    if cmd.limit:
        items = items[: cmd.limit]
    if cmd.intervention != "none" and not cmd.direction:
        raise UserError(f"--intervention {cmd.intervention} needs --direction RUN")
    suffix = suffix_text(cmd.suffix)
    instructions = [x.instruction for x in items]
    targets = eval_targets(cmd.targets, cmd.suffix, instructions)
    if cmd.intervention == "suppress":
        cmd.suppression.validate()  # before the model loads
    cm = cmd.model.load(progress=cmd.progress)
    context, info = intervention(cm, cmd.intervention, cmd.direction, cmd.allow_other_model, cmd.coeff,
                                 cmd.suppression, cmd.data_dir)
    judge, compliance = judges(cmd.judge, cmd.compliance, cmd.model.device)
    out = ensure_dir(cmd.out) if cmd.out else None  # only once model, direction and judge are known to be good
    with context:
        report = evaluate_refusal(cm, instructions, judge=judge, max_new_tokens=cmd.max_new_tokens,
                                  batch_size=cmd.batch_size, progress=cmd.progress,
                                  suffixes=[suffix] * len(items) if suffix else None,
                                  compliance=compliance, targets=targets)
    record = {"model": cmd.model.model, "instructions": cmd.instructions, **report.summary(),
              "max_new_tokens": cmd.max_new_tokens, "intervention": cmd.intervention}
    if suffix:
        record["suffix"] = suffix
    if cmd.intervention == "actadd":
        record["coeff"] = cmd.coeff
    if cmd.intervention == "suppress":
        record["suppression"] = context.defence.to_dict()
    if info is not None:
        record.update(provenance(info))
    if out:
        write_json_atomic(out / "completions.json", report.rows())
        write_json_atomic(out / "refusal.json", record)
    tokens = cm.preset.refusal_tokens if cm.preset else "refusal tokens"
    return RefusalOutcome(report, record, info, tokens, out)
