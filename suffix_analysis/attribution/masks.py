"""Attention-mask edits: cut chosen key positions from chosen queries, per layer or per head.

A cut says, per batch row, which key positions (``keys``, ``[batch, width]`` in the
left-padded prompt's coordinates) are hidden from every query at or after
``queries_from[row]`` (absolute positions in the same coordinates, generated tokens
included). It is applied by editing the attention mask each attention module receives
(a forward pre-hook on ``cm.arch.attn``), so the probabilities the softmax gives the
remaining keys are renormalized exactly as for padding:

* ``transformers`` passes a 4D mask through unchanged (``masking_utils``): a boolean one
  (``sdpa``: True = attend) gets ``mask & ~cut``, an additive float one (``eager``) gets
  the dtype's minimum at the cut entries; sdpa's ``None`` (the plain causal mask it leaves
  to ``is_causal``) is materialized first.
* A per-head cut is a ``[batch, n_heads, q, kv]`` mask: eager attention adds it to the
  ``[batch, n_heads, q, kv]`` scores, sdpa broadcasts it over the query heads (keys and
  values repeated per query head, or packed per key/value head for one query token,
  consistently with the mask). So per-head knockout is the exact "zero that head's pattern
  entries and renormalize", no recomputation needed.

Only ``eager`` and ``sdpa`` attention take such a mask; flash attention and flex attention
do not, and are refused. Keys at or beyond ``width`` (generated tokens) are never cut.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UserError
from ..models.loading import ChatModel
from .regions import PromptRegions, prompt_regions
from .writers import n_heads

EDITABLE = ("eager", "sdpa")


@dataclass(frozen=True)
class AttentionCut:
    """Hide ``keys`` from the queries at or after ``queries_from``, in some layers or heads.

    ``keys``: ``[batch, width]`` bool, positions in the left-padded batch of width ``width``.
    ``queries_from``: ``[batch]`` long, the first query position of each row that loses them.
    ``heads``: per layer, the heads cut (``None``: every head); layers absent are left alone.
    """

    keys: Tensor
    queries_from: Tensor
    heads: dict[int, tuple[int, ...] | None]

    @property
    def width(self) -> int:
        return self.keys.shape[1]


def check_attention(cm: ChatModel) -> None:
    """Refuse attention implementations whose mask cannot be edited (before any pass)."""
    impl = cm.model.config._attn_implementation
    if impl not in EDITABLE:
        raise UserError(f"{cm.model.config.model_type} runs attention with '{impl}', which takes no editable "
                        "attention mask; knockouts need eager or sdpa attention: load the model with "
                        "attn_implementation='eager' or call cm.model.set_attn_implementation('eager')")


def check_layers(cm: ChatModel, layers: Sequence[int]) -> list[int]:
    out = [int(l) for l in layers]
    if not out or any(not 0 <= l < cm.n_layers for l in out):
        raise UserError(f"layers must be a non-empty list in 0 .. {cm.n_layers - 1}, got {list(layers)!r}")
    return out


def check_heads(cm: ChatModel, heads: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """``[(layer, head)]`` as ints, each in range, without duplicates, or a clear error."""
    h = n_heads(cm)
    out = []
    for item in heads:
        try:
            l, k = (int(x) for x in item)
        except (TypeError, ValueError):
            raise UserError(f"heads must be (layer, head) pairs, got {item!r}") from None
        if not (0 <= l < cm.n_layers and 0 <= k < h):
            raise UserError(f"head ({l}, {k}) is out of range: layers are 0 .. {cm.n_layers - 1}, heads 0 .. {h - 1}")
        out.append((l, k))
    if not out:
        raise UserError("no heads given; pass at least one (layer, head)")
    if len(set(out)) != len(out):
        raise UserError(f"heads listed twice in {out}; pass each (layer, head) once")
    return out


def layer_heads(cm: ChatModel, layers: Sequence[int] | None = None, heads: Sequence[tuple[int, int]] | None = None,
                ) -> dict[int, tuple[int, ...] | None]:
    """Where a cut applies: every layer (both None), a band of ``layers``, or ``heads`` only."""
    if layers is not None and heads is not None:
        raise UserError("pass layers (a band, every head) or heads ((layer, head) pairs), not both")
    if heads is not None:
        out: dict[int, list[int]] = {}
        for l, k in check_heads(cm, heads):
            out.setdefault(l, []).append(k)
        return {l: tuple(sorted(ks)) for l, ks in out.items()}
    return {l: None for l in (range(cm.n_layers) if layers is None else check_layers(cm, layers))}


def suffix_regions(cm: ChatModel, instructions: list[str], suffixes: list[str | None]) -> list[PromptRegions]:
    """The regions of each prompt (``pad`` for their left-padded batch); every suffix must
    keep at least one token of its own."""
    regions = prompt_regions(cm.chat, instructions, suffixes)
    for i, (reg, suffix) in enumerate(zip(regions, suffixes)):
        start, end = reg.spans["suffix"]
        if end == start:
            raise UserError(f"the suffix {suffix!r} of prompt {i} has no tokens of its own (empty, or merged into "
                            "the instruction's last token); pass a non-empty suffix")
    return regions


def batch_width(regions: Sequence[PromptRegions]) -> int:
    widths = {r.pad + r.length for r in regions}
    if len(widths) != 1:
        raise UserError("these regions come from different batches; make them with one prompt_regions call")
    return widths.pop()


def _key_cut(cut: AttentionCut, rows: int, k_abs: Tensor, q_abs: Tensor) -> Tensor:
    """``[batch, q, kv]`` bool: True where the query may no longer see the key."""
    keys = torch.zeros(rows, k_abs.numel(), dtype=torch.bool, device=k_abs.device)
    inside = (k_abs >= 0) & (k_abs < cut.width)
    keys[:, inside] = cut.keys.to(k_abs.device)[:, k_abs[inside]]
    late = q_abs[None, :] >= cut.queries_from.to(q_abs.device)[:, None]  # [batch, q]
    return late[:, :, None] & keys[:, None, :]


def _causal(q_abs: Tensor, k_abs: Tensor) -> Tensor:
    """The plain causal mask ``[1, 1, q, kv]`` that sdpa leaves to ``is_causal`` (mask None)."""
    return (k_abs[None, :] <= q_abs[:, None])[None, None]


def _pre_hook(cm: ChatModel, layer: int, cut: AttentionCut, heads: tuple[int, ...] | None):
    n_h = n_heads(cm)

    def edit(module, args, kwargs):
        impl = cm.model.config._attn_implementation
        if impl not in EDITABLE:  # switched after the cut was made
            check_attention(cm)
        if "attention_mask" not in kwargs:
            raise UserError(f"{cm.model.config.model_type}: the attention of layer {layer} is not given its mask as "
                            "attention_mask, so this architecture cannot take a knockout")
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        rows, q_len = hidden.shape[:2]
        if rows != cut.keys.shape[0]:
            raise UserError(f"the knockout was made for {cut.keys.shape[0]} prompts but the model runs {rows} rows; "
                            "generate one sequence per prompt (no beams or num_return_sequences) under a knockout")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        idx = getattr(module, "layer_idx", layer)
        past = cache.get_seq_length(idx) if cache is not None else 0
        kv_len, kv_offset = cache.get_mask_sizes(q_len, idx) if cache is not None else (q_len, 0)
        if past == 0 and q_len < cut.width:
            raise UserError(f"the knockout was made for a batch of width {cut.width}, but the model runs {q_len} "
                            "positions; make it from prompt_regions of the same prompts, encoded together")
        mask = kwargs["attention_mask"]
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.ndim != 4 or mask.shape[-2] != q_len:
                raise UserError(f"{cm.model.config.model_type}: the attention mask of layer {layer} is not a "
                                "[batch, heads, q, kv] tensor; load the model with attn_implementation='eager'")
            kv_len = mask.shape[-1]
        device = hidden.device
        q_abs = past + torch.arange(q_len, device=device)
        k_abs = kv_offset + torch.arange(kv_len, device=device)
        hit = _key_cut(cut, rows, k_abs, q_abs)[:, None]  # [batch, 1, q, kv]
        if heads is not None:
            chosen = torch.zeros(n_h, dtype=torch.bool, device=device)
            chosen[list(heads)] = True
            hit = hit & chosen[None, :, None, None]  # [batch, n_heads, q, kv]
        if mask is None:
            mask = _causal(q_abs, k_abs)
            if impl == "eager":  # never seen (eager always gets a mask), kept for a consistent dtype
                mask = torch.zeros(mask.shape, dtype=hidden.dtype, device=device).masked_fill(
                    ~mask, torch.finfo(hidden.dtype).min)
        if mask.dtype == torch.bool:
            new = mask & ~hit
        else:
            new = mask.masked_fill(hit, torch.finfo(mask.dtype).min)
        return args, {**kwargs, "attention_mask": new}

    return edit


@contextmanager
def cut_attention(cm: ChatModel, cut: AttentionCut) -> Iterator[AttentionCut]:
    """Apply ``cut`` to every forward pass of ``cm.model`` inside the block (``generate``
    and key/value caches included); removed on exit."""
    check_attention(cm)
    handles = []
    try:
        for layer, heads in cut.heads.items():
            attn = cm.layers[layer].get_submodule(cm.arch.attn)
            handles.append(attn.register_forward_pre_hook(_pre_hook(cm, layer, cut, heads), with_kwargs=True))
        yield cut
    finally:
        for h in handles:
            h.remove()
