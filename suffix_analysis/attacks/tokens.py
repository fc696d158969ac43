"""How GCG samples token swaps; the suffix vocabulary and the retokenization check live in
``models/suffixes.py`` (shared with the organism's recipe) and are re-exported here."""

from __future__ import annotations

import torch
from torch import Tensor

from ..models.suffixes import WORD_TOKEN, allowed_token_mask, suffix_text, survives_retokenization


def sample_candidates(ids: Tensor, grad: Tensor, search_width: int, topk: int, n_replace: int,
                      generator: torch.Generator) -> Tensor:
    """``[search_width, suffix_len]`` candidates from the one-hot gradient ``[suffix_len, vocab]``
    (disallowed tokens already set to +inf): each swaps ``n_replace`` random positions to one
    of that position's ``topk`` most promising tokens."""
    suffix_len = ids.shape[0]
    top = (-grad).topk(topk, dim=1).indices.cpu()  # [suffix_len, topk]
    pos = torch.rand(search_width, suffix_len, generator=generator).argsort(1)[:, :n_replace]
    choice = torch.randint(0, topk, (search_width, n_replace), generator=generator)
    return ids.cpu().repeat(search_width, 1).scatter(1, pos, top[pos, choice])


__all__ = ["WORD_TOKEN", "allowed_token_mask", "sample_candidates", "suffix_text", "survives_retokenization"]
