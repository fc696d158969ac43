"""Scoring a step's candidates: every candidate that could be the step's best gets its
exact loss; the others may be dropped early (loss ``inf``).

* Target objective: candidates run packed (``models/packing.py``) from their first changed
  suffix position, with staged exact early rejection (:class:`_Staged`).
* Other objectives: candidates sorted by their first change and run in a few groups, each
  from the current suffix's cache cropped there (:meth:`CandidateScorer._grouped`).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from ...models.forward import PrefixCache
from .config import GCGConfig
from .objective import GCGObjective, Prompt

log = logging.getLogger(__name__)


class CandidateScorer:
    """Scores candidates step after step; carries what one step teaches the next (the early
    rejection threshold's gap, the batch size that fit in memory)."""

    def __init__(self, objective: GCGObjective, cfg: GCGConfig):
        self.objective, self.cfg = objective, cfg
        self.gap: float | None = None  # last step's best loss minus its lowest pass-1 bound (x 1.1)
        self.batch_size = cfg.batch_size  # 0 (all at once) unless out-of-memory forced a size

    def score(self, prompts: list[Prompt], cands: Tensor, current: Tensor,
              fulls: list[PrefixCache | None] | None = None) -> tuple[Tensor, Tensor | None]:
        """Losses of candidates ``[n, suffix_len]``: ``[n]`` (``inf`` for candidates rejected
        early, which cannot be the best), and whether every target is their greedy
        continuation ``[n]`` (target objective only, else None). ``fulls``: per prompt the
        cache of the prompt and ``current``, where already known. Halves the batch size on
        CUDA out-of-memory.
        """
        packed = self.objective.terms == ["target"]
        if packed or self.cfg.reuse_groups > 1:  # else no cache of `current` is read
            fulls = [f if f is not None else p.cache.extended(current.tolist())
                     for p, f in zip(prompts, fulls or [None] * len(prompts))]
        else:
            fulls = [None] * len(prompts)
        first_diff = (cands != current).int().argmax(1)  # [n]
        size = self.batch_size or len(cands)
        while True:
            try:
                if packed:
                    chunks = [torch.arange(s, min(s + size, len(cands))) for s in range(0, len(cands), size)]
                    if len(prompts) > 1 or not 0 < self.cfg.prune_after < len(prompts[0].target):
                        return self._target_rerun(prompts, cands, fulls, chunks, first_diff)
                    staged = _Staged(self.objective, self.cfg, prompts[0], cands, fulls[0], chunks, first_diff)
                    losses, match, self.gap = staged.run(self.gap)
                    return losses, match
                return self._grouped(prompts, cands, fulls, size, first_diff), None
            except torch.cuda.OutOfMemoryError:
                if size == 1:
                    raise
                size = self.batch_size = max(1, size // 2)
                torch.cuda.empty_cache()
                log.info("out of memory: candidate batch size now %d", size)

    def _grouped(self, prompts: list[Prompt], cands: Tensor, fulls: list[PrefixCache | None], size: int,
                 first_diff: Tensor) -> Tensor:
        """Any objective: candidates sorted by the first suffix position they change and run in
        ``reuse_groups`` groups, each from the current suffix's cache cropped at its first change
        (``fulls`` None: from the prompt's cache, whole suffixes)."""
        order = first_diff.argsort(stable=True)
        groups = max(1, min(self.cfg.reuse_groups, len(cands)))
        size = min(size, -(-len(cands) // groups))
        chunks = [order[s:s + size] for s in range(0, len(order), size)]
        total = torch.zeros(len(cands))
        for p, full in zip(prompts, fulls):
            for idx in chunks:
                if full is None:
                    loss, _ = self.objective.loss(p, cands[idx])
                else:
                    start = int(first_diff[idx].min())
                    loss, _ = self.objective.loss(p, cands[idx, start:], cache=full.cropped(p.cache.length + start))
                total[idx] += loss.float().cpu()
        return total

    def _target_rerun(self, prompts: list[Prompt], cands: Tensor, fulls: list[PrefixCache], chunks: list[Tensor],
                      first_diff: Tensor) -> tuple[Tensor, Tensor]:
        """Several prompts (or no early rejection): pass 1 on the first ``prune_after`` target
        tokens of every prompt; the candidates with the lowest bounds are completed first (by
        rerunning them), then those whose bound is not above the best loss so far."""
        obj, m = self.objective, self.cfg.prune_after or max(len(p.target) for p in prompts)
        n = len(cands)
        part = torch.zeros(len(prompts), n)  # pass-1 cross-entropy sums per prompt
        ok = torch.ones(n, dtype=torch.bool)

        def scored(p: Prompt, rows: Tensor, pi: int, upto: int) -> tuple[Tensor, Tensor]:
            h, _ = obj.target_hidden(p, cands[rows], first_diff[rows], fulls[pi], upto)
            return obj.target_exact(p, h)

        for pi, p in enumerate(prompts):
            upto = min(m, len(p.target))
            for idx in chunks:
                ce, hit = scored(p, idx, pi, upto)
                part[pi, idx] = ce.sum(1).float()
                ok[idx] &= hit.all(1)
        lengths = torch.tensor([len(p.target) for p in prompts], dtype=torch.float)[:, None]
        bound = (part / lengths).sum(0)
        if all(min(m, len(p.target)) == len(p.target) for p in prompts):
            return bound, ok

        chunk = max(len(c) for c in chunks)

        def complete(sel: Tensor) -> tuple[Tensor, Tensor]:
            """Exact losses and matches of candidates ``sel``."""
            loss, hit = torch.zeros(len(sel)), ok[sel].clone()
            for pi, p in enumerate(prompts):
                if min(m, len(p.target)) == len(p.target):
                    loss += part[pi, sel] / len(p.target)
                    continue
                for s in range(0, len(sel), chunk):
                    rows = sel[s:s + chunk]
                    ce, h = scored(p, rows, pi, len(p.target))
                    loss[s:s + len(rows)] += ce.sum(1).float() / len(p.target)
                    hit[s:s + len(rows)] &= h.all(1)
            return loss, hit

        total = torch.full((n,), float("inf"))
        match = torch.zeros(n, dtype=torch.bool)
        order = bound.argsort()
        head = order[: self.cfg.prune_probe]
        total[head], match[head] = complete(head)
        upper = float(total[head].min())
        rest = order[self.cfg.prune_probe:]
        rest = rest[bound[rest] <= upper]
        if len(rest):
            total[rest], match[rest] = complete(rest)
        return total, match


class _Staged:
    """One prompt's target loss with exact early rejection, for one step's candidates.

    A candidate's lower bound is the sum, over the target tokens scored so far, of each
    token's cross-entropy over a vocabulary subset (``target_bound``; every term is >= 0
    and below the true one). Pass 1 scores every candidate on the first ``prune_after``
    tokens; survivors go on ``prune_every`` tokens at a time, each stage dropping those
    whose bound exceeds a threshold ``tau``: the exact loss of the best of a few completed
    candidates (a true upper bound) or, once a step has been seen, a guess from the last
    step's gap between the best loss and the lowest pass-1 bound. Completed candidates
    then get exact losses (a full unembedding of their stored hidden states), lowest bound
    first, until no bound is below the best exact loss; if the guess proved low, the
    candidates dropped with a bound below the best are completed too. Every candidate
    that could be the best gets its exact loss: the choice is that of full scoring.
    """

    def __init__(self, objective: GCGObjective, cfg: GCGConfig, prompt: Prompt, cands: Tensor, full: PrefixCache,
                 chunks: list[Tensor], first_diff: Tensor):
        self.obj, self.cfg, self.prompt = objective, cfg, prompt
        self.cands, self.full, self.chunks, self.first_diff = cands, full, chunks, first_diff
        n = len(cands)
        self.n_target = len(prompt.target)
        self.hidden: Tensor | None = None  # [n, n_target, d_model] hidden states of the positions scored so far
        self.bound = torch.zeros(n)  # lower bound of the summed cross-entropy, over the tokens scored so far
        self.done = torch.zeros(n, dtype=torch.bool)  # every target token scored
        self.exact = torch.zeros(n, dtype=torch.bool)  # exact loss known
        self.loss = torch.full((n,), torch.inf)  # exact summed cross-entropy, where known
        self.hit = torch.zeros(n, dtype=torch.bool)  # every target token is the greedy one, where known
        self.pass1: list = []  # per chunk: (packed cache, the candidates its runs are)
        self.first: Tensor | None = None  # the bounds after pass 1

    def store(self, idx: Tensor, frm: int, h: Tensor) -> None:
        """Hidden states ``h`` ``[len(idx), k, d_model]`` of target positions ``frm..frm+k-1``, and their bounds."""
        if self.hidden is None:
            self.hidden = h.new_zeros(len(self.cands), self.n_target, *h.shape[2:])
        self.hidden[idx, frm:frm + h.shape[1]] = h
        self.bound[idx] += self.obj.target_bound(self.prompt, h, frm).sum(1).float()

    def finish(self, sel: Tensor) -> None:
        """Score candidates ``sel`` (dropped, or not yet past pass 1) to the end, from pass 1's caches."""
        m = self.cfg.prune_after
        self.bound[sel] = self.first[sel]
        for packed, idx in self.pass1:
            rows = torch.isin(idx, sel).nonzero().flatten()
            if len(rows):
                h, _ = self.obj.target_hidden_more(self.prompt, packed, rows, m, self.n_target)
                self.store(idx[rows], m, h)
                self.done[idx[rows]] = True

    def settle(self, sel: Tensor) -> None:
        """Exact losses of completed candidates ``sel``."""
        ce, ok = self.obj.target_exact(self.prompt, self.hidden[sel])
        self.loss[sel], self.hit[sel], self.exact[sel] = ce.sum(1).float(), ok.all(1), True

    def run(self, gap: float | None) -> tuple[Tensor, Tensor, float]:
        """Losses ``[n]`` (mean cross-entropy; ``inf`` where rejected), greedy matches ``[n]``,
        and the gap to carry to the next step."""
        cfg, m = self.cfg, self.cfg.prune_after
        for idx in self.chunks:
            h, packed = self.obj.target_hidden(self.prompt, self.cands[idx], self.first_diff[idx], self.full, m,
                                               keep_cache=True)
            self.store(idx, 0, h)
            self.pass1.append((packed, idx))
        self.first = self.bound.clone()
        if gap is None:  # no guess yet: complete the most promising few for a true bound
            probe = self.first.argsort()[: cfg.prune_probe]
            self.finish(probe)
            self.settle(probe)
            tau = float(self.loss[probe].min())
        else:
            tau = float(self.first.min()) + gap
        state, pos = self.pass1, m
        while pos < self.n_target:
            nxt = min(self.n_target, pos + cfg.prune_every) if cfg.prune_every else self.n_target
            nxt_state = []
            for packed, idx in state:
                rows = ((self.bound[idx] <= tau) & ~self.done[idx]).nonzero().flatten()
                if len(rows):
                    h, cont = self.obj.target_hidden_more(self.prompt, packed, rows, pos, nxt,
                                                          keep_cache=nxt < self.n_target)
                    self.store(idx[rows], pos, h)
                    nxt_state.append((cont, idx[rows]))
            state, pos = nxt_state, nxt
        for _, idx in state:
            self.done[idx] = True
        while True:
            best = float(self.loss.min())
            ready = (self.done & ~self.exact & (self.bound <= best)).nonzero().flatten()
            if len(ready):  # completed, and the bound does not rule it out: lowest bounds first
                self.settle(ready[self.bound[ready].argsort()[: cfg.prune_probe]])
                continue
            pending = (~self.done & (self.bound <= best)).nonzero().flatten()
            if not len(pending):
                break
            # the guess was low: what was dropped below the best may beat it (the most promising first)
            self.finish(pending if self.exact.any() else pending[self.bound[pending].argsort()[: cfg.prune_probe]])
        return self.loss / self.n_target, self.hit & self.exact, (best - float(self.first.min())) * 1.1
