"""Attention hijacking: how much of what attention writes at the EOI positions comes from the suffix.

After Ben-Tov, Geva and Sharif (2025), who find universal suffixes dominate the attention
output at the last template tokens. Head ``h`` of layer ``l`` writes, from source ``i`` to
destination ``j``::

    Y[l, h, i -> j] = A[l, h, j, i] * (v[l, i, h] @ W_O[l, h])          [d_model]

with ``A`` the attention pattern (``attn.hook_pattern``) and ``v`` the value vectors
(``v_proj``'s output, repeated per query head under grouped-query attention). Summed over
sources and heads it is the attention output before the output projection's bias,
``Y[l, *, * -> j]``. For a region ``T`` (``regions.py``: template, instruction, suffix,
eoi) this module gives, per layer, destination, region and head:

* ``mass``: attention probability from ``j`` to the tokens of ``T``;
* ``share``: ``<sum_{i in T} Y[l, h, i -> j], Y[l, *, * -> j]> / ||Y[l, *, * -> j]||**2``;
  summed over heads it is the *dominance* of ``T``; dominances of all regions sum to 1;
* ``head_dominance``: the same within one head, ``<Y_T,h, Y_*,h> / ||Y_*,h||**2``, summing
  to 1 over regions for each head;
* ``projection``: ``sum_{i in T} Y[l, h, i -> j] . r^``.

Only the destination rows are computed: sources are summed per region before ``W_O``
(``sum_{i in T} A v`` first), so memory is linear in the prompt length, never ``[T, T]``
(the model's own eager attention still forms its ``[T, T]`` scores, transiently, per
layer). On Gemma-2/3, ``Y`` is taken as the residual stream receives it, through the
post-attention RMSNorm at its per-position scale of this pass (``writers.py``); ``Y``'s
sum is then ``hook_attn_out`` minus the bias as it comes through the norm.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from ..errors import UserError
from ..models.hooks import Recorder
from ..models.loading import ChatModel
from .batches import batch_slices, forward, prompts, unit_direction
from .frames import tidy
from .regions import REGIONS, PromptRegions, prompt_regions, region_masks
from .writers import PostNorm, head_weights, output_bias, post_norm, recording_values, value_proj


def per_source_writes(pattern: Tensor, values: Tensor, w_o: Tensor) -> Tensor:
    """``Y[b, j, h, i] = A[b, h, j, i] * (v[b, i, h] @ W_O[h])``: ``[batch, n_dest, n_heads, pos, d_model]``.

    ``pattern`` ``[batch, n_heads, n_dest, pos]`` (the destination rows only), ``values``
    ``[batch, pos, n_heads, d_head]``, ``w_o`` ``[n_heads, d_head, d_model]``. Memory is
    ``n_dest * n_heads * pos * d_model`` per row: for a few rows of one layer; prefer
    :func:`region_writes` for anything batched.
    """
    vo = torch.einsum("bihd,hde->bhie", values, w_o)  # each source's value through its head's W_O
    return (pattern.unsqueeze(-1) * vo.unsqueeze(2)).transpose(1, 2)


def region_writes(pattern: Tensor, values: Tensor, w_o: Tensor, masks: Tensor) -> Tensor:
    """``sum_{i in T} Y[b, j, h, i]`` per region: ``[batch, n_dest, n_regions, n_heads, d_model]``.

    As :func:`per_source_writes` with ``masks`` ``[batch, n_regions, pos]``; sums the
    value vectors first, so no per-source ``d_model`` vector is formed.
    """
    z = torch.einsum("bhji,bri,bihd->bjrhd", pattern, masks.to(pattern.dtype), values)
    return torch.einsum("bjrhd,hde->bjrhe", z, w_o)


@dataclass
class Hijack:
    """Region-level attention writes at the destination positions, float32 on the CPU.

    Tensors ``[n_prompts, n_layers, n_dest, n_regions, n_heads]`` along ``layers``,
    ``destinations`` (negative positions), :data:`REGIONS` and heads.
    """

    layers: list[int]
    destinations: list[int]
    regions: list[PromptRegions]  # per prompt, ``pad`` relative to its own batch
    mass: Tensor  # attention probability to the region's tokens
    share: Tensor  # <Y_T,h, Y> / ||Y||^2: sums to 1 over regions and heads
    head_dominance: Tensor  # <Y_T,h, Y_h> / ||Y_h||^2: sums to 1 over regions, per head
    write_norm: Tensor  # [n_prompts, n_layers, n_dest]: ||Y||, the attention write without bias
    projection: Tensor | None = None  # Y_T,h . r^ (with a direction)
    source_projection: list[Tensor] | None = None  # per prompt [n_layers, n_dest, n_heads, length]: Y_i,h . r^

    @property
    def dominance(self) -> Tensor:
        """``[n_prompts, n_layers, n_dest, n_regions]``: the regions' dominance; sums to 1 over regions."""
        return self.share.sum(-1)

    def frame(self) -> pd.DataFrame:
        """Rows ``prompt, layer, destination, region, head`` with ``mass, share, head_dominance``
        (and ``projection``)."""
        n = self.mass.shape[0]
        axes = [("prompt", range(n)), ("layer", self.layers), ("destination", self.destinations),
                ("region", REGIONS), ("head", range(self.mass.shape[-1]))]
        df = tidy(self.mass, axes, value="mass")
        df["share"] = tidy(self.share, axes)["value"]
        df["head_dominance"] = tidy(self.head_dominance, axes)["value"]
        if self.projection is not None:
            df["projection"] = tidy(self.projection, axes)["value"]
        return df


def _destinations(cm: ChatModel, destinations: str | Sequence[int]) -> list[int]:
    n = cm.chat.n_eoi
    if destinations == "eoi":
        return cm.chat.eoi_positions
    if destinations == "last":
        return [-1]
    out = [int(d) for d in destinations] if not isinstance(destinations, str) else []
    if not out or any(not -n <= d < 0 for d in out) or len(set(out)) != len(out):
        raise UserError(f"destinations must be 'eoi', 'last' or distinct EOI positions -{n} .. -1, got {destinations!r}")
    return out


def _layers(cm: ChatModel, layers: Sequence[int] | None) -> list[int]:
    out = list(range(cm.n_layers)) if layers is None else [int(l) for l in layers]
    if not out or any(not 0 <= l < cm.n_layers for l in out):
        raise UserError(f"layers must be in 0 .. {cm.n_layers - 1}, got {layers!r}")
    return out


def _capture(cm: ChatModel, instructions: list[str], suffixes: list[str | None], layers: list[int],
             destinations: list[int]) -> tuple[dict[str, Tensor], Recorder, dict[int, Tensor]]:
    """One forward pass: the batch, the destination rows of each layer's pattern, the value vectors."""
    batch = cm.chat.encode(instructions, suffixes)
    rec = Recorder([f"blocks.{l}.attn.hook_pattern" for l in layers], positions=destinations, device=cm.device)
    with ExitStack() as stack:
        values = stack.enter_context(recording_values(cm, layers))
        stack.enter_context(rec.recording(cm))
        forward(cm, batch)
    return batch, rec, values


def _in_residual(norm: PostNorm | None, bias: Tensor, y_heads: Tensor) -> Tensor | None:
    """The post-norm's elementwise factor ``[batch, n_dest, d_model]`` (None without a
    post-norm), from the pre-norm head writes ``y_heads`` ``[batch, n_dest, n_heads, d_model]``."""
    if norm is None:
        return None
    # the norm's per-position scale, from the output it sees: every head's write plus the bias
    return norm.scale(y_heads.sum(2) + bias) * norm.gain


@torch.no_grad()
def attention_hijack(
    cm: ChatModel,
    instructions: Sequence[str],
    suffixes: str | Sequence[str | None] | None = None,
    direction: Tensor | None = None,
    layers: Sequence[int] | None = None,
    destinations: str | Sequence[int] = "eoi",
    batch_size: int = 8,
) -> Hijack:
    """Mass, dominance and (with ``direction`` ``[d_model]``) projection of every region's
    attention write at ``destinations`` (``"eoi"``: every EOI position, ``"last"``: -1, or a
    list of EOI positions), for ``layers`` (default all), one forward pass per batch.

    Peak memory per batch and layer is ``batch * n_dest * n_regions * n_heads * d_model``
    floats: lower ``batch_size`` for wide models.
    """
    instructions, suffixes = prompts(instructions, suffixes)
    layers, dests = _layers(cm, layers), _destinations(cm, destinations)
    unit = None if direction is None else unit_direction(cm, direction)
    for l in layers:  # refuse what cannot be decomposed before any forward pass
        value_proj(cm, l)
    norms = {l: (post_norm(cm, l), output_bias(cm, l)) for l in layers}
    tiny = torch.finfo(torch.float32).tiny
    keys = ("mass", "share", "head_dominance", "write_norm") + (() if unit is None else ("projection",))
    out: dict[str, list[Tensor]] = {k: [] for k in keys}
    all_regions: list[PromptRegions] = []
    source_proj: list[Tensor] = []
    for part in batch_slices(len(instructions), batch_size):
        regs = prompt_regions(cm.chat, instructions[part], suffixes[part])
        batch, rec, values = _capture(cm, instructions[part], suffixes[part], layers, dests)
        masks = region_masks(regs, batch["input_ids"].shape[1], cm.device).float()  # [batch, n_regions, pos]
        per_layer: dict[str, list[Tensor]] = {k: [] for k in keys}
        src: list[Tensor] = []
        for l in layers:
            a = rec[f"blocks.{l}.attn.hook_pattern"].float()  # [batch, n_heads, n_dest, pos]
            v, w = values[l], head_weights(cm, l)
            y_heads = torch.einsum("bjhd,hde->bjhe", torch.einsum("bhji,bihd->bjhd", a, v), w)  # [batch, n_dest, n_heads, d]
            y_regions = region_writes(a, v, w, masks)  # [batch, n_dest, n_regions, n_heads, d_model]
            factor = _in_residual(*norms[l], y_heads)
            if factor is not None:
                y_heads, y_regions = y_heads * factor[:, :, None], y_regions * factor[:, :, None, None]
            y = y_heads.sum(2)  # [batch, n_dest, d_model]
            per_layer["mass"].append(torch.einsum("bhji,bri->bjrh", a, masks))
            per_layer["share"].append(torch.einsum("bjrhe,bje->bjrh", y_regions, y)
                                      / (y * y).sum(-1).clamp_min(tiny)[:, :, None, None])
            per_layer["head_dominance"].append(torch.einsum("bjrhe,bjhe->bjrh", y_regions, y_heads)
                                               / (y_heads * y_heads).sum(-1).clamp_min(tiny)[:, :, None])
            per_layer["write_norm"].append(y.norm(dim=-1))
            if unit is not None:
                per_layer["projection"].append(y_regions @ unit)
                # per source: A * (v . W_O[h] r_in), with r_in = r^ (times the post-norm's factor)
                if factor is None:
                    src.append(torch.einsum("bhji,bihd,hd->bjhi", a, v, w @ unit))
                else:
                    w_r = torch.einsum("hde,bje->bjhd", w, factor * unit)  # per row and destination
                    src.append(torch.einsum("bhji,bihd,bjhd->bjhi", a, v, w_r))
        for k in keys:
            out[k].append(torch.stack(per_layer[k], 1).cpu())
        if unit is not None:
            stacked = torch.stack(src, 1).cpu()  # [batch, n_layers, n_dest, n_heads, pos]
            source_proj += [stacked[b, ..., r.pad:] for b, r in enumerate(regs)]
        all_regions += regs
    res = {k: torch.cat(v) for k, v in out.items()}
    return Hijack(layers=layers, destinations=dests, regions=all_regions, source_projection=source_proj or None, **res)


@torch.no_grad()
def source_writes(
    cm: ChatModel,
    instruction: str,
    layer: int,
    suffix: str | None = None,
    destinations: str | Sequence[int] = "eoi",
) -> tuple[Tensor, PromptRegions]:
    """Every source's write ``Y[h, i -> j]`` of one prompt and layer, as the residual stream
    receives it: ``[n_dest, n_heads, length, d_model]`` float32 on the CPU, with the
    prompt's regions. Linear in the prompt length; for inspecting one prompt."""
    (l,), dests = _layers(cm, [layer]), _destinations(cm, destinations)
    value_proj(cm, l)
    regs = prompt_regions(cm.chat, [instruction], [suffix])
    _, rec, values = _capture(cm, [instruction], [suffix], [l], dests)
    a, v, w = rec[f"blocks.{l}.attn.hook_pattern"].float(), values[l], head_weights(cm, l)
    y = per_source_writes(a, v, w)  # [1, n_dest, n_heads, pos, d_model]
    factor = _in_residual(post_norm(cm, l), output_bias(cm, l), y.sum(3))
    if factor is not None:
        y = y * factor[:, :, None, None]
    return y[0].cpu(), regs[0]
