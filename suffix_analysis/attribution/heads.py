"""Direct attribution of the refusal direction to the components that write it.

The residual stream at an EOI position is a sum of writes: the embedding
(``blocks.0.hook_resid_pre``), then per layer every attention head's output through
``W_O``, the output projection's bias, and the MLP's output (``hook_mlp_out``, its own
biases included). Projecting each write onto the unit direction ``r^`` splits the
projection of ``blocks.{l}.hook_resid_pre`` (and ``hook_resid_post``) into parts that add
up to it exactly::

    resid_pre[l] . r^  = embed + sum_{l' < l} (sum_h heads[l', h] + attn_bias[l'] + mlp[l'])
    resid_post[l] . r^ = resid_pre[l] . r^ + sum_h heads[l, h] + attn_bias[l] + mlp[l]

On Gemma-2/3 the heads and the bias are taken through the post-attention RMSNorm with its
per-position scale of this pass (``writers.py`` explains why that is exact for the sum).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch
from torch import Tensor

from ..errors import UserError
from ..models.hooks import hook_names
from ..models.loading import ChatModel
from .batches import in_order, prompts, recorded, unit_direction
from .frames import tidy
from .writers import PostNorm, head_weights, output_bias, post_norm


@dataclass
class DirectAttribution:
    """Projections onto ``r^`` at the EOI positions, float32 on the CPU.

    ``positions`` are the EOI positions (negative, -n_eoi .. -1) along each last axis.
    """

    heads: Tensor  # [n_prompts, n_layers, n_heads, n_eoi] each head's output through W_O
    attn_bias: Tensor  # [n_prompts, n_layers, n_eoi] the output projection's bias (0 without one)
    mlp: Tensor  # [n_prompts, n_layers, n_eoi] hook_mlp_out
    embed: Tensor  # [n_prompts, n_eoi] blocks.0.hook_resid_pre
    resid_pre: Tensor  # [n_prompts, n_layers, n_eoi] blocks.{l}.hook_resid_pre, measured
    resid_post: Tensor  # [n_prompts, n_layers, n_eoi] blocks.{l}.hook_resid_post, measured
    positions: list[int]

    @property
    def attn(self) -> Tensor:
        """``[n_prompts, n_layers, n_eoi]`` attention's whole write (heads and bias)."""
        return self.heads.sum(2) + self.attn_bias

    def reconstructed(self, site: Literal["hook_resid_pre", "hook_resid_post"] = "hook_resid_pre") -> Tensor:
        """``[n_prompts, n_layers, n_eoi]`` the sum of the parts written before ``site``;
        equals ``resid_pre`` / ``resid_post`` up to float rounding."""
        per_layer = self.attn + self.mlp
        after = self.embed[:, None] + per_layer.cumsum(1)
        if site == "hook_resid_post":
            return after
        if site == "hook_resid_pre":
            return torch.cat([self.embed[:, None], after[:, :-1]], 1)
        raise UserError(f"site must be hook_resid_pre or hook_resid_post, got {site!r}")

    def frame(self) -> pd.DataFrame:
        """The heads as rows ``prompt, layer, head, position, projection``."""
        n, n_layers, n_h, _ = self.heads.shape
        return tidy(self.heads, [("prompt", range(n)), ("layer", range(n_layers)), ("head", range(n_h)),
                                 ("position", self.positions)], value="projection")


@dataclass(frozen=True)
class _Readout:
    """One layer's attention write read out along ``r^``: ``W_O[h] . r^`` per head, not ``W_O``
    itself (a float32 copy of every layer's ``W_O`` would not fit beside a large model)."""

    w_r: Tensor  # [n_heads, d_head]: W_O[h] @ r_in, r_in = r^ (times the post-norm's gain)
    b_r: Tensor  # []: bias . r_in
    norm: PostNorm | None
    o_proj: torch.nn.Module


def _readouts(cm: ChatModel, unit: Tensor) -> list[_Readout]:
    out = []
    for l in range(cm.n_layers):
        norm = post_norm(cm, l)  # raises for a model that cannot be decomposed, before any pass
        r_in = unit if norm is None else norm.gain * unit  # (gain * y) . r^ = y . (gain * r^)
        out.append(_Readout(head_weights(cm, l) @ r_in, output_bias(cm, l) @ r_in, norm,
                            cm.layers[l].get_submodule(cm.arch.o_proj)))
    return out


@torch.no_grad()
def _layer_parts(z: Tensor, ro: _Readout) -> tuple[Tensor, Tensor]:
    """Head parts ``[batch, n_eoi, n_heads]`` and bias part ``[batch, n_eoi]`` of one layer
    from its ``z`` ``[batch, n_eoi, n_heads, d_head]``."""
    heads = torch.einsum("bphd,hd->bph", z.float(), ro.w_r)
    if ro.norm is None:
        return heads, ro.b_r.expand(z.shape[:2])
    # the norm's scale comes from the output it saw: the output projection's, in the model's dtype
    scale = ro.norm.scale(ro.o_proj(z.flatten(2))).to(heads.device)  # [batch, n_eoi, 1], from o_proj's device
    return scale * heads, scale[..., 0] * ro.b_r


def direct_attribution(
    cm: ChatModel,
    instructions: Sequence[str],
    direction: Tensor,
    suffixes: str | Sequence[str | None] | None = None,
    batch_size: int = 16,
) -> DirectAttribution:
    """Each component's write onto ``direction`` ``[d_model]`` (made unit) at the EOI positions.

    One forward pass per batch records every layer's ``attn.hook_z``, ``hook_mlp_out`` and
    residual stream at the EOI positions only (:func:`~.batches.recorded`: the shared chat
    prefix is run once, prompts of similar length together).
    """
    instructions, suffixes = prompts(instructions, suffixes)
    unit = unit_direction(cm, direction)
    readouts = _readouts(cm, unit)
    names = hook_names(cm, ["hook_resid_pre", "hook_resid_post", "attn.hook_z", "hook_mlp_out"])
    parts: dict[str, list] = {k: [] for k in ("heads", "attn_bias", "mlp", "resid_pre", "resid_post")}
    for idx, rec in recorded(cm, instructions, suffixes, names, cm.chat.eoi_positions, batch_size):
        heads, bias = zip(*(_layer_parts(rec[f"blocks.{l}.attn.hook_z"], readouts[l]) for l in range(cm.n_layers)))
        parts["heads"].append((idx, torch.stack(heads, 1).transpose(2, 3).cpu()))  # [batch, n_layers, n_heads, n_eoi]
        parts["attn_bias"].append((idx, torch.stack(bias, 1).cpu()))
        for key, site in (("mlp", "hook_mlp_out"), ("resid_pre", "hook_resid_pre"), ("resid_post", "hook_resid_post")):
            parts[key].append((idx, torch.stack([rec[f"blocks.{l}.{site}"].float() @ unit
                                                 for l in range(cm.n_layers)], 1).cpu()))
    out = {k: in_order(v) for k, v in parts.items()}
    return DirectAttribution(embed=out["resid_pre"][:, 0].clone(), positions=cm.chat.eoi_positions, **out)


def rank_heads(
    attribution: DirectAttribution | Tensor,
    position: int = -1,
    order: Literal["largest", "smallest", "abs"] = "largest",
) -> pd.DataFrame:
    """Every head ranked by its mean projection over prompts at ``position`` (an EOI position).

    ``attribution`` is a :class:`DirectAttribution` or a heads tensor ``[n_prompts,
    n_layers, n_heads, n_eoi]`` (e.g. the difference of two, with and without a suffix).
    ``order``: ``largest`` first (writers of the direction), ``smallest`` first (writers
    against it, what a suppressing suffix recruits), or by ``abs`` value.
    Returns columns ``layer, head, mean, std`` in rank order.
    """
    heads = attribution.heads if isinstance(attribution, DirectAttribution) else attribution
    if heads.ndim != 4:
        raise UserError(f"heads must be [n_prompts, n_layers, n_heads, n_eoi], got shape {tuple(heads.shape)}")
    n_eoi = heads.shape[-1]
    if not -n_eoi <= position < 0:
        raise UserError(f"position {position} is not an EOI position; use -{n_eoi} .. -1")
    at = heads[..., position].double()  # [n_prompts, n_layers, n_heads]
    mean, std = at.mean(0), (at.std(0) if at.shape[0] > 1 else torch.zeros_like(at[0]))
    if order not in ("largest", "smallest", "abs"):
        raise UserError(f"order must be largest, smallest or abs, got {order!r}")
    key = {"largest": -mean, "smallest": mean, "abs": -mean.abs()}[order].reshape(-1)
    idx = torch.argsort(key, stable=True)
    n_h = mean.shape[1]
    return pd.DataFrame({"layer": (idx // n_h).numpy(), "head": (idx % n_h).numpy(),
                         "mean": mean.reshape(-1)[idx].numpy(), "std": std.reshape(-1)[idx].numpy()})


def top_heads(
    attribution: DirectAttribution | Tensor,
    k: int = 10,
    position: int = -1,
    order: Literal["largest", "smallest", "abs"] = "largest",
) -> list[tuple[int, int]]:
    """The ``k`` first ``(layer, head)`` of :func:`rank_heads`."""
    if k < 1:
        raise UserError(f"k must be at least 1, got {k}")
    ranked = rank_heads(attribution, position, order).head(k)
    return [(int(l), int(h)) for l, h in zip(ranked["layer"], ranked["head"])]
