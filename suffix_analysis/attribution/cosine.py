"""Cosine of the residual stream with the refusal direction, at every layer and EOI position.

Arditi et al. (Section 5) show a suffix's effect as the cosine of the EOI residual stream
with the refusal direction collapsing, layer by layer. One forward pass per batch after the
shared chat prefix, hooks only on the requested sites, only the EOI positions kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from torch import Tensor

from ..errors import UserError
from ..models.hooks import hook_names
from ..models.loading import ChatModel
from .batches import in_order, prompts, recorded, unit_direction
from .frames import tidy

# Sites whose activation lives in the residual stream's basis ([batch, pos, d_model]).
RESIDUAL_SITES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")


def residual_cosine(
    cm: ChatModel,
    instructions: Sequence[str],
    direction: Tensor,
    suffixes: str | Sequence[str | None] | None = None,
    sites: Sequence[str] = ("hook_resid_pre", "hook_resid_post"),
    batch_size: int = 16,
) -> Tensor:
    """Cosine similarity of each site's activation with ``direction`` ``[d_model]``.

    Prompts are ``chat.render(instruction, suffix)``; ``suffixes`` is one per instruction,
    one string for all, or None.

    Returns:
        ``[n_prompts, n_sites, n_layers, n_eoi]`` float32 on the CPU: prompt, site (in the
        order of ``sites``), layer, EOI position (``cm.chat.eoi_positions``, -n_eoi .. -1).
        :func:`cosine_frame` makes it a tidy DataFrame.
    """
    instructions, suffixes = prompts(instructions, suffixes)
    sites = tuple(sites)
    bad = [s for s in sites if s not in RESIDUAL_SITES]
    if bad or not sites:
        raise UserError(f"unknown residual site(s) {bad or '(none given)'}; use any of {', '.join(RESIDUAL_SITES)}")
    unit = unit_direction(cm, direction)
    out = []
    for idx, rec in recorded(cm, instructions, suffixes, hook_names(cm, sites), cm.chat.eoi_positions, batch_size):
        # [batch, n_sites, n_layers, n_eoi, d_model], in float32 whatever the model's dtype
        x = torch.stack([torch.stack([rec[f"blocks.{l}.{s}"] for l in range(cm.n_layers)], 1) for s in sites], 1).float()
        out.append((idx, ((x @ unit) / x.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)).cpu()))
    return in_order(out)


def cosine_frame(cosines: Tensor, sites: Sequence[str] = ("hook_resid_pre", "hook_resid_post")) -> pd.DataFrame:
    """:func:`residual_cosine`'s tensor as rows ``prompt, site, layer, position, cosine``
    (``position`` negative, counted from the end)."""
    n, _, n_layers, n_eoi = cosines.shape
    return tidy(cosines, [("prompt", range(n)), ("site", list(sites)), ("layer", range(n_layers)),
                          ("position", range(-n_eoi, 0))], value="cosine")


@torch.no_grad()
def user_end_states(
    cm: ChatModel,
    instructions: Sequence[str],
    suffixes: str | Sequence[str | None] | None = None,
    batch_size: int = 16,
) -> Tensor:
    """``blocks.{l}.hook_resid_pre`` of every layer at the last token of the user's message,
    the token before the EOI tokens (the instruction's last, or with a suffix the suffix's
    last): ``[n_prompts, n_layers, d_model]`` float32 on the CPU.

    Where a model reads whether a request is harmful, as opposed to whether to refuse it
    (which the EOI positions carry; Zhao et al. 2025 separate the two).
    """
    instructions, suffixes = prompts(instructions, suffixes)
    names = hook_names(cm, ["hook_resid_pre"])
    out = []
    for idx, rec in recorded(cm, instructions, suffixes, names, [-(cm.chat.n_eoi + 1)], batch_size):
        out.append((idx, torch.stack([rec[n][:, 0] for n in names], 1).float().cpu()))
    return in_order(out)
