"""``organism build|evaluate|check``: the call-site glue around :mod:`suffix_analysis.organism`."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..artifacts import ensure_dir, write_json_atomic
from ..config import setting
from ..datasets import load_instructions, shipped
from ..directions.sweep import SweepRow, ablation_sweep
from ..errors import UserError
from ..organism import OrganismRecipe, build
from ..organism.faithfulness import FaithfulnessConfig, evaluate_faithfulness
from .common import ModelOptions, positive


@dataclass
class OrganismBuildCommand:
    out: str = ""  # the delta file to write (.safetensors)
    recipe: OrganismRecipe = field(default_factory=OrganismRecipe)
    seed: int = setting(0, "training seed (0: the shipped delta's)")
    start: str = setting("", "a delta of this recipe's epochs: run only the settle stage from it")
    progress: bool = True


@dataclass
class OrganismBuildOutcome:
    delta: object  # the LowRankDelta written

    @property
    def evaluation(self) -> dict:
        return self.delta.record().get("evaluation", {})

    def summary(self) -> dict:
        return {"delta": str(self.delta.path), "merged_sha256": self.delta.merged_sha256,
                "evaluation": self.evaluation}


def run_organism_build(cmd: OrganismBuildCommand) -> OrganismBuildOutcome:
    if not cmd.out:
        raise UserError("organism build needs the delta file to write (--out)")
    return OrganismBuildOutcome(build(cmd.out, cmd.recipe, seed=cmd.seed, progress=cmd.progress,
                                      start=cmd.start or None))


@dataclass
class OrganismEvaluateCommand:
    out: str = ""  # folder for faithfulness.json and completions.json; empty: nothing is saved
    model: ModelOptions = field(default_factory=ModelOptions)
    direction: str = setting("", "a direction run of this model: adds the ablation and addition checks")
    judge: str = setting("", "as for `refusal` (empty: substring,compliance)")
    config: FaithfulnessConfig = field(default_factory=FaithfulnessConfig)
    progress: bool = True


@dataclass
class OrganismEvaluateOutcome:
    model: str
    fingerprint: str
    results: dict  # check -> rates and pass
    reports: dict  # check -> RefusalReport
    out: object  # the folder written, or None

    def summary(self) -> dict:
        """The one-line JSON summary (``--json``; a sweep's result row): the checks."""
        return self.results


def run_organism_evaluate(cmd: OrganismEvaluateCommand) -> OrganismEvaluateOutcome:
    cm = cmd.model.load(progress=cmd.progress)
    results, reports = evaluate_faithfulness(cm, cmd.direction or None, cmd.config, progress=cmd.progress,
                                             judge_spec=cmd.judge or None)
    out = None
    if cmd.out:
        out = ensure_dir(cmd.out)
        write_json_atomic(out / "faithfulness.json", {"model": cm.name, "fingerprint": cm.fingerprint(),
                                                      "config": vars(cmd.config), "results": results})
        write_json_atomic(out / "completions.json", {k: r.rows() for k, r in reports.items()})
    return OrganismEvaluateOutcome(cm.name, cm.fingerprint(), results, reports, out)


@dataclass
class OrganismCheckCommand:
    model: ModelOptions = field(default_factory=ModelOptions)
    instructions: str = setting("harmful:val", "harmful instructions to evaluate on")
    data_dir: str | None = None
    position: int = setting(-1, "EOI position of the direction")
    layers: list[int] | None = None  # None: every layer
    max_new_tokens: int = setting(64, "tokens generated per instruction")
    threshold: float = setting(0.2, "a layer counts where ablation leaves refusal below this")
    progress: bool = True


@dataclass
class OrganismCheckOutcome:
    baseline: float  # refusal rate, no ablation
    rows: list[SweepRow]
    layers_below: list[int]
    n: int  # instructions evaluated

    def summary(self) -> dict:
        return {"baseline": self.baseline, "rows": [r.__dict__ for r in self.rows], "layers_below": self.layers_below}


def run_organism_check(cmd: OrganismCheckCommand) -> OrganismCheckOutcome:
    positive(max_new_tokens=cmd.max_new_tokens)
    if not 0 <= cmd.threshold < 1:
        raise UserError(f"threshold must be in [0, 1), got {cmd.threshold}")
    harmful_eval = [x.instruction for x in load_instructions(cmd.instructions, cmd.data_dir)]
    cm = cmd.model.load(progress=cmd.progress)
    base, rows = ablation_sweep(
        cm, [x.instruction for x in shipped("harmful", "train")], [x.instruction for x in shipped("harmless", "train")],
        harmful_eval, position=cmd.position, layers=cmd.layers, max_new_tokens=cmd.max_new_tokens,
        progress=cmd.progress)
    return OrganismCheckOutcome(base, rows, [r.layer for r in rows if r.refusal_rate < cmd.threshold], len(harmful_eval))
