"""Greedy Coordinate Gradient (GCG, Zou et al. 2023): a fast implementation.

Each step: the gradient of the loss with respect to a one-hot encoding of the suffix
gives, per suffix position, the ``topk`` most promising token swaps; ``search_width``
candidates each swap ``n_replace`` random positions to one of those; every candidate's
loss is computed exactly and the best one is kept.

Where the time goes, and what this implementation does about it:

* every candidate shares the prompt before the suffix: its key/value cache is computed
  once per prompt; the gradient pass leaves the cache of the prompt plus current suffix
  behind (the ``transformers`` ``Cache`` API);
* a candidate shares the current suffix up to the first position it changes, so it runs
  only the tokens from there; the target objective packs all candidates end to end into
  a few batch rows of one forward call, with a block mask (``models/packing.py``): no
  padding, and one read of the weights per call instead of one per group;
* the loss needs logits only at the target positions (or one position, or none for the
  direction objective, whose forward pass stops at the direction's layer), and the last
  target token is never run (it predicts nothing the loss uses);
* exact early rejection: cross-entropy is >= 0 per token, so a candidate's loss on the
  first target tokens bounds its full loss from below; candidates whose bound exceeds the
  best loss are not run further, in stages (same best candidate as full scoring); the
  bounds use cross-entropy over the current suffix's likeliest tokens (a lower bound too),
  so only the few candidates that may be the best pay for a full unembedding;
* the greedy-match check for early stopping reuses the chosen candidate's logits;
* the allowed-token mask is built once per tokenizer from one batched decode, and the
  retokenization filter encodes all candidates in one batched call.

Doing fewer steps per success (options, off by default until a time-to-success benchmark,
``benchmarks/bench_gcg_tts.py``, shows they cut it without costing successes):

* ``n_replace_start``/``n_replace_steps``: multi-coordinate updates early (ACG, I-GCG):
  candidates swap several positions at first, falling linearly to ``n_replace``;
* ``momentum``: candidates drawn from a running mean of the normalized one-hot gradients
  (MAC), kept across a resume;
* ``prefer_match``: move to a candidate that already makes the target greedy, where the
  step found one, rather than to the lowest loss (nanoGCG stops on any such candidate);
* ``buffer_size``: a buffer of the best suffixes seen (as nanoGCG's).

The package reads the way the algorithm does:

    config.py     GCGConfig: every setting, its default and its help
    ../tokens.py  allowed tokens, candidate sampling, the retokenization filter (shared with the random control)
    objective.py  the loss terms (target, refusal, direction, harmfulness, attention) and the target's cheap forms
    scoring.py    a step's candidates scored: packing, staged exact early rejection, grouped cache reuse
    search.py     the loop, its state (SearchState) and checkpoints
"""

from .config import OBJECTIVES, SPEED_ONLY, GCGConfig
from .objective import GCGObjective, Prompt
from .scoring import CandidateScorer
from .search import GCG, Entry, SearchState

__all__ = ["GCG", "GCGConfig", "GCGObjective", "CandidateScorer", "Prompt", "Entry", "SearchState", "OBJECTIVES",
           "SPEED_ONLY"]
