"""Refusal direction optimization (RDO, after Wollschläger et al., ICML 2025): a direction
learned by gradient, starting from a direction run's difference-in-means direction.

A unit vector ``r`` (at the direction run's layer for addition) is trained so that

* ablation: with ``r`` removed everywhere (``interventions.directional.ablation_hooks``),
  harmful train prompts continue with the answers the model gives with the difference-in-means
  direction ablated (cross-entropy of those target tokens);
* addition: with ``norm * r`` added at ``blocks.{layer}.hook_resid_pre`` (``norm``: the
  difference-in-means direction's), harmless train prompts continue with the refusals the
  model gives with that direction added;
* retain: with ``r`` removed, harmless prompts keep the model's own next-token distributions
  (KL(clean || ablated) over the last prompt token and the model's own answer);
* independence (with ``independent_of``, the paper's representational independence, RepInd):
  ablating ``r`` leaves every layer's cosine with another direction ``d`` as it was, and
  ablating ``d`` leaves the cosine with ``r`` as it was (:func:`independence_loss`); such an
  ``r`` starts orthogonal to ``d`` (a seeded random start), not at the difference in means.

The targets come from the difference-in-means direction, generated greedily once. Adam on
``r``, renormalized after each step. With ``cone_dim`` k > 1 a refusal cone is learned
instead: an orthonormal basis (its first vector starting at the difference-in-means
direction, the others random), and each step trains a random unit vector of the cone (a
non-negative combination of the basis), so that every vector of it bypasses and induces
refusal; ``check_cone`` tests that on held-out prompts. The run folder::

    RDO/run.json                 the model, the direction run it starts from, data and config
    RDO/targets.json             the generated targets (stage 1)
    RDO/checkpoint.safetensors   r and Adam's moments, with checkpoint.json (step, losses, RNG)
    RDO/losses.csv               the three terms per step
    RDO/direction.safetensors    the learned direction, scaled to the starting direction's norm
    RDO/direction.json           its position and layer (the starting direction's), and the
                                 val bypass, induce and KL of both directions
    RDO/cone.safetensors         with cone_dim > 1: the cone's orthonormal basis [k, d_model]
    RDO/cone.json                and its checks on held-out prompts (check_cone)

``direction.safetensors`` and ``direction.json`` read as a direction run's, so every
command that takes ``--direction RUN`` takes an RDO run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..artifacts import write_json_atomic
from ..config import setting
from ..errors import UserError
from ..interventions.directional import (
    ablate_direction,
    ablation_hooks,
    add_direction,
    addition_hooks,
    subspace_ablation_hooks,
)
from ..metrics import first_token_kl, refusal_score
from ..models.chat import pad_left, pad_token_id, position_ids
from ..models.forward import run_batches
from ..models.hooks import hook_names, run_with_hooks
from ..models.loading import ChatModel, fingerprint_mismatch
from ..runs import RUN_FILE, digest, open_run, read_json, update_run
from ..tables import atomic_path
from .run import _write_csv, load_direction, run_prompts

log = logging.getLogger(__name__)
KIND = "rdo"


@dataclass(frozen=True)
class RDOConfig:
    """RDO settings (the paper trains with Adam at a learning rate of about 1e-2)."""

    steps: int = setting(200, "optimization steps", cpu=60)
    lr: float = setting(1e-2, "Adam learning rate")
    batch: int = setting(16, "prompts per term per step", cpu=8)
    target_tokens: int = setting(24, "tokens of each generated target (answers, refusals, the model's own answers)",
                                 cpu=16)
    n_prompts: int = setting(64, "train prompts per class the targets are generated for (from the direction "
                                 "run's filtered train prompts)", cpu=32)
    ablation_weight: float = setting(1.0, "weight of the ablation term (harmful prompts answer)")
    addition_weight: float = setting(0.2, "weight of the addition term (harmless prompts refuse)")
    retain_weight: float = setting(1.0, "weight of the retain term (harmless behaviour kept under ablation)")
    # A refusal cone (the paper finds cones of up to 5 dimensions): each step trains a random
    # unit vector of the cone (non-negative combination of an orthonormal basis whose first
    # vector starts at the difference-in-means direction), so that every vector of it mediates refusal.
    cone_dim: int = setting(1, "dimensions of the refusal cone to learn (1: a single direction; at most 5)")
    cone_samples: int = setting(8, "cone: random unit vectors of the cone checked on held-out prompts after training")
    independent_of: str = setting("", "a direction run (or RDO run) whose direction the learned one must be "
                                      "representationally independent of (the paper's RepInd term); empty: none")
    # Squared cosine changes are small (about 1e-4 to 1e-3 per position), so the term needs a
    # large weight to count beside the cross-entropies.
    independence_weight: float = setting(1000.0, "weight of the independence term (with --independent-of)")
    seed: int = setting(0, "seed of the prompt batches, the cone's initial basis and its samples")
    checkpoint_every: int = setting(10, "steps between checkpoints (0: only at the end)")

    def validate(self) -> None:
        if self.steps < 1 or self.batch < 1 or self.target_tokens < 1 or self.n_prompts < 1:
            raise UserError("steps, batch, target_tokens and n_prompts must be at least 1")
        if self.lr <= 0:
            raise UserError(f"lr must be above 0, got {self.lr}")
        if min(self.ablation_weight, self.addition_weight, self.retain_weight) < 0:
            raise UserError("the term weights must be at least 0")
        if self.checkpoint_every < 0:
            raise UserError("checkpoint_every must be at least 0")
        if not 1 <= self.cone_dim <= 5:
            raise UserError(f"cone_dim must be between 1 and 5, got {self.cone_dim}")
        if self.cone_samples < 0:
            raise UserError("cone_samples must be at least 0")
        if self.independent_of and self.cone_dim != 1:
            raise UserError("--independent-of learns one direction; use it with --cone-dim 1")
        if self.independence_weight < 0:
            raise UserError("independence_weight must be at least 0")


# Settings that change how long a run is, not what it learns up to a step.
_FREE = ("steps", "checkpoint_every", "cone_samples")
# Held-out prompts for the cone's checks (neither trained on nor used for selection).
CHECK_SETS, CHECK_PROMPTS = ("harmful:test", "harmless:test"), 60


@torch.no_grad()
def _greedy(cm: ChatModel, instructions: list[str], n: int, batch_size: int = 16) -> list[list[int]]:
    """The first ``n`` greedy tokens after each prompt (cut after an EOS)."""
    out = []
    eos = cm.tokenizer.eos_token_id
    for s in range(0, len(instructions), batch_size):
        batch = cm.chat.encode(instructions[s:s + batch_size], device=cm.device)
        seq = cm.model.generate(**batch, max_new_tokens=n, do_sample=False, pad_token_id=pad_token_id(cm.tokenizer))
        for row in seq[:, batch["input_ids"].shape[1]:].tolist():
            out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


def _batch(cm: ChatModel, prompts: list[list[int]], targets: list[list[int]]) -> tuple[dict, torch.Tensor]:
    """Model kwargs for prompt + target rows (left-padded), and a ``[batch, pos]`` mask of the
    positions whose next token is a target token (the last prompt token and all but the last
    target token)."""
    rows = [p + t for p, t in zip(prompts, targets)]
    enc = pad_left(rows, pad_token_id(cm.tokenizer), cm.device)
    width = enc["input_ids"].shape[1]
    pred = torch.zeros(len(rows), width, dtype=torch.bool, device=cm.device)
    for i, t in enumerate(targets):
        pred[i, width - len(t) - 1: width - 1] = True
    return {**enc, "position_ids": position_ids(enc["attention_mask"])}, pred


def _target_ce(cm: ChatModel, kwargs: dict, pred: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the target tokens (the tokens after the ``pred`` positions)."""
    logits = cm.model(**kwargs).logits.float()
    nxt = kwargs["input_ids"][:, 1:]
    return torch.nn.functional.cross_entropy(logits[:, :-1][pred[:, :-1]], nxt[pred[:, :-1]])


def _log_probs(cm: ChatModel, kwargs: dict, pred: torch.Tensor) -> torch.Tensor:
    return cm.model(**kwargs).logits.float()[pred].log_softmax(-1)


def orthonormal(v: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt on the rows of ``v`` ``[k, d]`` (differentiable; row 0 keeps its direction
    and every row its sign, so the cone's orientation is what was learned)."""
    rows = []
    for x in v:
        for q in rows:
            x = x - (x @ q) * q
        rows.append(x / x.norm())
    return torch.stack(rows)


def cone_vector(basis: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random unit vector of the cone of ``basis`` ``[k, d]``: ``|N(0, 1)|`` weights."""
    w = torch.randn(basis.shape[0], generator=gen).abs().to(basis)
    r = w @ basis
    return r / r.norm()


def _resid(cm: ChatModel, kwargs: dict, hooks) -> torch.Tensor:
    """``blocks.{l}.hook_resid_pre`` of every layer after ``hooks`` acted: ``[n_layers, batch,
    pos, d_model]`` (the decoder alone: no logits)."""
    acts = []

    def keep(x: torch.Tensor, hook) -> torch.Tensor:
        acts.append(x)
        return x

    with run_with_hooks(cm, list(hooks) + [(n, keep) for n in hook_names(cm, ["hook_resid_pre"])]):
        cm.model.base_model(**kwargs)
    return torch.stack(acts)


def _cos(acts: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """Cosine of each activation ``[..., d_model]`` with a unit vector ``[d_model]``."""
    return (acts @ unit.to(acts.dtype)) / acts.norm(dim=-1).clamp_min(1e-6)


def independence_terms(cm: ChatModel, r: torch.Tensor, d: torch.Tensor, kwargs: dict,
                       mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Representational independence of two unit directions ``r`` and ``d`` ``[d_model]`` on a
    batch (Wollschläger et al., 2025): the change of every layer's cosine with ``r`` when ``d``
    is ablated, and of the cosine with ``d`` when ``r`` is ablated, at the ``mask``
    ``[batch, pos]`` positions: two ``[n_layers, n]`` tensors (0 when the two are independent).
    Differentiable in ``r``."""
    with torch.no_grad():
        clean = _resid(cm, kwargs, [])[:, mask]
        without_d = _resid(cm, kwargs, ablation_hooks(cm, d))[:, mask]
    without_r = _resid(cm, kwargs, ablation_hooks(cm, r))[:, mask]  # differentiable in r
    return _cos(without_d, r) - _cos(clean, r), _cos(without_r, d) - _cos(clean, d)


def independence_loss(cm: ChatModel, r: torch.Tensor, d: torch.Tensor, kwargs: dict, mask: torch.Tensor) -> torch.Tensor:
    """The RepInd term: the mean squared change of both cosines (:func:`independence_terms`)."""
    a, b = independence_terms(cm, r, d, kwargs, mask)
    return (a ** 2).mean() + (b ** 2).mean()


@torch.no_grad()
def independence(cm: ChatModel, r: torch.Tensor, d: torch.Tensor, instructions: list[str],
                 batch_size: int = 16) -> dict:
    """How representationally independent two directions are on ``instructions`` (every
    prompt token): per layer, the mean absolute change of the cosine with ``r`` when ``d`` is
    ablated and with ``d`` when ``r`` is ablated; the largest of each over the layers, and the
    two directions' own cosine."""
    r, d = r.float().cpu() / r.norm(), d.float().cpu() / d.norm()
    sums, n = None, 0
    rows = cm.chat.tokenize(instructions)
    for s in range(0, len(rows), batch_size):
        enc = pad_left(rows[s:s + batch_size], pad_token_id(cm.tokenizer), cm.device)
        kw = {**enc, "position_ids": position_ids(enc["attention_mask"])}
        a, b = independence_terms(cm, r.to(cm.device), d.to(cm.device), kw, enc["attention_mask"].bool())
        part = torch.stack([a.abs().sum(1), b.abs().sum(1)]).double().cpu()  # [2, n_layers]
        sums, n = part if sums is None else sums + part, n + a.shape[1]
    per_layer = (sums / n).float()
    return {"cosine": float(r @ d), "r_when_d_ablated_max": per_layer[0].max().item(),
            "d_when_r_ablated_max": per_layer[1].max().item(),
            "r_when_d_ablated": [round(x, 5) for x in per_layer[0].tolist()],
            "d_when_r_ablated": [round(x, 5) for x in per_layer[1].tolist()]}


@torch.no_grad()
def score_direction(cm: ChatModel, direction: torch.Tensor, layer: int, harmful: list[str], harmless: list[str],
                    batch_size: int = 32) -> dict:
    """The direction run's three scores of one direction ``[d_model]`` on val prompts: bypass
    (mean refusal score of harmful prompts, ablated), induce (of harmless prompts, added at
    ``layer``) and the first-token KL of harmless prompts under ablation; and the shares of
    prompts whose first token is more likely a refusal than not (refusal score > 0) under
    each. A subspace ``[k, d_model]`` is ablated whole (no addition)."""
    harmful_rows, harmless_rows = cm.chat.tokenize(harmful), cm.chat.tokenize(harmless)
    clean = run_batches(cm, harmless_rows, batch_size)
    hooks = ablation_hooks(cm, direction) if direction.ndim == 1 else subspace_ablation_hooks(cm, direction)
    with run_with_hooks(cm, hooks):
        ablated = refusal_score(run_batches(cm, harmful_rows, batch_size), cm.refusal_ids)
        kl = first_token_kl(clean, run_batches(cm, harmless_rows, batch_size)).mean().item()
    out = {"bypass": ablated.mean().item(), "kl": kl, "refusing_ablated": (ablated > 0).float().mean().item()}
    if direction.ndim == 1:
        with add_direction(cm, direction, layer):
            added = refusal_score(run_batches(cm, harmless_rows, batch_size), cm.refusal_ids)
        out.update(induce=added.mean().item(), refusing_added=(added > 0).float().mean().item())
    return out


class _Targets:
    """Stage 1: the generated targets, in ``targets.json``."""

    def __init__(self, cm: ChatModel, run: Path, cfg: RDOConfig, dim: torch.Tensor, layer: int, harmful: list[str],
                 harmless: list[str]):
        path = run / "targets.json"
        if not path.is_file():
            log.info("RDO: generating %d-token targets for %d harmful and %d harmless prompts", cfg.target_tokens,
                     len(harmful), len(harmless))
            with ablate_direction(cm, dim):
                answers = _greedy(cm, harmful, cfg.target_tokens)
            with add_direction(cm, dim, layer):
                refusals = _greedy(cm, harmless, cfg.target_tokens)
            own = _greedy(cm, harmless, cfg.target_tokens)
            write_json_atomic(path, {"harmful": harmful, "harmless": harmless, "answers": answers,
                                     "refusals": refusals, "own": own})
        rec = read_json(path, f"remove it to generate the targets again (`suffix-analysis rdo --out {run}`)")
        try:
            self.harmful = cm.chat.tokenize(rec["harmful"])
            self.harmless = cm.chat.tokenize(rec["harmless"])
            self.answers, self.refusals, self.own = rec["answers"], rec["refusals"], rec["own"]
        except (KeyError, TypeError):
            raise UserError(f"{path} is not an RDO targets file this suite wrote; remove it to generate them "
                            "again") from None


def _save_checkpoint(run: Path, v: torch.Tensor, opt: torch.optim.Adam, step: int, losses: list[dict],
                     gen: torch.Generator) -> None:
    st = opt.state.get(v, {})
    tensors = {"v": v.detach().cpu()}
    if st:
        tensors.update(exp_avg=st["exp_avg"].cpu(), exp_avg_sq=st["exp_avg_sq"].cpu())
    with atomic_path(run / "checkpoint.safetensors") as tmp:
        save_file(tensors, str(tmp))
    write_json_atomic(run / "checkpoint.json", {"step": step, "losses": losses, "rng": gen.get_state().tolist()})


def _load_checkpoint(run: Path, v: torch.Tensor, opt: torch.optim.Adam, gen: torch.Generator) -> tuple[int, list]:
    remedy = f"remove {run}/checkpoint.* to start the optimization again"
    ck = read_json(run / "checkpoint.json", remedy)
    try:
        t = load_file(str(run / "checkpoint.safetensors"))
        with torch.no_grad():
            v.copy_(t["v"])
        if "exp_avg" in t:
            opt.state[v] = {"step": torch.tensor(float(ck["step"])), "exp_avg": t["exp_avg"].to(v),
                            "exp_avg_sq": t["exp_avg_sq"].to(v)}
        gen.set_state(torch.tensor(ck["rng"], dtype=torch.uint8))
        return int(ck["step"]), list(ck["losses"])
    except Exception as e:  # safetensors' own errors for a truncated file, shape errors for another model's
        raise UserError(f"the checkpoint in {run} is unreadable or from another model ({type(e).__name__}); "
                        f"{remedy}") from None


def run_rdo(cm: ChatModel, direction_run: str | Path, out: str | Path, cfg: RDOConfig = RDOConfig(),
            data_dir: str | None = None, progress: bool = True) -> dict:
    """Learn a refusal direction from the direction run ``direction_run`` into the run folder
    ``out`` (rerunning resumes from the last checkpoint); returns ``direction.json``'s record."""
    cfg.validate()
    src = Path(direction_run).expanduser()
    dim, info = load_direction(src, cm)
    layer = info["layer"]
    # load_direction checked the folder's model; its record says what kind of run it is
    drec = read_json(src / RUN_FILE, f"make the direction run again with `suffix-analysis direction --out {src}`")
    if drec.get("kind", "direction") != "direction":
        raise UserError(f"{src} is {drec.get('kind')!r} run; RDO starts from the difference-in-means direction of a "
                        "`suffix-analysis direction` run")
    prompts = run_prompts(cm, src, data_dir)
    harmful, harmless = prompts.harmful_train[: cfg.n_prompts], prompts.harmless_train[: cfg.n_prompts]
    run = Path(out).expanduser()
    other = None
    if cfg.independent_of:
        other, _ = load_direction(Path(cfg.independent_of).expanduser(), cm)
        other = (other.float() / other.norm()).to(cm.device)
    record = {"model": cm.name, "fingerprint": cm.fingerprint(), "d_model": cm.d_model, "direction_run": str(src),
              "start": {"position": info["position"], "layer": layer, "data": info["data"]},
              "data": digest([harmful, harmless]), "config": asdict(cfg),
              **({"independent_of": digest(other.cpu().tolist())} if other is not None else {})}
    record = open_run(run, KIND, record, free=_FREE, same_model=lambda old: fingerprint_mismatch(
        old.get("fingerprint"), cm, f"run folder {run} (model '{old.get('model')}')"))
    update_run(run, record)
    targets = _Targets(cm, run, cfg, dim, layer, harmful, harmless)

    norm = dim.norm().item()
    init = torch.randn(cfg.cone_dim, cm.d_model, generator=torch.Generator().manual_seed(cfg.seed + 1))
    if other is None:
        init[0] = dim.float() / norm
    else:  # RepInd: a random start orthogonal to the direction it must be independent of
        o = other.cpu()
        init[0] = init[0] - (init[0] @ o) * o
    v = orthonormal(init).to(cm.device).requires_grad_(True)  # [cone_dim, d_model]
    opt = torch.optim.Adam([v], lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, losses = 0, []
    if (run / "checkpoint.json").is_file():
        step, losses = _load_checkpoint(run, v, opt, gen)
        log.info("RDO: resuming at step %d", step)
    trainable = [p for p in cm.model.parameters() if p.requires_grad]
    for p in trainable:  # only r is learned: no gradients for the weights
        p.requires_grad_(False)
    bar = tqdm(total=cfg.steps, initial=min(step, cfg.steps), desc="RDO", unit="step", disable=not progress)
    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            hi = torch.randperm(len(targets.harmful), generator=gen)[: cfg.batch].tolist()
            ni = torch.randperm(len(targets.harmless), generator=gen)[: cfg.batch].tolist()
            terms = {}
            basis = orthonormal(v)
            unit = basis[0] if cfg.cone_dim == 1 else cone_vector(basis, gen)
            hkw, hpred = _batch(cm, [targets.harmful[i] for i in hi], [targets.answers[i] for i in hi])
            if cfg.ablation_weight:
                with run_with_hooks(cm, ablation_hooks(cm, unit)):
                    terms["ablation"] = _target_ce(cm, hkw, hpred)
            if other is not None and cfg.independence_weight:
                terms["independence"] = independence_loss(cm, unit, other, hkw, hkw["attention_mask"].bool())
            if cfg.addition_weight:
                kw, pred = _batch(cm, [targets.harmless[i] for i in ni], [targets.refusals[i] for i in ni])
                with run_with_hooks(cm, addition_hooks(cm, unit * norm, layer)):
                    terms["addition"] = _target_ce(cm, kw, pred)
            if cfg.retain_weight:
                kw, pred = _batch(cm, [targets.harmless[i] for i in ni], [targets.own[i] for i in ni])
                with torch.no_grad():
                    clean = _log_probs(cm, kw, pred)
                with run_with_hooks(cm, ablation_hooks(cm, unit)):
                    ablated = _log_probs(cm, kw, pred)
                terms["retain"] = (clean.exp() * (clean - ablated)).sum(-1).mean()
            weights = {"ablation": cfg.ablation_weight, "addition": cfg.addition_weight, "retain": cfg.retain_weight,
                       "independence": cfg.independence_weight}
            loss = sum(weights[k] * t for k, t in terms.items())
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                v.copy_(orthonormal(v))
            step += 1
            losses.append({"step": step, **{k: round(t.item(), 5) for k, t in terms.items()},
                           "seconds": round(time.perf_counter() - t0, 3)})
            bar.update(1)
            bar.set_postfix({k: f"{t.item():.3f}" for k, t in terms.items()})
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                _save_checkpoint(run, v, opt, step, losses, gen)
    finally:
        bar.close()
        for p in trainable:
            p.requires_grad_(True)
    _save_checkpoint(run, v, opt, step, losses, gen)
    return _finish(cm, run, cfg, orthonormal(v.detach()).cpu(), norm, dim, info, record, losses, prompts, data_dir,
                   other)


def _finish(cm: ChatModel, run: Path, cfg: RDOConfig, basis: torch.Tensor, norm: float, dim: torch.Tensor,
            info: dict, record: dict, losses: list[dict], prompts, data_dir: str | None,
            other: torch.Tensor | None = None) -> dict:
    """The learned direction (a cone's: the mean of its basis) at the starting direction's
    norm, its val scores beside the starting direction's, its representational independence
    of the difference in means (and of ``other``, the direction it was trained independent
    of) on the harmful val prompts, and a cone's checks (``cone.json``)."""
    _write_csv(run / "losses.csv", losses)
    mean = basis.sum(0)
    direction = (mean / mean.norm()).float() * norm
    layer = info["layer"]
    scores = score_direction(cm, direction, layer, prompts.harmful_val, prompts.harmless_val)
    start = score_direction(cm, dim, layer, prompts.harmful_val, prompts.harmless_val)
    cos = torch.nn.functional.cosine_similarity(direction, dim.float().cpu(), dim=0).item()
    out = {"position": info["position"], "layer": layer, **scores, "norm": norm, "model": cm.name,
           "fingerprint": record["fingerprint"], "data": info["data"], "steps": len(losses), "method": "rdo",
           "cone_dim": cfg.cone_dim, "cosine_to_start": cos, "start": {"run": str(record["direction_run"]), **start},
           "independence_of_start": independence(cm, direction, dim, prompts.harmful_val)}
    if other is not None:
        out["independence_of"] = {"run": cfg.independent_of, **independence(cm, direction, other.cpu(),
                                                                             prompts.harmful_val)}
    if cfg.cone_dim > 1:
        with atomic_path(run / "cone.safetensors") as tmp:
            save_file({"basis": basis.contiguous()}, str(tmp), metadata={"layer": str(layer), "norm": str(norm),
                                                                         "fingerprint": record["fingerprint"]})
        write_json_atomic(run / "cone.json", check_cone(cm, basis, norm, layer, cfg, data_dir))
    with atomic_path(run / "direction.safetensors") as tmp:
        save_file({"direction": direction.contiguous()}, str(tmp),
                  metadata={"position": str(info["position"]), "layer": str(layer),
                            "fingerprint": record["fingerprint"]})
    write_json_atomic(run / "direction.json", out)
    return out


def cone_basis(run: Path) -> torch.Tensor:
    """The cone basis ``[k, d_model]`` of an RDO run (checked against the model by whoever
    loaded the run's direction), or a one-line error naming the fix."""
    path = run / "cone.safetensors"
    if not path.is_file():
        raise UserError(f"{run} holds no refusal cone (no cone.safetensors); learn one with "
                        f"`suffix-analysis rdo --cone-dim K --out {run}` or drop --cone")
    try:
        return load_file(str(path))["basis"]
    except Exception as e:  # safetensors' own errors for truncated or foreign files
        raise UserError(f"{path} is unreadable ({type(e).__name__}); run `suffix-analysis rdo` again") from None


def check_cone(cm: ChatModel, basis: torch.Tensor, norm: float, layer: int, cfg: RDOConfig,
               data_dir: str | None = None) -> dict:
    """The paper's checks of a cone on held-out prompts (``CHECK_SETS``, the first
    ``CHECK_PROMPTS`` of each): every basis vector and ``cone_samples`` random unit vectors
    of the cone, each ablated (bypass) and added at ``norm`` (induce), and the whole subspace
    ablated; a prompt counts as refusing when its refusal score is above 0."""
    from ..datasets import load_instructions

    harmful, harmless = ([x.instruction for x in load_instructions(spec, data_dir)][:CHECK_PROMPTS]
                         for spec in CHECK_SETS)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    vectors = [(f"basis {i}", b) for i, b in enumerate(basis)]
    vectors += [(f"sample {j}", cone_vector(basis, gen)) for j in range(cfg.cone_samples)]
    rows = [{"vector": name, **score_direction(cm, v * norm, layer, harmful, harmless)} for name, v in vectors]
    rows.append({"vector": "subspace", **score_direction(cm, basis, layer, harmful, harmless)})
    samples = [r for r in rows if r["vector"].startswith("sample")]
    summary = {"cone_dim": basis.shape[0], "prompts": {"harmful": f"{CHECK_SETS[0]} (first {len(harmful)})",
                                                       "harmless": f"{CHECK_SETS[1]} (first {len(harmless)})"}}
    if samples:
        summary.update(samples_bypass_min=min(1 - r["refusing_ablated"] for r in samples),
                       samples_induce_min=min(r["refusing_added"] for r in samples))
    log.info("cone checks: %s", "; ".join(f"{r['vector']}: {1 - r['refusing_ablated']:.0%} bypassed"
                                          + (f", {r['refusing_added']:.0%} induced" if "refusing_added" in r else "")
                                          for r in rows))
    return {**summary, "vectors": rows}
