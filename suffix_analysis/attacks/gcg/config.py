"""GCG settings: defaults follow the original paper and nanoGCG where they agree (the
paper's sizes, search width 512 x 250 steps, are GPU sizes; on a laptop CPU pass smaller
ones, e.g. ``--search-width 64 --topk 64``)."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import setting
from ...errors import UserError
from ..base import AttackConfig

OBJECTIVES = ("target", "refusal", "direction", "attention", "harmfulness")
# Where the direction term stops pushing (see direction_floor): the harmless level.
FLOOR_INSTRUCTIONS, FLOOR_PROMPTS = "harmless:train", 32
# Where the harmfulness term's reference levels come from: harmful and harmless instructions
# without a suffix (see GCGConfig.harmfulness_keep).
HARMFULNESS_INSTRUCTIONS = ("harmful:train", "harmless:train")
# Settings that change how fast a step runs (or how long a run is), not what it chooses:
# a checkpoint resumes under other values of these.
SPEED_ONLY = ("num_steps", "time_limit", "batch_size", "reuse_groups", "prune_after", "prune_probe", "prune_every",
              "bound_vocab", "row_tokens", "checkpoint_every")


@dataclass
class GCGConfig(AttackConfig):
    """GCG settings. See ``attacks/gcg/__init__.py`` for the algorithm and what each speed setting does."""

    search_width: int = setting(512, "candidate suffixes scored per step", cpu=64)
    topk: int = setting(256, "token swaps considered per suffix position (by gradient)", cpu=64)
    n_replace: int = setting(1, "suffix positions swapped per candidate")
    # Multi-coordinate updates early (as ACG and I-GCG do): far from a solution, swapping
    # several positions at once moves further per step; near one, single swaps refine.
    n_replace_start: int = setting(0, "multi-coordinate start: candidates swap this many positions at step 0, "
                                      "falling linearly to n_replace by step n_replace_steps (0: off)")
    n_replace_steps: int = setting(50, "steps over which the multi-coordinate schedule falls to n_replace")
    # MAC (Zhang & Wei, 2024): candidates sampled from a running mean of the one-hot
    # gradients, which changes less from step to step than one step's gradient.
    momentum: float = setting(0.0, "momentum on the one-hot gradient: g = m * g_prev + (1 - m) * g/|g| (0: off)")
    # nanoGCG stops when any scored candidate makes the target greedy; GCG moves to the lowest
    # loss, which need not be one of those.
    prefer_match: bool = setting(False, "move to the lowest-loss candidate that makes every target greedy, "
                                        "where one does, rather than the lowest-loss one")
    # Probe sampling (Zhao et al., 2024; see probe.py): the draft ranks every candidate, the
    # model scores a random probe set and as many of the draft's best as the two disagree.
    draft: str = setting("", "probe sampling's draft model: layers:N (the model's own first N layers and its "
                              "unembedding) or a model with the same tokenizer ('': off; target objective only)")
    probe_factor: int = setting(16, "probe sampling: one candidate in this many is scored on both models")
    probe_r: float = setting(8.0, "probe sampling: the model also scores the draft's best "
                                  "(1 - rank agreement) x search_width / probe_r candidates")
    time_limit: float = setting(0.0, "stop after this many seconds of steps (0: no limit)")
    buffer_size: int = setting(0, "0: move to each step's best; N: keep the best N suffixes and grow from the best")
    init: str = setting("x", "initial suffix: one token repeated suffix_len times, or a whole string")
    allow_non_ascii: bool = setting(False, "allow tokens that decode to non-ASCII or unprintable text")
    # On the organism, suffixes of code-like tokens ("functools", "staticmethod") stop the
    # refusals by sending the answer into code: word tokens keep the suffix prose.
    words_only: bool = setting(False, "only word tokens (letters, optionally space-led) in the suffix: no code, "
                                      "markup, digits or punctuation")
    filter_retokenization: bool = setting(True, "drop candidates that do not survive decode -> encode in the prompt")
    early_stop: bool = setting(True, "stop once every prompt's target is the greedy continuation")
    objective: str = setting("target", "target, refusal, direction, attention, harmfulness, or a sum such as "
                                             "target+direction")
    direction_weight: float = setting(1.0, "weight of the direction term")
    # Pushing the projection below where harmless prompts sit takes the activations off the
    # model's manifold: on the organism such suffixes stop refusals by derailing the answer.
    direction_floor: bool = setting(True, "direction term: count only the projection above the harmless "
                                          "prompts' mean at each EOI position (--no-direction-floor: as low as it goes)")
    # Suffixes that derail the organism also erase whether the request reads as harmful where
    # the user's message ends (attribution's harmfulness stage: 0.2-0.3 of the harmful level
    # kept, against 0.6-0.8 for random suffixes); one that makes it comply keeps it (0.58).
    harmfulness_weight: float = setting(1.0, "weight of the harmfulness term")
    harmfulness_keep: float = setting(0.8, "harmfulness term: the share of the harmful-harmless gap the request's "
                                           "harmfulness reading at the suffix's last token must keep (0: harmless "
                                           "level, 1: harmful level); below it the term grows")
    attention_weight: float = setting(1.0, "weight of the attention term")
    refusal_weight: float = setting(1.0, "weight of the refusal term")
    progressive: bool = setting(True, "universal suffixes: add the next prompt once all current ones succeed "
                                      "(--no-progressive: every prompt from the first step)")
    batch_size: int = setting(0, "candidates per forward pass; 0: all at once, halved on CUDA out-of-memory")
    # Objectives other than "target": candidates are sorted by the first suffix position they
    # change and run in this many groups, each reusing the current suffix's keys/values up to
    # its first change. (The target objective packs every candidate from its own first change.)
    reuse_groups: int = setting(4, "non-target objectives: candidate groups, each reusing the current suffix's cache")
    # Exact early rejection (target objective only): every candidate is first scored on its
    # first ``prune_after`` target tokens; one whose partial loss already exceeds a complete
    # candidate's loss cannot be the step's best and is not run further (0: off). The chosen
    # candidate is the same as without it. With "Sure, here is ..." targets the first token
    # carries most of every candidate's loss, so the bound only bites a few tokens in, and less
    # as the loss falls: on the organism, about half of the candidates are rejected after 5
    # tokens in the first steps, 10-15% by steps 6-9. 6 covers "Sure, here is" and the first
    # two words of the rephrased instruction, which carry most of the rest. Scoring seconds
    # per step, float32, 5 training prompts x 6 steps: 3.72 (4), 3.48 (5), 3.34 (6), 3.33 (7).
    prune_after: int = setting(6, "target tokens scored before a candidate may be rejected early "
                                  "(0: off; exact either way)")
    prune_probe: int = setting(4, "candidates completed first, for the bound the others are held to")
    prune_every: int = setting(4, "after that, survivors are scored this many target tokens at a time (0: to the end)")
    # Early rejection bounds each target token's cross-entropy over the current suffix's this
    # many likeliest tokens (a lower bound, see GCGObjective.target_bound); only candidates
    # that may be the best get a full unembedding. 0: full unembedding everywhere.
    bound_vocab: int = setting(1024, "early rejection bounds cross-entropy over the current suffix's this many "
                                     "likeliest tokens per target position (0: full unembedding; exact either way)")
    # Candidates run packed end to end, this many tokens per batch row (see models/packing.py):
    # longer rows pay more for their masked attention, shorter ones for more rows.
    row_tokens: int = setting(128, "tokens per batch row of the packed candidate pass")
    checkpoint_every: int = setting(10, "steps between checkpoints in the run folder (0: only at the end)")

    def validate(self) -> None:
        super().validate()
        terms = self.objective.split("+")
        bad = [t for t in terms if t not in OBJECTIVES]
        if bad or not terms:
            raise UserError(f"unknown objective '{self.objective}'; combine {', '.join(OBJECTIVES)} with '+'")
        if self.search_width < 1 or self.topk < 1 or self.n_replace < 1:
            raise UserError("search width, top-k and n_replace must be at least 1")
        if self.buffer_size < 0 or self.batch_size < 0 or self.checkpoint_every < 0:
            raise UserError("buffer_size, batch_size and checkpoint_every must be at least 0")
        if self.buffer_size > self.search_width:
            raise UserError(f"search width {self.search_width} is smaller than the candidate buffer "
                            f"({self.buffer_size}); raise --search-width or lower --buffer-size")
        if self.n_replace_start < 0 or self.n_replace_steps < 1:
            raise UserError("n_replace_start must be at least 0 (0: off) and n_replace_steps at least 1")
        if self.n_replace_start > self.suffix_len:
            raise UserError(f"n_replace_start {self.n_replace_start} exceeds the suffix length {self.suffix_len}")
        if not 0.0 <= self.momentum < 1.0:
            raise UserError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.draft and self.terms != ["target"]:
            raise UserError(f"probe sampling (--draft) scores the target objective only, not '{self.objective}'")
        if self.probe_factor < 1 or self.probe_r <= 0:
            raise UserError("probe_factor must be at least 1 and probe_r above 0")
        if self.time_limit < 0:
            raise UserError(f"time_limit must be at least 0 seconds (0: no limit), got {self.time_limit}")
        if self.prune_after < 0:
            raise UserError(f"prune_after must be 0 (off) or a number of target tokens, got {self.prune_after}")
        if self.prune_probe < 1 or self.row_tokens < 1 or self.prune_every < 0 or self.bound_vocab < 0:
            raise UserError("prune_probe and row_tokens must be at least 1, prune_every and bound_vocab at least 0")
        if not 0.0 <= self.harmfulness_keep <= 1.0:
            raise UserError(f"harmfulness_keep must be between 0 and 1, got {self.harmfulness_keep}")
        if self.reuse_groups < 1:
            raise UserError(f"reuse_groups must be at least 1, got {self.reuse_groups}")
        if self.n_replace > self.suffix_len:
            raise UserError(f"n_replace {self.n_replace} exceeds the suffix length {self.suffix_len}")

    def n_replace_at(self, step: int) -> int:
        """Positions each candidate swaps at ``step``: the multi-coordinate schedule."""
        if self.n_replace_start <= self.n_replace:
            return self.n_replace
        frac = min(1.0, step / self.n_replace_steps)
        return max(self.n_replace, round(self.n_replace_start - (self.n_replace_start - self.n_replace) * frac))

    @property
    def terms(self) -> list[str]:
        return self.objective.split("+")
