"""The Pareto edit: a per-layer weight profile for the orthogonalization, searched with
Optuna against two objectives at once, as heretic (p-e-w/heretic) does.

The search space is :class:`~suffix_analysis.interventions.profile.WeightProfile`: a tent of
shares over the layers for attention outputs and one for MLP outputs (maximum, peak layer,
minimum as a fraction of the maximum, reach), and a share for the embeddings; and, for a
direction run, which direction is removed: the difference in means at a fractional layer
(``direction_layer``, mixed between the two layers around it, heretic's direction index) at
the run's selected position; and whether the edit keeps the linear writers' row norms
(``preserve_norms``, heretic's default row normalization, made exact:
``interventions.orthogonalize.row_rescale``). Every trial is
scored on selection prompts only, never held-out ones: the direction run's filtered val
splits, or other sets named by ``harmful`` and ``harmless`` (heretic scores all of harmful:val
and harmless:val):

* refused: the share of harmful val prompts whose first token is more likely a refusal than
  not (refusal score > 0, the paper's metric) with the profile's ablation, or, with
  ``judge_tokens`` N, whose N greedy tokens the substring judge also calls a refusal (a
  refusal that starts later, "To make ransomware, I can't help with that"; heretic counts
  refusals in 100 generated tokens);
* KL: the mean first-token KL(clean || edited) on harmless val prompts.

Trial 0 is the paper's edit (every share 1, the selected direction, no norms kept), so the
front is never worse than it on these prompts. Trials are simulated with hooks
(``interventions.profile.profile_hooks``); only the chosen one is baked into the weights.
The chosen edit is the front's trial with the fewest
refusals among those with KL at most ``max_kl`` (ties: lower KL); if none is that close, the
lowest KL. The run folder::

    EDIT/run.json          the model, the direction run, data and config
    EDIT/trials.csv        every trial: its parameters, refused, KL, mean refusal score, seconds
    EDIT/trials.json       the same, what a rerun resumes from
    EDIT/front.csv         the Pareto-optimal trials
    EDIT/edit.json         the chosen trial, its profile, its scores beside the paper's edit's
    EDIT/pareto.png        refused against KL, every trial, the front and the choice
    EDIT/model/            the chosen edit exported: an ordinary transformers folder
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..artifacts import write_json_atomic
from ..config import setting
from ..directions.extract import layer_direction
from ..directions.rdo import cone_basis
from ..directions.run import _write_csv, load_direction, load_layer_directions, run_prompts
from ..errors import UserError
from ..evaluation.generation import generate
from ..evaluation.refusal import SubstringJudge
from ..figures.pareto import draw_pareto
from ..interventions.orthogonalize import export_orthogonalized
from ..interventions.profile import Tent, WeightProfile, per_layer_sites, profile_hooks
from ..metrics import first_token_kl, refusal_score
from ..models.forward import run_batches
from ..models.hooks import run_with_hooks
from ..models.loading import ChatModel, fingerprint_mismatch
from ..runs import digest, open_run, read_json, update_run

log = logging.getLogger(__name__)
KIND = "edit"


@dataclass(frozen=True)
class ParetoConfig:
    """Pareto edit settings (heretic's defaults: 200 trials, the first 60 random)."""

    trials: int = setting(200, "Optuna trials (the first is the paper's full orthogonalization)", cpu=80)
    startup_trials: int = setting(60, "random trials before the TPE sampler models the front", cpu=24)
    max_weight: float = setting(1.5, "largest share a tent may remove (above 1 overshoots the direction)")
    max_kl: float = setting(0.1, "the chosen edit: fewest refusals among front trials with KL at most this "
                                 "(the paper's KL bound)")
    cone: bool = setting(False, "edit the whole refusal cone of an RDO run (`rdo --cone-dim K`), not its direction")
    direction_layer: bool = setting(True, "also search which layer's difference-in-means direction is removed "
                                          "(fractional, heretic's direction index); a direction run only")
    per_layer: bool = setting(True, "with --direction-layer, also offer heretic's per-layer scope: each layer's "
                                    "writers remove that layer's own difference in means")
    judge_tokens: int = setting(16, "also generate this many greedy tokens of each harmful prompt and count a refusal "
                                    "the substring judge finds in them (0: the first token's refusal score only)",
                                cpu=16)
    margin: float = setting(0.0, "a harmful prompt also counts as refused while its first-token refusal score is above "
                                 "-margin: a safety margin for the prompts the search does not see (0: score > 0)")
    preserve_norms: bool = setting(True, "also offer the norm-preserving edit (heretic's row normalization 'full', "
                                         "exact): the linear writers keep their row norms; trial 1 is the paper's "
                                         "shares so edited")
    harmful: str = setting("", "harmful selection prompts (refused): empty for the direction run's filtered val "
                               "prompts, or sets such as harmful:val or harmful:train,harmful:val")
    harmless: str = setting("", "harmless selection prompts (KL): empty for the direction run's filtered val "
                                "prompts, or sets such as harmless:val (heretic's choice: all of it), comma-separated")
    batch_size: int = setting(32, "prompts per forward pass")
    seed: int = setting(0, "seed of the sampler")
    export: bool = setting(True, "export the chosen edit as a model folder (EDIT/model)")

    def validate(self) -> None:
        if self.trials < 1 or self.batch_size < 1:
            raise UserError("trials and batch_size must be at least 1")
        if self.startup_trials < 0:
            raise UserError("startup_trials must be at least 0")
        if not 0 < self.max_weight <= 3:
            raise UserError(f"max_weight must be in (0, 3], got {self.max_weight}")
        if self.max_kl <= 0:
            raise UserError(f"max_kl must be above 0, got {self.max_kl}")
        if self.judge_tokens < 0:
            raise UserError(f"judge_tokens must be 0 (the first token only) or a number of tokens, got {self.judge_tokens}")
        if not 0 <= self.margin <= 20:
            raise UserError(f"margin must be in [0, 20] (a refusal score is a log-odds), got {self.margin}")


# Settings that change how long a search is or which trial is chosen, not what a trial scores.
_FREE = ("trials", "max_kl", "batch_size", "export")
OBJECTIVES = ("refused", "kl")


def _require_optuna():
    try:
        import optuna
    except ImportError:
        raise UserError("the Pareto edit needs Optuna: pip install optuna") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


# The direction layers searched, as fractions of the depth: heretic's range (its direction
# index); the first layers' differences in means do not carry refusal yet.
LAYER_RANGE = (0.4, 0.9)
# One direction for every writer (at direction_layer), or each layer's own (per_layer_sites).
SCOPES = ("global", "per layer")


def space(n_layers: int, max_weight: float, direction_layer: int | None = None, per_layer: bool = False,
          preserve_norms: bool = False) -> dict:
    """The search space: Optuna distributions by parameter name; with ``direction_layer`` (the
    selected direction's layer) the direction's layer too, over :data:`LAYER_RANGE` widened to
    hold the selected one (so trial 0, the paper's edit, is in the space); with
    ``preserve_norms`` the choice of the norm-preserving edit."""
    optuna = _require_optuna()
    top = max(n_layers - 1, 1)
    out = {}
    for c in ("attn", "mlp"):
        out[f"{c}_max_weight"] = optuna.distributions.FloatDistribution(0.0, max_weight)
        out[f"{c}_peak"] = optuna.distributions.FloatDistribution(0.0, float(n_layers - 1))
        out[f"{c}_min_ratio"] = optuna.distributions.FloatDistribution(0.0, 1.0)
        out[f"{c}_distance"] = optuna.distributions.FloatDistribution(1.0, float(top))
    out["embed"] = optuna.distributions.FloatDistribution(0.0, 1.0)
    if direction_layer is not None:
        lo, hi = (f * top for f in LAYER_RANGE)
        out["direction_layer"] = optuna.distributions.FloatDistribution(min(lo, direction_layer),
                                                                        max(hi, direction_layer))
        if per_layer:  # sampled always, as heretic does: multivariate TPE takes no conditional parameters
            out["direction_scope"] = optuna.distributions.CategoricalDistribution(SCOPES)
    if preserve_norms:
        out["preserve_norms"] = optuna.distributions.CategoricalDistribution((False, True))
    return out


def profile_of(params: dict) -> WeightProfile:
    """The weight profile a trial's parameters name."""
    def tent(c: str) -> Tent:
        top = params[f"{c}_max_weight"]
        return Tent(max_weight=top, peak=params[f"{c}_peak"], min_weight=top * params[f"{c}_min_ratio"],
                    distance=params[f"{c}_distance"])

    return WeightProfile(attn=tent("attn"), mlp=tent("mlp"), embed=params["embed"])


def full_params(n_layers: int, layer: int | None = None, per_layer: bool = False,
                preserve_norms: bool | None = None) -> dict:
    """The parameters of the paper's edit: every share 1 (a tent centred on the middle layer
    that reaches every layer), and with ``layer`` (a search of the direction layer too) the
    selected direction's layer; ``preserve_norms`` (a search of it): that choice (the paper's
    edit is ``False``)."""
    mid, reach = (n_layers - 1) / 2, float(max(n_layers - 1, 1))
    out = {**{f"{c}_{k}": v for c in ("attn", "mlp")
              for k, v in (("max_weight", 1.0), ("peak", mid), ("min_ratio", 1.0), ("distance", reach))},
           "embed": 1.0}
    if layer is not None:
        out = {**out, "direction_layer": float(layer), **({"direction_scope": "global"} if per_layer else {})}
    return out if preserve_norms is None else {**out, "preserve_norms": preserve_norms}


class Directions:
    """The direction each trial removes: the run's own (or its cone), or, with per-layer
    candidates, the one at the trial's ``direction_layer``, or each layer's own (scope
    'per layer': a map of hook site to direction)."""

    def __init__(self, fixed: torch.Tensor, layer_dirs: torch.Tensor | None = None):
        self.fixed, self.layer_dirs = fixed, layer_dirs

    def __call__(self, params: dict) -> torch.Tensor | dict[str, torch.Tensor]:
        if self.layer_dirs is None or "direction_layer" not in params:
            return self.fixed
        if params.get("direction_scope") == "per layer":
            return per_layer_sites(self.layer_dirs)
        return layer_direction(self.layer_dirs, params["direction_layer"])


class Scorer:
    """The two objectives of a profile on fixed prompts; the clean harmless logits once."""

    def __init__(self, cm: ChatModel, harmful: list[str], harmless: list[str], batch_size: int = 32,
                 judge_tokens: int = 0, judge=None, margin: float = 0.0):
        if not harmful or not harmless:
            raise UserError("the Pareto edit needs harmful and harmless selection prompts; the direction run kept "
                            f"{len(harmful)} and {len(harmless)}")
        self.cm, self.batch_size, self.judge_tokens, self.texts = cm, batch_size, judge_tokens, harmful
        self.margin = margin
        self.judge = judge or SubstringJudge()
        self.harmful, self.harmless = cm.chat.tokenize(harmful), cm.chat.tokenize(harmless)
        with torch.no_grad():
            self.clean = run_batches(cm, self.harmless, batch_size)

    @torch.no_grad()
    def __call__(self, profile: WeightProfile, direction: torch.Tensor | dict[str, torch.Tensor],
                 preserve_norms: bool = False) -> dict:
        """``refused`` (share of harmful prompts with refusal score > -``margin``, or, with
        ``judge_tokens``, a refusal in their greedy tokens), ``kl`` (mean
        first-token KL on harmless prompts) and ``score`` (mean refusal score, harmful), with
        ``profile``'s share of ``direction`` (``[d_model]``, a cone ``[k, d_model]``, or one per
        hook site) removed, by the norm-preserving edit with ``preserve_norms``."""
        cm = self.cm
        with run_with_hooks(cm, profile_hooks(cm, direction, profile, preserve_norms)):
            if self.judge_tokens:
                gen = generate(cm, self.texts, max_new_tokens=self.judge_tokens, batch_size=self.batch_size,
                               progress=False)
                s = refusal_score(gen.first_logits, cm.refusal_ids)
                refused = (s > -self.margin) | torch.tensor(self.judge(self.texts, gen.completions))
            else:
                s = refusal_score(run_batches(cm, self.harmful, self.batch_size), cm.refusal_ids)
                refused = s > -self.margin
            kl = first_token_kl(self.clean, run_batches(cm, self.harmless, self.batch_size)).mean().item()
        return {"refused": refused.float().mean().item(), "kl": kl, "score": s.mean().item()}


def pareto_front(rows: list[dict]) -> list[dict]:
    """The rows no other row dominates on (refused, kl), both minimized."""
    def dominates(a: dict, b: dict) -> bool:
        return (a["refused"] <= b["refused"] and a["kl"] <= b["kl"]
                and (a["refused"] < b["refused"] or a["kl"] < b["kl"]))

    return [r for r in rows if not any(dominates(o, r) for o in rows)]


def choose(front: list[dict], max_kl: float) -> dict:
    """The front's trial with the fewest refusals at KL <= ``max_kl`` (ties: lower KL), else
    the lowest KL."""
    close = [r for r in front if r["kl"] <= max_kl]
    if close:
        return min(close, key=lambda r: (r["refused"], r["kl"]))
    return min(front, key=lambda r: (r["kl"], r["refused"]))


def _study(optuna, cfg: ParetoConfig, dist: dict, done: list[dict]):
    sampler = optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=cfg.startup_trials, multivariate=True)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    for r in done:  # a resumed search: the finished trials, as the sampler saw them
        study.add_trial(optuna.trial.create_trial(params=r["params"], distributions=dist,
                                                  values=[r["refused"], r["kl"]]))
    return study


def run_pareto(cm: ChatModel, direction_run: str | Path, out: str | Path, cfg: ParetoConfig = ParetoConfig(),
               data_dir: str | None = None, progress: bool = True) -> dict:
    """Search the weight profile of ``direction_run``'s direction (or cone) into the run folder
    ``out`` (rerunning resumes, and more ``trials`` extend the search); returns ``edit.json``'s
    record. With ``export`` the chosen edit is baked into ``cm``'s weights in memory as it is
    saved (as ``orthogonalize`` does): load the model again to search once more."""
    cfg.validate()
    optuna = _require_optuna()
    src = Path(direction_run).expanduser()
    direction, info = load_direction(src, cm)
    layer_dirs = None
    if cfg.cone:
        direction = cone_basis(src)
    elif cfg.direction_layer:
        layer_dirs = load_layer_directions(src, cm)
        if layer_dirs is None:
            log.info("%s has no per-layer candidates (an RDO run): its direction is edited as it is", src)
    directions = Directions(direction, layer_dirs)
    prompts = run_prompts(cm, src, data_dir)
    harmful, harmless = prompts.harmful_val, prompts.harmless_val
    if cfg.harmful or cfg.harmless:
        from ..datasets import load_instructions

        def union(specs: str) -> list[str]:  # "harmful:train,harmful:val": the sets one after the other
            return [x.instruction for spec in specs.split(",") if spec.strip()
                    for x in load_instructions(spec.strip(), data_dir)]

        if cfg.harmful:
            harmful = union(cfg.harmful)
        if cfg.harmless:
            harmless = union(cfg.harmless)
    run = Path(out).expanduser()
    record = {"model": cm.name, "fingerprint": cm.fingerprint(), "d_model": cm.d_model, "direction_run": str(src),
              "direction": {"position": info["position"], "layer": info["layer"], "data": info["data"],
                            "digest": digest(direction.float().tolist())},
              "data": digest([harmful, harmless]), "config": asdict(cfg)}
    record = open_run(run, KIND, record, free=_FREE, same_model=lambda old: fingerprint_mismatch(
        old.get("fingerprint"), cm, f"run folder {run} (model '{old.get('model')}')"))
    update_run(run, record)
    search_layer = info["layer"] if layer_dirs is not None else None  # the direction's layer is searched too
    dist = space(cm.n_layers, cfg.max_weight, search_layer, cfg.per_layer, cfg.preserve_norms)
    norms = False if cfg.preserve_norms else None
    paper = full_params(cm.n_layers, search_layer, cfg.per_layer, norms)
    done = _load_trials(run) if (run / "trials.json").is_file() else []
    study = _study(optuna, cfg, dist, done)
    if not done:
        study.enqueue_trial(paper)
        if cfg.preserve_norms:
            study.enqueue_trial({**paper, "preserve_norms": True})
    scorer = Scorer(cm, harmful, harmless, cfg.batch_size, cfg.judge_tokens, margin=cfg.margin)
    start = time.perf_counter() - sum(r["seconds"] for r in done)
    bar = tqdm(total=cfg.trials, initial=min(len(done), cfg.trials), desc="Pareto edit", unit="trial",
               disable=not progress)
    try:
        while len(done) < cfg.trials:
            t0 = time.perf_counter()
            trial = study.ask(dist)
            scores = scorer(profile_of(trial.params), directions(trial.params),
                            trial.params.get("preserve_norms", False))
            study.tell(trial, [scores["refused"], scores["kl"]])
            done.append({"trial": len(done), "params": trial.params, **scores,
                         "seconds": round(time.perf_counter() - t0, 3)})
            bar.update(1)
            best = min(done, key=lambda r: (r["refused"], r["kl"]))
            bar.set_postfix(refused=f"{best['refused']:.0%}", kl=f"{best['kl']:.3f}")
            if len(done) % 10 == 0:
                write_json_atomic(run / "trials.json", done)
    finally:
        bar.close()
        if done:
            write_json_atomic(run / "trials.json", done)
    return _finish(cm, run, cfg, directions, info, record, done, time.perf_counter() - start,
                   (len(scorer.harmful), len(scorer.harmless)), paper)


def _load_trials(run: Path) -> list[dict]:
    remedy = f"remove {run}/trials.json to search again"
    rows = read_json(run / "trials.json", remedy)
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"params", "refused", "kl", "seconds"} <= set(r)
                                             for r in rows):
        raise UserError(f"{run}/trials.json is not a trial list this suite wrote; {remedy}")
    return rows


def _finish(cm: ChatModel, run: Path, cfg: ParetoConfig, directions: Directions, info: dict, record: dict,
            done: list[dict], seconds: float, sizes: tuple[int, int], paper: dict) -> dict:
    front = pareto_front(done)
    chosen = choose(front, cfg.max_kl)
    flat = [{"trial": r["trial"], "refused": r["refused"], "kl": r["kl"], "score": r["score"],
             "pareto": r in front, "chosen": r is chosen, "seconds": r["seconds"], **r["params"]} for r in done]
    _write_csv(run / "trials.csv", flat)
    _write_csv(run / "front.csv", sorted((f for f in flat if f["pareto"]), key=lambda f: f["kl"]))
    profile = profile_of(chosen["params"])
    full = done[0] if done[0]["params"] == paper else None
    direction = directions(chosen["params"])
    out = {"model": cm.name, "fingerprint": record["fingerprint"], "direction_run": record["direction_run"],
           "position": info["position"], "layer": info["layer"],
           "direction_layer": chosen["params"].get("direction_layer"),
           "direction_scope": chosen["params"].get("direction_scope", "global"),
           "preserve_norms": chosen["params"].get("preserve_norms", False), "cone": cfg.cone,
           "objectives": list(OBJECTIVES),
           "chosen": {k: chosen[k] for k in ("trial", "refused", "kl", "score")}, "profile": profile.to_dict(),
           "shares": profile.sites(cm.n_layers),
           "paper_edit": {k: full[k] for k in ("refused", "kl", "score")} if full else None,
           "front": len(front), "budget": {"trials": len(done), "seconds": round(seconds, 1)},
           "prompts": {"harmful": cfg.harmful or "the direction run's filtered harmful val",
                       "harmless": cfg.harmless or "its filtered harmless val", "n_harmful": sizes[0],
                       "n_harmless": sizes[1]}}
    write_json_atomic(run / "edit.json", out)
    draw_pareto(run)
    if cfg.export:
        folder = export_orthogonalized(cm, direction, run / "model", {
            "source_model": cm.name, "direction_run": record["direction_run"], "edit_run": str(run),
            "position": info["position"], "layer": info["layer"], "direction_layer": out["direction_layer"],
            "direction_scope": out["direction_scope"], "preserve_norms": out["preserve_norms"],
            "profile": profile.to_dict(), "cone": cfg.cone},
            scales=profile.sites(cm.n_layers), preserve_norms=out["preserve_norms"])
        out["model_folder"] = str(folder)
        write_json_atomic(run / "edit.json", out)
    log.info("Pareto edit: trial %d of %d, %.1f%% of harmful val refused at KL %.4f (the paper's edit: %s)",
             chosen["trial"], len(done), 100 * chosen["refused"], chosen["kl"],
             f"{100 * full['refused']:.1f}% at KL {full['kl']:.4f}" if full else "not in this search")
    if math.isnan(chosen["kl"]):
        log.warning("the chosen edit's KL is NaN; check the model's dtype")
    return out
