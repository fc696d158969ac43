"""Select the refusal direction among the difference-in-means candidates.

For every candidate ``r[i, l]`` (EOI position ``i``, layer ``l``):

* **bypass**: mean refusal score on harmful val with ``r^`` ablated everywhere (lower = the
  direction carries more of the refusal);
* **induce**: mean refusal score on harmless val with ``r`` added at ``resid_pre`` of layer
  ``l``, all positions;
* **kl**: mean first-token KL(clean || ablated) on harmless val.

Zero candidates, candidates in the last ``prune_layer_fraction`` of layers, with ``kl > kl_threshold`` or with
``induce < induce_threshold`` are dropped; the lowest bypass score wins.

Speed: the clean harmless logits are computed once; KL is scored first for every candidate
(no candidate under the threshold: the run stops there); every pass computes the chat
prefix once (``run_batches``), sorts rows by length and unembeds only the last position.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..errors import UserError
from ..interventions.directional import ablate_direction, add_direction
from ..metrics import first_token_kl, refusal_score
from ..models.forward import run_batches
from ..models.loading import ChatModel


@dataclass(frozen=True)
class SelectionConfig:
    prune_layer_fraction: float = 0.2  # drop candidates whose layer >= (1 - f) * n_layers
    kl_threshold: float = 0.1
    induce_threshold: float = 0.0
    batch_size: int = 32


@dataclass
class CandidateScore:
    position: int  # negative EOI position
    layer: int
    bypass: float
    induce: float
    kl: float
    norm: float = 1.0  # of the raw difference in means
    filtered_by: str = ""  # "", "zero", "layer", "kl", "induce" (the first filter that removed it)


@torch.no_grad()
def score_candidates(
    cm: ChatModel,
    candidates: torch.Tensor,
    harmful_val: list[str],
    harmless_val: list[str],
    positions: list[int] | None = None,
    batch_size: int = 32,
    progress: bool = False,
    cfg: SelectionConfig | None = None,
) -> list[CandidateScore]:
    """Bypass, induce and KL for every candidate ``[n_positions, n_layers, d_model]``.

    KL comes first (one ablated pass over harmless val per candidate): with ``cfg``, a model
    where no candidate can pass the zero, layer and KL filters fails there, a third of the
    way in, saying what it found, instead of after scoring everything.
    """
    positions = positions or cm.chat.eoi_positions[-candidates.shape[0]:]
    harmful_rows = cm.chat.tokenize(harmful_val)
    harmless_rows = cm.chat.tokenize(harmless_val)
    clean = run_batches(cm, harmless_rows, batch_size)
    cells = [(pi, pos, layer) for pi, pos in enumerate(positions) for layer in range(candidates.shape[1])]
    bar = tqdm(total=3 * len(cells), desc="scoring candidates", disable=not progress)
    scores = []
    for pi, pos, layer in cells:  # KL: the filter that fails most often
        r = candidates[pi, layer].float()
        with ablate_direction(cm, r):
            kl = first_token_kl(clean, run_batches(cm, harmless_rows, batch_size)).mean().item()
        scores.append(CandidateScore(position=pos, layer=layer, bypass=math.nan, induce=math.nan, kl=kl,
                                     norm=r.norm().item()))
        bar.update(1)
    if cfg is not None:
        check_kl(scores, cm.n_layers, cfg)
    for (pi, pos, layer), s in zip(cells, scores):
        r = candidates[pi, layer].float()
        with ablate_direction(cm, r):
            s.bypass = refusal_score(run_batches(cm, harmful_rows, batch_size), cm.refusal_ids).mean().item()
        with add_direction(cm, r, layer):
            s.induce = refusal_score(run_batches(cm, harmless_rows, batch_size), cm.refusal_ids).mean().item()
        bar.update(2)
    bar.close()
    return scores


def _filter(s: CandidateScore, max_layer: int, cfg: SelectionConfig, kl_only: bool = False) -> str:
    if s.norm == 0:  # e.g. layer 0 at a template token: the same embedding for every prompt
        return "zero"
    if s.layer >= max_layer:
        return "layer"
    if s.kl > cfg.kl_threshold:
        return "kl"
    if not kl_only and s.induce < cfg.induce_threshold:
        return "induce"
    return ""


def _kl_found(scores: list[CandidateScore], max_layer: int) -> str:
    """What the KL filter saw: the lowest KL among candidates the other filters keep."""
    kept = sorted((s for s in scores if s.norm != 0 and s.layer < max_layer and not math.isnan(s.kl)),
                  key=lambda s: s.kl)
    if not kept:
        return ""
    low = ", ".join(f"{s.kl:.3f} at ({s.position}, {s.layer})" for s in kept[:3])
    return f"; the lowest KLs are {low}"


def check_kl(scores: list[CandidateScore], n_layers: int, cfg: SelectionConfig) -> None:
    """Fail early when no candidate passes the zero, layer and KL filters (KL scored, the rest not yet)."""
    max_layer = int(n_layers * (1 - cfg.prune_layer_fraction))
    if any(not _filter(s, max_layer, cfg, kl_only=True) for s in scores):
        return
    raise UserError(f"no candidate direction has first-token KL <= {cfg.kl_threshold} on harmless val outside the last "
                    f"{cfg.prune_layer_fraction:.0%} of layers{_kl_found(scores, max_layer)}; rerun with a "
                    "--kl-threshold above the one you accept (bypass and induce were not scored)")


def select_direction(scores: list[CandidateScore], n_layers: int, cfg: SelectionConfig = SelectionConfig()
                     ) -> CandidateScore:
    """Apply the filters (recording which removed each candidate) and pick the lowest bypass."""
    max_layer = int(n_layers * (1 - cfg.prune_layer_fraction))
    for s in scores:
        if any(math.isnan(v) for v in (s.bypass, s.induce, s.kl)):
            raise UserError(f"candidate (position {s.position}, layer {s.layer}) has NaN scores; "
                            "the model produced non-finite logits (try --dtype float32)")
        s.filtered_by = _filter(s, max_layer, cfg)
    survivors = [s for s in scores if not s.filtered_by]
    if not survivors:
        counts = {f: sum(s.filtered_by == f for s in scores) for f in ("zero", "layer", "kl", "induce")}
        over = [s for s in scores if s.filtered_by == "kl" and s.induce >= cfg.induce_threshold]
        best = min(over, key=lambda s: s.bypass) if over else None
        found = _kl_found(scores, max_layer)
        if best is not None:
            found += (f"; the best candidate above the KL threshold is ({best.position}, {best.layer}): bypass "
                      f"{best.bypass:+.2f}, induce {best.induce:+.2f}, KL {best.kl:.3f}")
        raise UserError(
            f"no candidate direction survives the filters: {counts['zero']} zero, {counts['layer']} removed as in the last "
            f"{cfg.prune_layer_fraction:.0%} of layers, {counts['kl']} with KL > {cfg.kl_threshold}, "
            f"{counts['induce']} with induce score < {cfg.induce_threshold}{found}; loosen --kl-threshold, "
            "--induce-threshold or --prune-layers")
    return min(survivors, key=lambda s: s.bypass)


def scores_table(scores: list[CandidateScore]) -> list[dict]:
    return [asdict(s) for s in scores]


@torch.no_grad()
def score_candidates_naive(
    cm: ChatModel,
    candidates: torch.Tensor,
    harmful_val: list[str],
    harmless_val: list[str],
    positions: list[int] | None = None,
    batch_size: int = 32,
) -> list[CandidateScore]:
    """Reference implementation: plain padded forward passes with full logits, three per
    candidate (bypass, induce, KL) plus one clean pass. For tests and the benchmark."""
    from ..models.chat import position_ids

    positions = positions or cm.chat.eoi_positions[-candidates.shape[0]:]

    def last_logits(prompts):
        out = []
        for s in range(0, len(prompts), batch_size):
            batch = cm.chat.encode(prompts[s:s + batch_size], device=cm.device)
            out.append(cm.model(**batch, position_ids=position_ids(batch["attention_mask"])).logits[:, -1].float().cpu())
        return torch.cat(out)

    clean = last_logits(harmless_val)
    scores = []
    for pi, pos in enumerate(positions):
        for layer in range(candidates.shape[1]):
            r = candidates[pi, layer].float()
            with ablate_direction(cm, r):
                bypass = refusal_score(last_logits(harmful_val), cm.refusal_ids).mean().item()
                kl = first_token_kl(clean, last_logits(harmless_val)).mean().item()
            with add_direction(cm, r, layer):
                induce = refusal_score(last_logits(harmless_val), cm.refusal_ids).mean().item()
            scores.append(CandidateScore(pos, layer, bypass, induce, kl, r.norm().item()))
    return scores
