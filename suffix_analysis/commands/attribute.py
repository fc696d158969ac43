"""``attribute``: trace how a suffix suppresses the refusal direction (cosine, heads, attention
hijacking, suffix tokens, patching, knockout) into a run folder."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..attribution.run import AttributionConfig, run_attribution
from ..config import setting
from ..datasets import load_instructions
from ..errors import UserError
from ..evaluation.refusal import SubstringJudge
from ..models.loading import fingerprint_mismatch
from .common import ModelOptions, direction_of, suffix_record, suffix_text


@dataclass
class AttributeCommand:
    direction: str = ""  # the direction run folder
    suffix: str = setting("", "the adversarial suffix: an attack run folder or the text itself")
    out: str = ""  # run folder for the tables and summary.json
    model: ModelOptions = field(default_factory=ModelOptions)
    allow_other_model: bool = False  # a direction or suffix run made on other weights, on purpose
    instructions: str = setting("harmful:val+test", "harmful instructions the suffix is appended to")
    harmless: str = setting("harmless:val+test", "harmless instructions")
    data_dir: str | None = None
    config: AttributionConfig = field(default_factory=AttributionConfig)
    progress: bool = True


@dataclass
class AttributeOutcome:
    out: str
    record: dict  # summary.json

    def summary(self) -> dict:
        """The one-line JSON summary (``--json``; a sweep's result row)."""
        return self.record


def run_attribute(cmd: AttributeCommand) -> AttributeOutcome:
    if not cmd.direction or not cmd.suffix or not cmd.out:
        raise UserError("attribute needs a direction run (--direction), a suffix (--suffix) and a run folder (--out)")
    cmd.config.validate()
    harmful = [x.instruction for x in load_instructions(cmd.instructions, cmd.data_dir)]
    harmless = [x.instruction for x in load_instructions(cmd.harmless, cmd.data_dir)]
    suffix = suffix_text(cmd.suffix)
    record = suffix_record(cmd.suffix)
    cm = cmd.model.load(progress=cmd.progress)
    if record is not None and not cmd.allow_other_model:
        why = fingerprint_mismatch(record.get("fingerprint"), cm, f"suffix run {cmd.suffix}")
        if why:
            raise UserError(f"{why}; pass --allow-other-model to dissect it on this model anyway")
    direction, info = direction_of(cm, cmd.direction, cmd.allow_other_model)
    summary = run_attribution(cm, direction, info["layer"], info["position"], harmful, harmless, suffix, cmd.out,
                              config=cmd.config, judge=SubstringJudge(), progress=cmd.progress)
    return AttributeOutcome(cmd.out, summary)
