"""Where a suffix acts on the refusal direction: attribution at the EOI positions.

* ``regions``: the token spans of template, instruction, suffix and EOI in each prompt,
  read from the whole prompt's tokenization (straddling tokens by a stated rule).
* ``cosine``: cosine of the residual stream with the direction, every layer and EOI position;
  the residual stream at the last token of the user's message (the harmfulness signal).
* ``heads``: direct attribution of the direction's projection to the embedding, every
  attention head (through ``W_O``), the output projection's bias and every MLP; parts
  add up to the residual stream's projection; head rankings.
* ``hijack``: per-source attention writes ``A * v W_O`` at the destination rows only:
  attention mass, dominance and projection per region and head.
* ``writers``: ``W_O`` per head, biases, the Gemma-2/3 post-norm as an exact per-position
  scale, value-vector capture. ``batches``, ``frames``: batching and tidy DataFrames.
* ``suffix_tokens``: per suffix token, the change in the direction's projection when it is
  replaced by a neutral token or blocked from later positions, its gradient x input, and
  their rank agreement.
* ``causal``: activation patching of heads' ``attn.hook_z`` at the EOI positions (share
  restored, top-k heads), and EOI -> suffix attention knockout in all layers, a band or
  given heads (also during ``generate``), built on ``masks``: attention-mask edits.
* ``run``: all of it in order as resumable stages writing tidy tables into a run folder,
  with the random-suffix control (``controls``), atomic tables (``tables``) and
  ``summary.json`` (:func:`run_attribution`, :class:`AttributionConfig`, :func:`summary_table`);
  its parts: ``config`` (the settings), ``record`` (inputs check, ``run.json``), ``stages``
  (one function per stage) and ``summary`` (``summary.json`` and its table).
"""

from .causal import (
    knockout_scores,
    last_position_run,
    patch_heads,
    patch_top_heads,
    patch_z_hooks,
    share_restored,
    suffix_cut,
    suffix_knockout,
)
from .cosine import cosine_frame, residual_cosine, user_end_states
from .heads import DirectAttribution, direct_attribution, rank_heads, top_heads
from .hijack import Hijack, attention_hijack, per_source_writes, region_writes, source_writes
from .masks import AttentionCut, cut_attention
from .regions import REGIONS, PromptRegions, Straddler, prompt_regions, region_masks
from .run import AttributionConfig, run_attribution, summary_table
from .suffix_tokens import spearman, suffix_token_effects, token_agreement

__all__ = [
    "REGIONS", "PromptRegions", "Straddler", "prompt_regions", "region_masks",
    "residual_cosine", "cosine_frame", "user_end_states",
    "DirectAttribution", "direct_attribution", "rank_heads", "top_heads",
    "Hijack", "attention_hijack", "per_source_writes", "region_writes", "source_writes",
    "suffix_token_effects", "token_agreement", "spearman",
    "patch_heads", "patch_top_heads", "patch_z_hooks", "last_position_run", "share_restored",
    "suffix_knockout", "suffix_cut", "knockout_scores", "AttentionCut", "cut_attention",
    "AttributionConfig", "run_attribution", "summary_table",
]
