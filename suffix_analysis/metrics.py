"""Pure tensor metrics, the bottom floor of the suite: no model, no I/O.

Everything that scores refusal or measures damage imports them from here.
"""

from __future__ import annotations

import torch
from torch import Tensor


def refusal_score(logits: Tensor, refusal_ids: list[int]) -> Tensor:
    """Log-odds that the next token is a refusal token: ``log P_ref - log(1 - P_ref)``.

    Args:
        logits: ``[..., vocab]`` logits at the last prompt position.
        refusal_ids: the family's refusal token ids (its preset's, e.g. "I", "As").
    Returns:
        ``[...]`` float32. Both terms are log-sum-exps over disjoint token sets, so the
        score stays finite when ``P_ref`` is near 0 or 1.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    mask = torch.zeros(logp.shape[-1], dtype=torch.bool, device=logp.device)
    mask[refusal_ids] = True
    ref = torch.logsumexp(logp[..., mask], dim=-1)
    rest = torch.logsumexp(logp.masked_fill(mask, float("-inf")), dim=-1)
    return ref - rest


def first_token_kl(clean_logits: Tensor, logits: Tensor) -> Tensor:
    """KL(clean || other) per row of ``[n, vocab]`` logits: ``[n]`` (float64)."""
    p = torch.log_softmax(clean_logits.double(), -1)
    q = torch.log_softmax(logits.double(), -1)
    return (p.exp() * (p - q)).sum(-1)


def token_ce(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy per position ``[..., n]`` of logits ``[..., n, vocab]`` and targets ``[..., n]``.

    Reduces over the contiguous last dimension (``cross_entropy`` on a transposed view is
    several times slower).
    """
    return torch.logsumexp(logits, -1) - logits.gather(-1, target[..., None])[..., 0]
