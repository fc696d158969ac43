"""The stages of ``reproduce``, in order; each writes its tables into ``RUN/<stage>/``.

Every stage returns its headline numbers (they go into ``RUN/<stage>/stage.json`` and
``RUN/summary.json``). The tables a stage writes are all the figures read.

    organism     the refusal organism (only when the model is the organism preset)
    direction    extraction and selection                         direction/candidates.csv, direction.json
    evaluation   baseline, ablation, addition, orthogonalized      evaluation/evaluation.csv, completions_*.json
    attack       a universal GCG suffix and the random control    attack/suffix.json, losses.csv, random.json
    transfer     both suffixes on the held-out evaluation set     transfer/transfer.csv, completions_*.json
    attribution  how the suffix suppresses the direction          attribution/ (its own tables)
    defence      hijacking suppression against both suffixes      defence/defence.csv, defence.json, completions_*.json
"""

from __future__ import annotations

import dataclasses
import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from ..artifacts import write_json_atomic
from ..attacks.gcg import GCG
from ..attacks.gcg.config import SPEED_ONLY
from ..attacks.random_suffix import RandomConfig, RandomSuffix
from ..attacks.setup import attack_instructions, attack_targets, build_attack
from ..attacks.targets import default_target
from ..attribution.run import run_attribution
from ..datasets import load_file, load_instructions
from ..defences.suppression import build_defence, suppressing
from ..defences.suppression import completion_ce as defended_ce
from ..directions.run import load_direction, run_direction, sample_prompts
from ..errors import UserError
from ..evaluation.loss import completion_ce
from ..evaluation.refusal import evaluate_refusal, make_judges
from ..evaluation.report import evaluate_direction
from ..interventions.orthogonalize import export_orthogonalized
from ..metrics import first_token_kl
from ..models.loading import ChatModel, load_model
from ..models.placement import Placement
from ..runs import digest, read_json
from ..tables import write_table
from .config import ReproduceConfig

log = logging.getLogger(__name__)


@dataclass
class Context:
    """What every stage sees: the run folder, the settings, and the model (loaded once, lazily)."""

    out: Path
    config: ReproduceConfig
    model: str
    device: str = "auto"
    dtype: str = "auto"
    placement: Placement | None = None  # device map etc.; results do not depend on it, so no stage key does
    data_dir: str | None = None
    progress: bool = True
    cm: ChatModel | None = None
    keys: dict = field(default_factory=dict)  # stage name -> its key (settings and inputs)
    _judges: tuple | None = None
    _eval: dict | None = None
    _direction: tuple | None = None

    def model_(self) -> ChatModel:
        if self.cm is None:
            self.cm = load_model(self.model, device=self.device, dtype=self.dtype, placement=self.placement,
                                 progress=self.progress)
        return self.cm

    def judges(self) -> tuple:
        """(refusal judge, compliance judge or None), as ``refusal --judge`` makes them."""
        if self._judges is None:
            spec = self.config.run.judge or None
            judge, compliance, note = make_judges(spec, device=self.device)
            if note:
                log.warning(note)
            self._judges = (judge, compliance)
        return self._judges

    def direction(self) -> tuple[torch.Tensor, dict]:
        """The direction stage's vector and record (read once; the stage runs before any reader)."""
        if self._direction is None:
            self._direction = load_direction(self.out / "direction", self.model_())
        return self._direction

    def eval_sets(self) -> dict:
        """The evaluation sets, held out from everything: instructions a direction sample or
        the attack used are removed, then the first ``n_eval`` are kept."""
        if self._eval is None:
            cfg, run = self.config, self.config.run
            used = sample_prompts(cfg.direction, self.data_dir)
            attack = {x.instruction for x in load_instructions(cfg.attack.instructions, self.data_dir)
                      [: cfg.attack.n_prompts]}
            seen = set(used.harmful_train) | set(used.harmful_val) | set(used.harmless_train) | \
                set(used.harmless_val) | attack
            sets = {}
            for kind, spec in (("harmful", run.harmful_eval), ("harmless", run.harmless_eval)):
                items = [x.instruction for x in load_instructions(spec, self.data_dir)]
                kept = [i for i in items if i not in seen]
                if not kept:
                    raise UserError(f"[run] {kind}_eval '{spec}': every instruction is also used by the direction "
                                    "or the attack; evaluate on held-out instructions")
                if len(kept) < run.n_eval:
                    log.warning("%s evaluation set %s: %d held-out instructions, fewer than n_eval=%d", kind, spec,
                                len(kept), run.n_eval)
                sets[kind] = kept[: run.n_eval]
                sets[f"{kind}_removed"] = len(items) - len(kept)
            sets["hash"] = digest([sets["harmful"], sets["harmless"]])
            self._eval = sets
        return self._eval


# --- the stages ---------------------------------------------------------------------------------

def stage_organism(ctx: Context, folder: Path) -> dict:
    from ..models.materialize import ORGANISM_RECORD

    cm = ctx.model_()  # loading the preset merges the shipped delta on first use (seconds)
    record = json.loads((Path(cm.model.name_or_path) / ORGANISM_RECORD).read_text())
    record["fingerprint"] = cm.fingerprint()
    write_json_atomic(folder / "organism.json", record)
    ev = record.get("evaluation", {})
    return {"organism_refusal_harmful_val": ev.get("harmful_val", {}).get("refusal_rate"),
            "organism_false_refusal_harmless_val": ev.get("harmless_val", {}).get("false_refusal_rate")}


def stage_direction(ctx: Context, folder: Path) -> dict:
    info = run_direction(ctx.model_(), folder, ctx.config.direction, ctx.data_dir, progress=ctx.progress)
    return {k: info[k] for k in ("position", "layer", "bypass", "induce", "kl", "norm")}


def stage_evaluation(ctx: Context, folder: Path) -> dict:
    cfg = ctx.config
    cm = ctx.model_()
    direction, info = ctx.direction()
    sets = ctx.eval_sets()
    judge, compliance = ctx.judges()
    ortho = None
    if cfg.evaluation.orthogonalize:
        # in memory the export edits the weights in place: a fresh copy (a dispatched model is
        # exported from its checkpoint and stays as it is)
        src = cm if cm.dispatched else load_model(ctx.model, device=ctx.device, dtype=ctx.dtype)
        path = export_orthogonalized(src, direction, folder / "orthogonalized",
                                     {"source_model": ctx.model, "direction_run": str(ctx.out / "direction")})
        del src
        ortho = load_model(str(path), device=ctx.device, dtype=ctx.dtype, placement=ctx.placement)
    corpus = [x.instruction for x in load_file(cfg.evaluation.corpus)] if cfg.evaluation.corpus else None
    reports: dict = {}
    rows = evaluate_direction(cm, direction, info["layer"], sets["harmful"], sets["harmless"], reports=reports,
                              coeff=cfg.evaluation.coeff, corpus=corpus, max_new_tokens=cfg.run.max_new_tokens,
                              batch_size=cfg.run.batch_size, orthogonalized=ortho, progress=ctx.progress,
                              judge=judge, compliance=compliance, judge_harmless=cfg.run.judge_harmless)
    for r in rows:
        r["intervention"] = r["condition"].split(" ")[0]
        r.update(n_harmful=len(sets["harmful"]), n_harmless=len(sets["harmless"]))
    for name, (h, n) in reports.items():  # the completions behind every rate, to read
        kind = name.split(" ")[0]
        write_json_atomic(folder / f"completions_{kind}_harmful.json", h.rows())
        write_json_atomic(folder / f"completions_{kind}_harmless.json", n.rows())
    write_table(folder, "evaluation", pd.DataFrame(rows))
    by = {r["intervention"]: r for r in rows}
    out = {"refusal_baseline": by["baseline"]["harmful_refusal_rate"],
           "refusal_ablated": by["ablation"]["harmful_refusal_rate"],
           "refusal_orthogonalized": by["orthogonalized"]["harmful_refusal_rate"] if ortho else None,
           "induced_refusal_actadd": by["actadd"]["harmless_refusal_rate"],
           "false_refusal_baseline": by["baseline"]["harmless_refusal_rate"],
           "kl_ablated": by["ablation"]["kl_harmless"],
           "kl_orthogonalized": by["orthogonalized"]["kl_harmless"] if ortho else None}
    if compliance is not None:
        out.update(complied_baseline=by["baseline"]["harmful_complied_rate"],
                   complied_ablated=by["ablation"]["harmful_complied_rate"],
                   complied_orthogonalized=by["orthogonalized"]["harmful_complied_rate"] if ortho else None)
    return out


def _attack_inputs(ctx: Context) -> tuple[list[str], list[str]]:
    """The attack's instructions and targets, set up as the attack command does; 'ablated'
    targets are made once, by the attack stage, and later stages read them from its record."""
    a = ctx.config.attack
    instructions = attack_instructions(a, ctx.data_dir)
    done = ctx.out / "attack" / "suffix.json"
    if a.targets == "ablated" and done.is_file():
        return instructions, _attack_record(ctx, "suffix.json")["targets"]
    direction = ctx.direction()[0] if a.needs_direction else None
    cm = ctx.model_() if a.targets == "ablated" or a.targets.startswith("answers") else None
    return instructions, attack_targets(a, instructions, cm, direction, device=ctx.device, progress=ctx.progress)


def _gcg(ctx: Context) -> GCG:
    cfg = ctx.config.gcg
    if not set(cfg.terms) & set(GCG.direction_terms):
        return GCG(cfg)
    direction, info = ctx.direction()
    return build_attack(GCG, cfg, ctx.model_(), (direction, info["layer"]), ctx.data_dir)


def stage_attack(ctx: Context, folder: Path) -> dict:
    cm = ctx.model_()
    cfg = ctx.config.gcg
    instructions, targets = _attack_inputs(ctx)
    gcg = _gcg(ctx)
    resume = (folder / "checkpoint.json").is_file()
    if resume:
        log.info("attack: resuming from %s", folder / "checkpoint.json")
    # GCG's bar follows its logger, as in the attack command: -q hides it here too
    logging.getLogger("suffix_analysis.attacks").setLevel(logging.INFO if ctx.progress else logging.WARNING)
    result = gcg.run(cm, instructions, targets, out=folder, resume=resume)
    control = RandomSuffix(RandomConfig(suffix_len=cfg.suffix_len, seed=ctx.config.attack.random_seed)).run(
        cm, instructions, targets)
    control_loss = gcg.loss_of(cm, instructions, targets, control.suffix_ids)
    base = {"model": ctx.model, "fingerprint": cm.fingerprint(), "instructions": instructions, "targets": targets}
    write_json_atomic(folder / "suffix.json", {**result.to_dict(), **base, "config": dataclasses.asdict(cfg)})
    write_json_atomic(folder / "random.json", {**control.to_dict(), **base, "loss": control_loss})
    write_table(folder, "losses", pd.DataFrame({"step": range(1, len(result.losses) + 1), "loss": result.losses,
                                                "seconds": result.step_seconds, "suffix": result.suffixes,
                                                "kind": "gcg"}))
    return {"suffix": result.suffix, "random_suffix": control.suffix, "attack_success": result.success,
            "attack_steps": len(result.losses), "attack_loss_final": result.losses[-1] if result.losses else None,
            "attack_loss_random": control_loss, "attack_prompts_used": result.extra.get("prompts_used")}


def _attack_record(ctx: Context, name: str) -> dict:
    """``RUN/attack/NAME``, or one line saying how to make it again."""
    again = f"make it again with `suffix-analysis reproduce --out {ctx.out} --redo attack`"
    rec = read_json(ctx.out / "attack" / name, again)
    if not isinstance(rec, dict) or not isinstance(rec.get("suffix"), str):
        raise UserError(f"{ctx.out / 'attack' / name} is not an attack record (edited?); {again}")
    return rec


def _suffixes(ctx: Context) -> dict[str, str]:
    return {"adversarial": _attack_record(ctx, "suffix.json")["suffix"],
            "random": _attack_record(ctx, "random.json")["suffix"]}


def stage_transfer(ctx: Context, folder: Path) -> dict:
    cm = ctx.model_()
    judge, compliance = ctx.judges()
    sets = ctx.eval_sets()
    train, train_targets = _attack_inputs(ctx)
    # exact-match success where the targets are known: the default ones can be made for any instruction
    default = ctx.config.attack.targets == "default"
    held_targets = [default_target(i) for i in sets["harmful"]] if default else None
    rows, out = [], {}
    for kind, suffix in _suffixes(ctx).items():
        for split, instructions, targets in (("train", train, train_targets),
                                             ("held-out", sets["harmful"], held_targets)):
            rep = evaluate_refusal(cm, instructions, judge=judge, suffixes=[suffix] * len(instructions),
                                   max_new_tokens=ctx.config.run.max_new_tokens, batch_size=ctx.config.run.batch_size,
                                   progress=ctx.progress, compliance=compliance, targets=targets)
            rows.append({"suffix": kind, "set": split, "n": rep.n, "refused_rate": rep.refusal_rate,
                         "complied_rate": rep.complied_rate, "derailed_rate": rep.derailed_rate,
                         "refusal_score": rep.refusal_score, "target_match_rate": rep.target_match_rate})
            write_json_atomic(folder / f"completions_{kind}_{split}.json", rep.rows())
            if split == "held-out":
                out[f"refusal_{kind}_suffix"] = rep.refusal_rate
                out[f"complied_{kind}_suffix"] = rep.complied_rate
                out[f"derailed_{kind}_suffix"] = rep.derailed_rate
    write_table(folder, "transfer", pd.DataFrame(rows))
    return out


def stage_attribution(ctx: Context, folder: Path) -> dict:
    cfg = ctx.config
    cm = ctx.model_()
    direction, info = ctx.direction()
    sets = ctx.eval_sets()
    judge, _ = ctx.judges()
    n = cfg.attribution_config.n_prompts or len(sets["harmful"])
    summary = run_attribution(cm, direction, info["layer"], info["position"], sets["harmful"][:n],
                              sets["harmless"][:n], _suffixes(ctx)["adversarial"], folder,
                              config=dataclasses.replace(cfg.attribution_config, n_prompts=0), judge=judge,
                              progress=ctx.progress)
    return {"attribution": summary}


def stage_defence(ctx: Context, folder: Path) -> dict:
    """Hijacking suppression (calibrated on clean train prompts) against no suffix, the
    adversarial suffix and the random one on the harmful evaluation set, and its cost on the
    harmless one (false refusals, first-token KL, CE of the undefended answers)."""
    cfg = ctx.config
    cm = ctx.model_()
    _, info = ctx.direction()
    sets = ctx.eval_sets()
    judge, compliance = ctx.judges()
    defence = build_defence(cm, cfg.suppression, info["layer"], ctx.data_dir, batch_size=cfg.run.batch_size)
    write_json_atomic(folder / "defence.json", defence.to_dict())
    kw = dict(judge=judge, max_new_tokens=cfg.run.max_new_tokens, batch_size=cfg.run.batch_size,
              progress=ctx.progress)
    suffixes = {"none": "", **_suffixes(ctx)}
    rows, clean = [], None
    for defended in (False, True):
        state = "defended" if defended else "undefended"
        with suppressing(cm, defence) if defended else nullcontext():
            for kind, suffix in suffixes.items():
                n = len(sets["harmful"])
                rep = evaluate_refusal(cm, sets["harmful"], suffixes=[suffix] * n if suffix else None,
                                       compliance=compliance, **kw)
                rows.append({"set": "harmful", "suffix": kind, "defended": defended, "n": n,
                             "refused_rate": rep.refusal_rate, "complied_rate": rep.complied_rate,
                             "derailed_rate": rep.derailed_rate, "refusal_score": rep.refusal_score})
                write_json_atomic(folder / f"completions_{kind}_{state}.json", rep.rows())
            rep = evaluate_refusal(cm, sets["harmless"], **kw)
            clean = clean or rep
            rows.append({"set": "harmless", "suffix": "none", "defended": defended, "n": len(sets["harmless"]),
                         "refused_rate": rep.refusal_rate, "refusal_score": rep.refusal_score,
                         "kl": first_token_kl(clean.first_logits, rep.first_logits).mean().item()})
            write_json_atomic(folder / f"completions_harmless_{state}.json", rep.rows())
        # CE of the undefended answers, each condition's own way (the defence's runs its own block)
        rows[-1]["ce"] = (defended_ce(cm, defence, sets["harmless"], clean.completions, cfg.run.batch_size)
                          if defended else completion_ce(cm, sets["harmless"], clean.completions))
    write_table(folder, "defence", pd.DataFrame(rows))
    by = {(r["set"], r["suffix"], r["defended"]): r for r in rows}
    out = {}
    for kind in suffixes:
        for defended in (False, True):
            r, tag = by[("harmful", kind, defended)], f"{kind}_suffix{'_defended' if defended else ''}"
            out[f"defence_refused_{tag}"] = r["refused_rate"]
            out[f"defence_complied_{tag}"] = r["complied_rate"]
    out["defence_false_refusal"] = by[("harmless", "none", True)]["refused_rate"]
    out["defence_false_refusal_undefended"] = by[("harmless", "none", False)]["refused_rate"]
    out["defence_kl_harmless"] = by[("harmless", "none", True)]["kl"]
    return out


@dataclass(frozen=True)
class Stage:
    name: str
    fn: object
    after: tuple[str, ...]  # stages whose outputs it reads (their keys enter its key)
    settings: tuple[str, ...]  # config sections that change what it computes

    def inputs(self, ctx: Context) -> dict:
        """What the stage's outputs depend on: its settings, the keys of the stages it reads,
        the model and (where it reads them) the evaluation sets."""
        sections = ctx.config.sections()
        mine = {s: sections[s] for s in self.settings}
        if "attack" in mine:  # how fast a step runs does not change what it finds (how many steps does)
            mine["attack"] = {k: v for k, v in mine["attack"].items() if k not in SPEED_ONLY or k == "num_steps"}
        uses_eval = self.name in ("evaluation", "transfer", "attribution", "defence")
        return {"model": ctx.model, "settings": mine, "after": {a: ctx.keys.get(a) for a in self.after},
                "eval": ctx.eval_sets()["hash"] if uses_eval else None}

    def key(self, ctx: Context) -> str:
        return digest(self.inputs(ctx))

    def matches(self, recorded: dict, ctx: Context) -> bool:
        """Whether a finished stage's recorded inputs are the current ones. A setting the
        record does not have (added to the suite since) matches when it is at its default."""
        now = json.loads(json.dumps(self.inputs(ctx), default=str))
        old = recorded.get("inputs")
        if old is None:
            return recorded.get("key") == digest(now)
        if {k: v for k, v in now.items() if k != "settings"} != {k: v for k, v in old.items() if k != "settings"}:
            return False
        defaults = field_defaults()
        for section, values in now["settings"].items():
            had = old["settings"].get(section, {})
            for k, v in values.items():
                if (had[k] if k in had else defaults[section].get(k)) != v:
                    return False
        return True


def field_defaults() -> dict[str, dict]:
    """Every setting's dataclass default, by TOML section."""
    from .config import SECTIONS, section_classes

    return {name: {f.name: f.default for cls in section_classes(name) for f in dataclasses.fields(cls)}
            for name in SECTIONS}


STAGES = (
    Stage("organism", stage_organism, (), ()),
    Stage("direction", stage_direction, ("organism",), ("direction",)),
    Stage("evaluation", stage_evaluation, ("direction",), ("run", "evaluation")),
    Stage("attack", stage_attack, ("direction",), ("attack",)),
    Stage("transfer", stage_transfer, ("attack",), ("run",)),
    Stage("attribution", stage_attribution, ("direction", "attack"), ("run", "attribution")),
    Stage("defence", stage_defence, ("direction", "attack"), ("run", "defence")),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def stage_record(folder: Path) -> dict | None:
    path = folder / "stage.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
