"""Probe sampling (Zhao et al., 2024): score most candidates on a cheap draft model only.

Each step, every candidate gets its target loss on the draft (``GCGConfig.draft``). A
random probe set (one candidate in ``probe_factor``) also gets its exact loss on the
model, and the Spearman rank correlation ``a`` of the two losses over the probe set says
how far the draft can be trusted this step. The model then scores the draft's best
``(1 - a) * width / probe_r`` candidates as well (``a`` below 0 counts as 0; at least the
draft's best; the usual scoring, with early rejection), and the step moves to the best of
all the model scored. A good draft thus costs few model passes; a draft that ranks no better than chance
falls back to ``width / probe_r`` of the draft's picks plus the probe set.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from torch import Tensor

from ...models.draft import load_draft
from ...models.forward import PrefixCache
from ...models.loading import ChatModel
from .config import GCGConfig
from .objective import GCGObjective, Prompt
from .scoring import CandidateScorer

log = logging.getLogger(__name__)


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two ``[n]`` vectors (0 for fewer than 2 values or a constant one)."""
    if len(a) < 2:
        return 0.0
    ra, rb = (x.argsort().argsort().float() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float(ra @ rb) / den if den else 0.0


class ProbeSampler:
    """Scores a step's candidates with probe sampling; keeps each step's agreement and how
    many candidates the model scored (``agreement``, ``model_scored``)."""

    def __init__(self, cm: ChatModel, cfg: GCGConfig, objective: GCGObjective, prompts: list[Prompt]):
        self.cfg = cfg
        self.draft = load_draft(cfg.draft, cm)
        full_cfg = replace(cfg, prune_after=0)  # every candidate scored to the end, exactly
        self.draft_scorer = CandidateScorer(GCGObjective(self.draft, cfg, None, cfg.suffix_len), full_cfg)
        self.exact = CandidateScorer(objective, full_cfg)
        self.prompts = {id(p): replace(p, cache=PrefixCache(self.draft, p.before), bound_ids=None, bound_rows=None)
                        for p in prompts}
        self.agreement: list[float] = []
        self.model_scored: list[int] = []

    @torch.no_grad()
    def score(self, scorer: CandidateScorer, prompts: list[Prompt], cands: Tensor, current: Tensor,
              fulls: list[PrefixCache | None], step: int) -> tuple[Tensor, Tensor]:
        """Losses ``[n]`` (``inf`` where the model did not score a candidate or rejected it
        early) and greedy matches ``[n]``, as :meth:`CandidateScorer.score` returns them.

        The probe set is drawn from a generator of its own, seeded by the step, so the
        candidates of later steps are drawn as without probe sampling (and a resumed run
        draws the same probe sets).
        """
        cfg, n = self.cfg, len(cands)
        draft, _ = self.draft_scorer.score([self.prompts[id(p)] for p in prompts], cands, current)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        probe = torch.randperm(n, generator=gen)[: max(1, n // cfg.probe_factor)]
        losses = torch.full((n,), torch.inf)
        match = torch.zeros(n, dtype=torch.bool)
        losses[probe], match[probe] = self.exact.score(prompts, cands[probe], current, fulls)
        a = spearman(draft[probe], losses[probe])
        # the draft's best, at least its very best, where the probe set has not scored them
        size = max(1, int((1.0 - min(max(a, 0.0), 1.0)) * n / cfg.probe_r))  # disagreement counts as none
        rest = draft.argsort()[:size]
        rest = rest[losses[rest].isinf()]
        if len(rest):
            losses[rest], match[rest] = scorer.score(prompts, cands[rest], current, fulls)
        self.agreement.append(a)
        self.model_scored.append(len(probe) + len(rest))
        log.debug("probe sampling: agreement %.2f, model scored %d of %d", a, len(probe) + len(rest), n)
        return losses, match
