"""Causal tests of the attribution: activation patching of heads, and attention knockout.

**Patching.** Run a *source* (e.g. harmful, no suffix) and a *destination* (harmful +
suffix) prompt; in the destination run, replace the chosen heads' ``blocks.{l}.attn.hook_z``
slices at the EOI positions by the source's (and, the reverse, the destination's into the
source). The two prompts differ in length, but left padding puts the EOI tokens at the
same negative positions, so positions are aligned from the end. Each run is read at the
last position: the refusal score of its logits (``metrics.refusal_score`` with
``cm.refusal_ids``) and the direction's projection on ``blocks.{layer}.hook_resid_pre``.
A patched head in a layer at or after ``layer`` cannot move that projection (it is written
later); the score sees every layer. The *share restored* of a patch from run ``a`` into run
``b`` is ``(patched - b) / (a - b)``: 0 = nothing moved, 1 = ``b`` reads as ``a``.

**Knockout.** Hide the suffix's key positions from the EOI queries (and from every later
query: generated tokens too, so ``generate`` under :func:`suffix_knockout` answers as if
the suffix were invisible from the response's start) in every layer, a band of layers, or
given heads. It is an attention-mask edit (``masks.py``): the remaining keys are
renormalized as for padding; the suffix tokens keep their positions (and RoPE offsets),
and still see and write their own residual stream, which nothing at the EOI positions
reads any more. Per-head knockout is exact through a per-head mask (``masks.py`` says why).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Literal

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import UserError
from ..metrics import refusal_score
from ..models.chat import position_ids
from ..models.hooks import HookList, Recorder, run_with_hooks
from ..models.loading import ChatModel
from .batches import batch_slices, prompts, unit_direction
from .masks import AttentionCut, batch_width, check_attention, check_heads, cut_attention, layer_heads, suffix_regions
from .regions import PromptRegions

log = logging.getLogger(__name__)

Positions = Literal["eoi", "all"] | Sequence[int]
TOP_KS = (1, 2, 4, 8, 16)


def share_restored(patched: Tensor, source: Tensor, dest: Tensor) -> Tensor:
    """``(patched - dest) / (source - dest)``, float64, NaN where ``source == dest``
    (nothing to restore). Arguments broadcast; ``source`` is the run patched from."""
    patched, source, dest = (torch.as_tensor(x, dtype=torch.float64) for x in (patched, source, dest))
    gap = source - dest
    return torch.where(gap != 0, (patched - dest) / torch.where(gap != 0, gap, 1.0), torch.nan)


def check_layer(cm: ChatModel, layer: int) -> int:
    if not 0 <= int(layer) < cm.n_layers:
        raise UserError(f"direction layer {layer} out of range: the projection is read at "
                        f"blocks.{{layer}}.hook_resid_pre, layer 0 .. {cm.n_layers - 1}")
    return int(layer)


@torch.no_grad()
def last_position_run(cm: ChatModel, batch: dict[str, Tensor], unit: Tensor, layer: int, hooks: HookList | None = None,
                      z_layers: Sequence[int] = (), z_positions: Sequence[int] | None = None,
                      ) -> tuple[Tensor, Tensor, dict[int, Tensor]]:
    """One forward pass of ``batch`` (left-padded ``[batch, pos]``) with ``hooks``.

    Returns the refusal score ``[batch]`` of the last position's logits, the projection
    ``[batch]`` of ``blocks.{layer}.hook_resid_pre`` at the last position on ``unit``
    (float32, CPU), and ``blocks.{l}.attn.hook_z`` at ``z_positions`` for ``z_layers``:
    ``{l: [batch, n_positions, n_heads, d_head]}`` on the model's device.
    """
    resid = Recorder([f"blocks.{layer}.hook_resid_pre"], positions=[-1], device=cm.device)
    z = Recorder([f"blocks.{l}.attn.hook_z" for l in z_layers], positions=z_positions, device=cm.device)
    mask = batch["attention_mask"].to(cm.device)
    with ExitStack() as stack:
        stack.enter_context(resid.recording(cm))
        if z_layers:
            stack.enter_context(z.recording(cm))
        stack.enter_context(run_with_hooks(cm, hooks or []))
        logits = cm.model(input_ids=batch["input_ids"].to(cm.device), attention_mask=mask,
                          position_ids=position_ids(mask), use_cache=False, logits_to_keep=1).logits[:, -1]
    proj = resid[f"blocks.{layer}.hook_resid_pre"][:, 0].float() @ unit
    recorded = {l: z[f"blocks.{l}.attn.hook_z"] for l in z_layers}
    return refusal_score(logits, cm.refusal_ids).cpu(), proj.cpu(), recorded


def patch_z_hooks(recorded: dict[int, Tensor], heads: Sequence[tuple[int, int]], positions: Sequence[int]) -> HookList:
    """Hooks that write ``recorded[l][:, :, h]`` (``[batch, n_positions, n_heads, d_head]``,
    from :func:`last_position_run`) into ``blocks.{l}.attn.hook_z`` at ``positions``
    (negative, from the end) for each ``(l, h)`` in ``heads``."""
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        by_layer.setdefault(l, []).append(h)
    pos = torch.tensor(list(positions))

    def hook(layer: int, hs: list[int]):
        def patch(z: Tensor, point) -> Tensor:
            src = recorded[layer]
            if src.shape[0] != z.shape[0]:
                raise UserError(f"patching {src.shape[0]} recorded rows into a run of {z.shape[0]}; run the same prompts")
            idx = (pos.to(z.device) % z.shape[1])[:, None]  # [n_positions, 1]
            h = torch.tensor(hs, device=z.device)[None, :]  # [1, n_heads patched]
            out = z.clone()
            out[:, idx, h] = src[:, :, hs].to(z.device, z.dtype)
            return out
        return patch

    return [(f"blocks.{l}.attn.hook_z", hook(l, hs)) for l, hs in by_layer.items()]


def _positions(cm: ChatModel, positions: Positions, a: dict[str, Tensor], b: dict[str, Tensor]) -> list[int]:
    """Negative positions valid in both batches."""
    if isinstance(positions, str):
        if positions == "eoi":
            return cm.chat.eoi_positions
        if positions == "all":
            if not torch.equal(a["attention_mask"], b["attention_mask"]):
                raise UserError("positions='all' needs source and destination prompts of the same token lengths; "
                                "patch at 'eoi' or at negative positions common to both")
            return list(range(-a["input_ids"].shape[1], 0))
        raise UserError(f"positions must be 'eoi', 'all' or negative positions, got {positions!r}")
    out = [int(p) for p in positions]
    shortest = int(min(a["attention_mask"].sum(1).min(), b["attention_mask"].sum(1).min()))
    if not out or any(not -shortest <= p < 0 for p in out) or len(set(out)) != len(out):
        raise UserError(f"positions must be distinct negative positions in -{shortest} .. -1 (the shortest prompt), "
                        f"got {positions!r}")
    return out


def _ranking(ranking: pd.DataFrame | Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    if isinstance(ranking, pd.DataFrame):
        if not {"layer", "head"} <= set(ranking.columns):
            raise UserError("a ranking DataFrame needs columns layer and head (as rank_heads returns)")
        return [(int(l), int(h)) for l, h in zip(ranking["layer"], ranking["head"])]
    return [tuple(x) for x in ranking]


def _patch_sets(cm: ChatModel, instructions: Sequence[str], suffixes, direction: Tensor, layer: int,
                head_sets: list[list[tuple[int, int]]], source_suffixes, positions: Positions, batch_size: int,
                progress: bool) -> pd.DataFrame:
    """Both patch directions for every head set; the two plain runs are shared by all sets."""
    instructions, suffixes = prompts(instructions, suffixes)
    _, source_suffixes = prompts(instructions, source_suffixes)
    unit, layer = unit_direction(cm, direction), check_layer(cm, layer)
    suffix_regions(cm, instructions, suffixes)  # a suffix without tokens of its own is an error
    z_layers = sorted({l for hs in head_sets for l, _ in hs})
    rows = []
    parts = list(batch_slices(len(instructions), batch_size))
    for part in tqdm(parts, desc="patching", disable=not progress):
        src = cm.chat.encode(instructions[part], source_suffixes[part])
        dst = cm.chat.encode(instructions[part], suffixes[part])
        pos = _positions(cm, positions, src, dst)
        plain = {name: last_position_run(cm, b, unit, layer, z_layers=z_layers, z_positions=pos)
                 for name, b in (("source", src), ("dest", dst))}
        for hs in head_sets:
            for a, b in (("source", "dest"), ("dest", "source")):  # patch a's heads into b
                batch = dst if b == "dest" else src
                score, proj, _ = last_position_run(cm, batch, unit, layer, patch_z_hooks(plain[a][2], hs, pos))
                (score_a, proj_a, _), (score_b, proj_b, _) = plain[a], plain[b]
                for i in range(len(score)):
                    rows.append({"prompt": part.start + i, "patch": f"{a}->{b}", "n_heads": len(hs),
                                 "score_from": float(score_a[i]), "score_into": float(score_b[i]),
                                 "score_patched": float(score[i]),
                                 "score_restored": float(share_restored(score[i], score_a[i], score_b[i])),
                                 "projection_from": float(proj_a[i]), "projection_into": float(proj_b[i]),
                                 "projection_patched": float(proj[i]),
                                 "projection_restored": float(share_restored(proj[i], proj_a[i], proj_b[i]))})
    df = pd.DataFrame(rows).sort_values(["n_heads", "patch", "prompt"], kind="stable", ignore_index=True)
    df.insert(3, "hook", f"blocks.{layer}.hook_resid_pre")
    return df


def patch_heads(
    cm: ChatModel,
    instructions: Sequence[str],
    suffixes: str | Sequence[str | None],
    direction: Tensor,
    layer: int,
    heads: Sequence[tuple[int, int]],
    source_suffixes: str | Sequence[str | None] | None = None,
    positions: Positions = "eoi",
    batch_size: int = 8,
    progress: bool = False,
) -> pd.DataFrame:
    """Patch ``heads`` (``[(layer, head)]``) between the source prompts
    ``render(instruction, source_suffix)`` (default: no suffix) and the destination prompts
    ``render(instruction, suffix)``, both ways, at ``positions`` (``"eoi"``, ``"all"`` for
    prompts of equal lengths, or negative positions).

    Returns one row per prompt and ``patch`` (``n_heads`` = len(heads); ``source->dest``: the source's heads written
    into the destination run; ``dest->source``: the reverse): ``score_from``,
    ``score_into``, ``score_patched``, ``score_restored`` (the share restored), and the same
    four for ``projection`` on ``direction`` ``[d_model]`` at ``hook`` =
    ``blocks.{layer}.hook_resid_pre``, last position.
    """
    hs = check_heads(cm, heads)
    return _patch_sets(cm, instructions, suffixes, direction, layer, [hs], source_suffixes, positions,
                       batch_size, progress)


def patch_top_heads(
    cm: ChatModel,
    instructions: Sequence[str],
    suffixes: str | Sequence[str | None],
    direction: Tensor,
    layer: int,
    ranking: pd.DataFrame | Sequence[tuple[int, int]],
    ks: Sequence[int] = TOP_KS,
    source_suffixes: str | Sequence[str | None] | None = None,
    positions: Positions = "eoi",
    batch_size: int = 8,
    progress: bool = False,
) -> pd.DataFrame:
    """:func:`patch_heads` for the ``k`` first heads of ``ranking`` (``rank_heads``'s
    DataFrame or ``[(layer, head)]``), each ``k`` in ``ks``; a ``k`` beyond the ranking's
    length is left out. Rows as :func:`patch_heads` with ``n_heads`` = k."""
    ranked = check_heads(cm, _ranking(ranking))
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise UserError(f"ks must be positive head counts, got {ks!r}")
    kept = [k for k in ks if k <= len(ranked)]
    if not kept:
        raise UserError(f"the ranking has {len(ranked)} heads, fewer than every k in {ks}")
    if len(kept) < len(ks):
        log.info("the ranking has %d heads: k = %s left out", len(ranked), [k for k in ks if k > len(ranked)])
    return _patch_sets(cm, instructions, suffixes, direction, layer, [ranked[:k] for k in kept], source_suffixes,
                       positions, batch_size, progress)


# --- knockout ---------------------------------------------------------------------------------

def suffix_cut(cm: ChatModel, regions: Sequence[PromptRegions], layers: Sequence[int] | None = None,
               heads: Sequence[tuple[int, int]] | None = None) -> AttentionCut:
    """The cut that hides each prompt's suffix keys from its EOI queries and every later one,
    for the batch ``regions`` were made for (one ``prompt_regions`` call), in every layer,
    a band of ``layers``, or ``heads`` only."""
    where = layer_heads(cm, layers, heads)
    width = batch_width(regions)
    keys = torch.zeros(len(regions), width, dtype=torch.bool)
    for b, reg in enumerate(regions):
        start, end = reg.padded("suffix")
        keys[b, start:end] = True
    return AttentionCut(keys=keys, queries_from=torch.full((len(regions),), width - cm.chat.n_eoi), heads=where)


@contextmanager
def suffix_knockout(cm: ChatModel, instructions: Sequence[str], suffixes: str | Sequence[str | None],
                    layers: Sequence[int] | None = None, heads: Sequence[tuple[int, int]] | None = None,
                    ) -> Iterator[dict[str, Tensor]]:
    """Inside the block, the EOI positions and every later one (generated tokens) do not
    attend to the suffix, in every layer, a band of ``layers``, or ``heads`` only.

    Yields the left-padded batch (``input_ids``, ``attention_mask`` ``[batch, pos]``) the
    knockout is made for: pass exactly it to ``cm.model(...)`` or
    ``cm.model.generate(**batch, ...)`` (one sequence per prompt; the prompt rows must not
    change).
    """
    check_attention(cm)
    instructions, suffixes = prompts(instructions, suffixes)
    regions = suffix_regions(cm, instructions, suffixes)
    cut = suffix_cut(cm, regions, layers, heads)
    batch = cm.chat.encode(instructions, suffixes, device=cm.device)
    with cut_attention(cm, cut):
        yield batch


def knockout_scores(
    cm: ChatModel,
    instructions: Sequence[str],
    suffixes: str | Sequence[str | None],
    layers: Sequence[int] | None = None,
    heads: Sequence[tuple[int, int]] | None = None,
    direction: Tensor | None = None,
    layer: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> pd.DataFrame:
    """The refusal score at the last position with and without the EOI -> suffix knockout.

    One row per prompt: ``score_plain``, ``score_knockout``; with ``direction`` ``[d_model]``
    and ``layer``, also ``projection_plain``, ``projection_knockout`` at ``hook`` =
    ``blocks.{layer}.hook_resid_pre``, last position.
    """
    check_attention(cm)
    layer_heads(cm, layers, heads)  # bad layers or heads fail before any pass
    instructions, suffixes = prompts(instructions, suffixes)
    if (direction is None) != (layer is None):
        raise UserError("pass both direction and layer for projections, or neither")
    unit = unit_direction(cm, direction) if direction is not None else torch.zeros(cm.d_model, device=cm.device)
    read = check_layer(cm, layer) if layer is not None else 0
    rows = []
    parts = list(batch_slices(len(instructions), batch_size))
    for part in tqdm(parts, desc="knockout", disable=not progress):
        with suffix_knockout(cm, instructions[part], suffixes[part], layers, heads) as batch:
            ko = last_position_run(cm, batch, unit, read)
        plain = last_position_run(cm, batch, unit, read)
        for i in range(len(ko[0])):
            row = {"prompt": part.start + i, "score_plain": float(plain[0][i]), "score_knockout": float(ko[0][i])}
            if direction is not None:
                row.update(hook=f"blocks.{read}.hook_resid_pre", projection_plain=float(plain[1][i]),
                           projection_knockout=float(ko[1][i]))
            rows.append(row)
    return pd.DataFrame(rows)
