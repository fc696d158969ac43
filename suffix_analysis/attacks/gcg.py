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

Objectives (``objective``, combine with ``+``):

* ``target``: cross-entropy of the target response (the classic GCG loss);
* ``refusal``: the refusal score (log-odds of the refusal tokens) at the response start;
* ``direction``: mean projection of ``resid_pre`` at the direction's layer, EOI positions,
  onto the refusal direction of a direction run;
* ``attention``: minus the share of attention the last prompt token pays to the suffix,
  averaged over heads and layers (needs eager attention).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from transformers import DynamicCache

from ..errors import UserError
from ..models.forward import PrefixCache
from ..models.packing import Packed, continue_packed, forward_packed, softcap, unembed
from ..models.loading import ChatModel
from .base import Attack, AttackConfig, AttackResult, register_attack

log = logging.getLogger(__name__)

OBJECTIVES = ("target", "refusal", "direction", "attention")
# Settings that change how fast a step runs (or how long a run is), not what it chooses:
# a checkpoint resumes under other values of these.
SPEED_ONLY = ("num_steps", "batch_size", "reuse_groups", "prune_after", "prune_probe", "prune_every",
              "bound_vocab", "row_tokens", "checkpoint_every")


@dataclass
class GCGConfig(AttackConfig):
    """GCG settings; defaults follow the original paper and nanoGCG where they agree."""

    search_width: int = 512  # candidates per step
    topk: int = 256  # token swaps considered per position
    n_replace: int = 1  # positions swapped per candidate
    buffer_size: int = 0  # 0: only the current best; else keep the best N and grow from the best
    init: str = "x"  # one token repeated suffix_len times, or a whole initial suffix
    allow_non_ascii: bool = False
    filter_retokenization: bool = True  # drop candidates that do not survive decode -> encode in context
    early_stop: bool = True  # stop once every prompt's target is the greedy continuation
    objective: str = "target"
    direction_weight: float = 1.0
    attention_weight: float = 1.0
    refusal_weight: float = 1.0
    progressive: bool = True  # universal suffixes: add the next prompt once all current ones succeed
    batch_size: int = 0  # candidates per forward pass; 0: all at once, halved on CUDA out-of-memory
    # Objectives other than "target": candidates are sorted by the first suffix position they
    # change and run in this many groups, each reusing the current suffix's keys/values up to
    # its first change. (The target objective packs every candidate from its own first change.)
    reuse_groups: int = 4
    # Exact early rejection (target objective only): every candidate is first scored on its
    # first ``prune_after`` target tokens; one whose partial loss already exceeds a complete
    # candidate's loss cannot be the step's best and is not run further (0: off). The chosen
    # candidate is the same as without it. With "Sure, here is ..." targets the first token
    # carries most of every candidate's loss, so the bound only bites a few tokens in, and less
    # as the loss falls: on the organism, about half of the candidates are rejected after 5
    # tokens in the first steps, 10-15% by steps 6-9. 6 covers "Sure, here is" and the first
    # two words of the rephrased instruction, which carry most of the rest. Scoring seconds
    # per step, float32, 5 training prompts x 6 steps: 3.72 (4), 3.48 (5), 3.34 (6), 3.33 (7).
    prune_after: int = 6
    prune_probe: int = 4  # candidates completed first, for the bound the others are held to
    prune_every: int = 4  # after pass 1, survivors are scored this many target tokens at a time (0: to the end)
    # Early rejection bounds each target token's cross-entropy over the current suffix's this
    # many likeliest tokens (a lower bound, see GCGObjective.target_bound); only candidates
    # that may be the best get a full unembedding. 0: full unembedding everywhere.
    bound_vocab: int = 1024
    # Candidates run packed end to end, this many tokens per batch row (see models/packing.py):
    # longer rows pay more for their masked attention, shorter ones for more rows.
    row_tokens: int = 128
    checkpoint_every: int = 10

    def validate(self) -> None:
        super().validate()
        terms = self.objective.split("+")
        bad = [t for t in terms if t not in OBJECTIVES]
        if bad or not terms:
            raise UserError(f"unknown objective '{self.objective}'; combine {', '.join(OBJECTIVES)} with '+'")
        if self.search_width < 1 or self.topk < 1 or self.n_replace < 1:
            raise UserError("search width, top-k and n_replace must be at least 1")
        if self.buffer_size > self.search_width:
            raise UserError(f"search width {self.search_width} is smaller than the candidate buffer "
                            f"({self.buffer_size}); raise --search-width or lower --buffer-size")
        if self.prune_after < 0:
            raise UserError(f"prune_after must be 0 (off) or a number of target tokens, got {self.prune_after}")
        if self.prune_probe < 1 or self.row_tokens < 1 or self.prune_every < 0 or self.bound_vocab < 0:
            raise UserError("prune_probe and row_tokens must be at least 1, prune_every and bound_vocab at least 0")
        if self.n_replace > self.suffix_len:
            raise UserError(f"n_replace {self.n_replace} exceeds the suffix length {self.suffix_len}")

    @property
    def terms(self) -> list[str]:
        return self.objective.split("+")


# --- token filtering ------------------------------------------------------------------------

_MASK_CACHE: dict[tuple, Tensor] = {}


def allowed_token_mask(tokenizer, vocab_size: int, allow_non_ascii: bool = False) -> Tensor:
    """``[vocab_size]`` bool: tokens a suffix may use (no special tokens; printable ASCII unless allowed).

    The vocabulary is decoded in one batched call and cached per tokenizer.
    """
    key = (tokenizer.name_or_path, len(tokenizer), vocab_size, allow_non_ascii)
    if key not in _MASK_CACHE:
        n = min(len(tokenizer), vocab_size)
        texts = tokenizer.batch_decode([[i] for i in range(n)])
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        ok = [bool(t) and (allow_non_ascii or (t.isascii() and t.isprintable())) for t in texts]
        mask[:n] = torch.tensor(ok)
        special = [i for i in tokenizer.all_special_ids if i is not None and i < vocab_size]
        special += [i for i in getattr(tokenizer, "added_tokens_decoder", {}) if i < vocab_size]
        mask[special] = False
        _MASK_CACHE[key] = mask
    return _MASK_CACHE[key]


def sample_candidates(ids: Tensor, grad: Tensor, search_width: int, topk: int, n_replace: int,
                      generator: torch.Generator) -> Tensor:
    """``[search_width, suffix_len]`` candidates from the one-hot gradient ``[suffix_len, vocab]``
    (disallowed tokens already set to +inf)."""
    suffix_len = ids.shape[0]
    top = (-grad).topk(topk, dim=1).indices.cpu()  # [suffix_len, topk]
    pos = torch.rand(search_width, suffix_len, generator=generator).argsort(1)[:, :n_replace]
    choice = torch.randint(0, topk, (search_width, n_replace), generator=generator)
    return ids.cpu().repeat(search_width, 1).scatter(1, pos, top[pos, choice])


# --- the model side ---------------------------------------------------------------------------

def token_ce(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy per position ``[batch, n]`` of logits ``[batch, n, vocab]``; reduces over
    the contiguous last dimension (``cross_entropy`` on a transposed view is several times slower)."""
    return torch.logsumexp(logits, -1) - logits.gather(-1, target[..., None])[..., 0]


@dataclass
class _Prompt:
    instruction: str
    before: list[int]  # tokens before the suffix (chat prefix + instruction)
    after: list[int]  # EOI tokens after the suffix
    target: list[int]
    cache: PrefixCache | None = None
    bound_ids: Tensor | None = None  # [n_target, K] vocabulary subsets for GCGObjective.target_bound
    bound_rows: Tensor | None = None  # [n_target, K, d_model] their unembedding rows, gathered on first use


class _DirectionProbe:
    """Reads ``resid_pre`` of one layer at the EOI positions and stops the forward pass
    there when nothing above it is needed."""

    class Stop(Exception):
        pass

    def __init__(self, cm: ChatModel, unit: Tensor, layer: int):
        self.cm, self.unit, self.layer = cm, unit, layer
        self.value: Tensor | None = None
        self.eoi = slice(0, 0)  # where the EOI tokens sit in the tokens being run
        self.stop = False

    def __enter__(self):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]  # [batch, rest, d_model]
            self.value = (x[:, self.eoi].float() @ self.unit).mean(1)  # [batch]
            if self.stop:
                raise _DirectionProbe.Stop

        self.handle = self.cm.layers[self.layer].register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


class GCGObjective:
    """Computes the (weighted, summed) objective for batches of suffixes on one prompt."""

    def __init__(self, cm: ChatModel, cfg: GCGConfig, direction: tuple[Tensor, int] | None, suffix_len: int):
        self.cm, self.cfg, self.suffix_len = cm, cfg, suffix_len
        self.terms = cfg.terms
        self.probe = None
        if "direction" in self.terms:
            if direction is None:
                raise UserError("the direction objective needs --direction RUN")
            vec, layer = direction
            self.probe = _DirectionProbe(cm, (vec / vec.norm()).to(cm.device, torch.float32), layer)
        if "attention" in self.terms and getattr(cm.model.config, "_attn_implementation", "eager") != "eager":
            cm.model.set_attn_implementation("eager")  # attention weights are only returned by eager attention

    def _inputs(self, prompt: _Prompt, suffix: Tensor | None, suffix_embeds: Tensor | None, rest: list[int],
                cache: PrefixCache | DynamicCache | None, start: int) -> dict:
        """Model kwargs for suffix tokens (ids ``[batch, n]`` or embeddings) then ``rest``,
        after ``start`` cached positions."""
        cm, dev = self.cm, self.cm.device
        batch = suffix.shape[0] if suffix is not None else suffix_embeds.shape[0]
        rest_t = torch.tensor(rest, device=dev, dtype=torch.long).expand(batch, -1)
        if suffix_embeds is not None:
            kwargs = {"inputs_embeds": torch.cat([suffix_embeds, cm.model.get_input_embeddings()(rest_t)], 1)}
        elif suffix is not None:
            kwargs = {"input_ids": torch.cat([suffix.to(dev), rest_t], 1)}
        length = next(iter(kwargs.values())).shape[1]
        if isinstance(cache, PrefixCache):
            cache = cache.expand(batch)
        kwargs.update(position_ids=torch.arange(start, start + length, device=dev).expand(batch, -1),
                      past_key_values=cache, use_cache=start > 0 or cache is not None)
        return kwargs

    def loss(self, prompt: _Prompt, suffix: Tensor | None = None, suffix_embeds: Tensor | None = None,
             with_match: bool = False, cache: PrefixCache | None = None,
             kv_out: list | None = None, logits_out: list | None = None) -> tuple[Tensor, Tensor | None]:
        """Per-candidate loss ``[batch]`` (and, with ``with_match``, whether the target is the
        greedy continuation ``[batch]``).

        Pass token ids ``[batch, n]`` or embeddings ``[batch, n, d_model]`` (for the gradient)
        of the *last* ``n`` suffix tokens; ``cache`` holds everything before them (default:
        the prompt's prefix cache, with ``n = suffix_len``). ``kv_out`` receives the cache of
        the whole pass (None where the pass stopped early or used none), ``logits_out`` the
        logits at the target positions ``[batch, n_target, vocab]`` (None where none were computed).
        """
        cm, dev = self.cm, self.cm.device
        cache = cache or prompt.cache
        batch = suffix.shape[0] if suffix is not None else suffix_embeds.shape[0]
        n_suffix = suffix.shape[1] if suffix is not None else suffix_embeds.shape[1]
        n_after, n_target = len(prompt.after), len(prompt.target)
        need_logits = any(t in self.terms for t in ("target", "refusal")) or with_match
        only_probe = self.terms == ["direction"] and not with_match
        # The last target token predicts nothing the loss uses: it is not run.
        rest = prompt.after + prompt.target[:-1]
        kwargs = self._inputs(prompt, suffix, suffix_embeds, rest, cache, cache.length if cache else 0)
        if "attention" in self.terms:
            kwargs["output_attentions"] = True
        keep = max(n_target, 1)  # logits at the last EOI position and every target position but the last
        out = None
        try:
            if self.probe is not None:
                self.probe.eoi = slice(n_suffix, n_suffix + n_after)
                self.probe.stop = only_probe
                with self.probe:
                    out = cm.model.base_model(**kwargs) if only_probe else cm.model(**kwargs, logits_to_keep=keep)
            else:
                out = cm.model(**kwargs, logits_to_keep=keep)
        except _DirectionProbe.Stop:
            out = None
        if logits_out is not None and not need_logits:
            logits_out.append(None)
        if kv_out is not None:
            kv_out.append(kwargs["past_key_values"] if out is not None and kwargs["use_cache"] else None)
        total = torch.zeros(batch, device=dev)
        match = None
        if need_logits:
            logits = out.logits.float()  # [batch, max(n_target, 1), vocab]
            if logits_out is not None:
                logits_out.append(logits.detach())
            tgt = torch.tensor(prompt.target, device=dev)
            if "target" in self.terms:
                ce = token_ce(logits, tgt.expand(batch, -1)).mean(1)
                total = total + ce
            if "refusal" in self.terms:
                from ..evaluation.refusal import refusal_score

                total = total + self.cfg.refusal_weight * refusal_score(logits[:, 0], cm.refusal_ids)
            if with_match:
                match = (logits.argmax(-1) == tgt).all(1)
        if self.probe is not None:
            total = total + self.cfg.direction_weight * self.probe.value
        if "attention" in self.terms:
            s0 = len(prompt.before)  # the suffix's key positions follow the prompt's tokens
            q = n_suffix + n_after - 1  # the last EOI token, where the response starts
            shares = [a[:, :, q, s0:s0 + self.suffix_len].sum(-1).mean(1) for a in out.attentions]
            total = total - self.cfg.attention_weight * torch.stack(shares).mean(0)
        return total, match

    def target_hidden(self, prompt: _Prompt, cands: Tensor, first: Tensor, full: PrefixCache, upto: int,
                      keep_cache: bool = False) -> tuple[Tensor, Packed | None]:
        """Final hidden states ``[n, upto, d_model]`` that predict the first ``upto`` target
        tokens, for candidates ``[n, suffix_len]``, and (with ``keep_cache``) the packed cache
        to continue from.

        ``full`` is the cache of the prompt and the current suffix; candidate ``i`` first
        differs from it at suffix position ``first[i]`` and runs only the tokens from there
        on, all candidates packed into one call (see :mod:`..models.packing`).
        """
        n_prefix = full.length - self.suffix_len
        tail = prompt.after + prompt.target[: upto - 1]
        starts = first.tolist()
        runs = [row[s:] + tail for row, s in zip(cands.tolist(), starts)]
        return forward_packed(self.cm, full, runs, [n_prefix + s for s in starts], upto,
                              row_tokens=self.cfg.row_tokens, keep_cache=keep_cache)

    def target_hidden_more(self, prompt: _Prompt, packed: Packed, which: Tensor, frm: int, to: int,
                           keep_cache: bool = False) -> tuple[Tensor, Packed | None]:
        """Hidden states ``[len(which), to - frm, d_model]`` that predict target tokens
        ``frm..to-1``, continuing runs ``which`` of a pass that got the first ``frm``; and
        (``keep_cache``) the cache to continue from, whose run ``j`` is ``which[j]``."""
        runs = [prompt.target[frm - 1:to - 1]] * len(which)
        return continue_packed(self.cm, packed, which.tolist(), runs, to - frm, keep_cache=keep_cache)

    def target_exact(self, prompt: _Prompt, hidden: Tensor, frm: int = 0) -> tuple[Tensor, Tensor]:
        """Cross-entropy of target tokens ``frm..frm+k-1`` from their hidden states ``[n, k, d_model]``,
        and whether each is the greedy token: ``[n, k]`` each, on the CPU."""
        logits = unembed(self.cm, hidden).float()  # [n, k, vocab]
        tgt = torch.tensor(prompt.target[frm:frm + hidden.shape[1]], device=self.cm.device).expand(len(hidden), -1)
        return token_ce(logits, tgt).cpu(), (logits.argmax(-1) == tgt).cpu()

    def target_bound(self, prompt: _Prompt, hidden: Tensor, frm: int = 0) -> Tensor:
        """A lower bound ``[n, k]`` of :meth:`target_exact`'s cross-entropy, cheap to compute.

        The log-sum-exp over a subset of the vocabulary that contains the target token is at
        most the one over the whole vocabulary, so cross-entropy over the subset bounds the
        true one from below. The subset per target position (:meth:`narrow`) is where the
        current suffix puts its probability; candidates differ from it in one or a few
        tokens, so the bound is tight (about 2e-3 per token below the exact value on the
        organism with 1024 tokens) at ~1/50 of the cost of a full unembedding. Without a
        subset it is the exact value. (In bfloat16/float16 the bound and the exact value come
        from different kernels and can differ by rounding, so candidates within rounding of
        the best may be ranked differently than by full scoring.)
        """
        if prompt.bound_ids is None:
            return self.target_exact(prompt, hidden, frm)[0]
        if prompt.bound_rows is None:
            weight = self.cm.model.get_output_embeddings().weight.detach()
            prompt.bound_rows = weight[prompt.bound_ids.to(weight.device)]
        rows = prompt.bound_rows[frm:frm + hidden.shape[1]]  # [k, K, d_model], column 0: the target token
        logits = softcap(self.cm, torch.einsum("nkd,kvd->nkv", hidden, rows)).float()  # [n, k, K]
        return (torch.logsumexp(logits, -1) - logits[..., 0]).cpu()

    def narrow(self, prompt: _Prompt, logits: Tensor) -> None:
        """Pick :meth:`target_bound`'s vocabulary subsets from the current suffix's logits at
        the target positions ``[n_target, vocab]``: per position the ``bound_vocab`` likeliest
        tokens, the target token first."""
        k = self.cfg.bound_vocab
        head = self.cm.model.get_output_embeddings()
        prompt.bound_ids = prompt.bound_rows = None
        if not k or k >= logits.shape[-1] or "target" not in self.terms or head.bias is not None:
            return
        tgt = torch.tensor(prompt.target, device=logits.device)
        ranked = logits.detach().float().scatter(1, tgt[:, None], torch.inf)  # the target ranks first
        prompt.bound_ids = ranked.topk(k, dim=-1).indices  # [n_target, K]

    def refusal_score(self, prompt: _Prompt, suffix: Tensor) -> Tensor:
        """Refusal score at the response start for suffixes ``[batch, suffix_len]``: ``[batch]``."""
        from ..evaluation.refusal import refusal_score

        cache = prompt.cache
        kwargs = self._inputs(prompt, suffix, None, prompt.after, cache, cache.length if cache else 0)
        out = self.cm.model(**kwargs, logits_to_keep=1)
        return refusal_score(out.logits[:, -1], self.cm.refusal_ids)


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@register_attack
class GCG(Attack):
    """Single-prompt or universal (multi-prompt) GCG. See the module docstring."""

    name = "gcg"
    config_class = GCGConfig

    def __init__(self, config: GCGConfig | None = None, direction: tuple[Tensor, int] | None = None):
        super().__init__(config)
        self.direction = direction  # (vector [d_model], layer) for the direction objective
        self._gap: float | None = None  # early rejection's guess, carried from step to step

    # -- setup ----------------------------------------------------------------------------------
    def _prompts(self, cm: ChatModel, instructions: list[str], targets: list[str]) -> list[_Prompt]:
        tok = cm.tokenizer
        if len(targets) != len(instructions):
            raise UserError(f"{len(instructions)} instructions but {len(targets)} targets")
        out = []
        for instr, target in zip(instructions, targets):
            if "target" in self.config.terms and not target.strip():
                raise UserError(f"empty target for instruction {instr!r}")
            before = tok(cm.chat.prefix + instr.strip(), add_special_tokens=False)["input_ids"]
            tgt = tok(target, add_special_tokens=False)["input_ids"] if target else []
            out.append(_Prompt(instr.strip(), before, list(cm.chat.eoi_ids), tgt))
        return out

    def _init_ids(self, cm: ChatModel) -> list[int]:
        cfg = self.config
        tok = cm.tokenizer
        one = tok(" " + cfg.init, add_special_tokens=False)["input_ids"]
        if len(one) == 1:
            return one * cfg.suffix_len
        ids = tok(" " + " ".join([cfg.init] * cfg.suffix_len), add_special_tokens=False)["input_ids"]
        if len(ids) < cfg.suffix_len:
            raise UserError(f"initial suffix {cfg.init!r} is {len(ids)} tokens, shorter than --suffix-len "
                            f"{cfg.suffix_len}")
        return ids[: cfg.suffix_len]

    def _retokenizes(self, cm: ChatModel, prompts: list[_Prompt], cands: Tensor) -> Tensor:
        """``[n]`` bool: the candidate, decoded and placed in the prompt, encodes to the same tokens."""
        tok = cm.tokenizer
        texts = tok.batch_decode(cands.tolist())
        # a suffix that does not start with a space cannot be rendered after "instruction "
        ok = torch.tensor([t.startswith(" ") for t in texts])
        for p in prompts:
            rendered = [cm.chat.render(p.instruction, t[1:] if t.startswith(" ") else None) for t in texts]
            enc = tok(rendered, add_special_tokens=False)["input_ids"]
            want = [p.before + c + p.after for c in cands.tolist()]
            ok &= torch.tensor([e == w for e, w in zip(enc, want)])
        return ok

    # -- the loop -----------------------------------------------------------------------------------
    def run(self, cm: ChatModel, instructions: list[str], targets: list[str], out: Path | None = None,
            resume: bool = False) -> AttackResult:
        cfg = self.config
        self._gap = None
        prompts = self._prompts(cm, instructions, targets)
        objective = GCGObjective(cm, cfg, self.direction, cfg.suffix_len)
        embed = cm.model.get_input_embeddings()
        vocab = embed.weight.shape[0]
        allowed = allowed_token_mask(cm.tokenizer, vocab, cfg.allow_non_ascii).to(cm.device)
        for p in prompts:
            p.cache = PrefixCache(cm, p.before)
        gen = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        meta = {"fingerprint": cm.fingerprint(), "config": {k: v for k, v in asdict(cfg).items() if k not in SPEED_ONLY},
                "data": _fingerprint([instructions, targets])}
        state = {"step": 0, "buffer": [], "best": (float("inf"), []), "losses": [], "suffixes": [],
                 "step_seconds": [], "n_active": 1}
        ckpt = out / "checkpoint.json" if out else None
        if resume:
            state = self._load_checkpoint(ckpt, meta, gen)
        else:
            ids = torch.tensor(self._init_ids(cm))
            with torch.no_grad():
                n_active = 1 if cfg.progressive else len(prompts)
                state["n_active"] = n_active
                loss = self._total(objective, prompts[:n_active], ids[None])[0].item()
            state["buffer"] = [(loss, ids.tolist())]
            state["best"] = (loss, ids.tolist())
        batch_size = cfg.batch_size
        success = False
        step = state["step"]
        try:
            while step < cfg.num_steps:
                t0 = time.perf_counter()
                active = prompts[: state["n_active"]]
                best_loss, best_ids = state["buffer"][0]
                ids = torch.tensor(best_ids)
                grad, fulls = self._grad(cm, objective, active, ids, embed)
                grad[:, ~allowed] = float("inf")
                cands = sample_candidates(ids, grad, cfg.search_width, cfg.topk, cfg.n_replace, gen)
                cands = torch.unique(cands, dim=0)
                if cfg.filter_retokenization:
                    keep = self._retokenizes(cm, active, cands)
                    if keep.any():
                        cands = cands[keep]
                    else:
                        log.warning("step %d: no candidate survives retokenization; keeping them all", step)
                with torch.no_grad():
                    losses, match, batch_size = self._batched(objective, active, cands, ids, batch_size, fulls)
                i = int(losses.argmin())
                self._update_buffer(state, float(losses[i]), cands[i].tolist())
                if match is not None and state["buffer"][0][1] == cands[i].tolist():
                    success = bool(match[i])  # known from scoring: no extra forward pass
                else:
                    with torch.no_grad():
                        success = self._succeeds(objective, active, torch.tensor(state["buffer"][0][1]))
                if success and state["n_active"] < len(prompts):
                    state["n_active"] += 1
                    log.info("step %d: suffix works on %d prompt(s); adding prompt %d", step, state["n_active"] - 1,
                             state["n_active"])
                    with torch.no_grad():  # the buffer's losses were for fewer prompts
                        state["buffer"] = [(self._total(objective, prompts[: state["n_active"]],
                                                        torch.tensor(b)[None])[0].item(), b) for _, b in state["buffer"]]
                        state["buffer"].sort(key=lambda x: x[0])
                        state["best"] = state["buffer"][0]
                    success = False
                step += 1
                state["step"] = step
                dt = time.perf_counter() - t0
                state["losses"].append(state["buffer"][0][0])
                state["suffixes"].append(cm.tokenizer.decode(state["buffer"][0][1]))
                state["step_seconds"].append(dt)
                log.info("step %4d  loss %.4f  %.2f s  prompts %d  %r", step, state["buffer"][0][0], dt,
                         state["n_active"], state["suffixes"][-1])
                if ckpt and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    self._save_checkpoint(ckpt, meta, state, gen)
                if success and cfg.early_stop and state["n_active"] == len(prompts):
                    log.info("every target is the greedy continuation: stopping early")
                    break
        except KeyboardInterrupt:
            if ckpt:
                self._save_checkpoint(ckpt, meta, state, gen)
                log.warning("interrupted at step %d; checkpoint saved, continue with --resume", step)
            raise
        if ckpt:
            self._save_checkpoint(ckpt, meta, state, gen)
        best_ids = state["buffer"][0][1] if success else state["best"][1]
        text = cm.tokenizer.decode(best_ids)
        return AttackResult(
            suffix=text[1:] if text.startswith(" ") else text,
            suffix_ids=best_ids,
            losses=state["losses"],
            suffixes=state["suffixes"],
            step_seconds=state["step_seconds"],
            success=bool(success and state["n_active"] == len(prompts)),
            attack=self.name,
            extra={"objective": cfg.objective, "prompts_used": state["n_active"], "steps": step},
        )

    def _total(self, objective: GCGObjective, prompts: list[_Prompt], cands: Tensor) -> Tensor:
        return sum(objective.loss(p, cands)[0] for p in prompts)

    def _grad(self, cm, objective, prompts, ids, embed) -> tuple[Tensor, list[PrefixCache | None]]:
        """Gradient of the summed loss w.r.t. the one-hot suffix ``[suffix_len, vocab]``, and per
        prompt the cache of the prompt and current suffix that the pass computed on the way
        (the candidates continue from it), or None."""
        w = embed.weight
        one_hot = torch.zeros(ids.shape[0], w.shape[0], device=w.device, dtype=w.dtype)
        one_hot[torch.arange(ids.shape[0]), ids.to(w.device)] = 1
        one_hot.requires_grad_(True)
        emb = (one_hot @ w)[None]
        caches: list = []
        logits: list = []
        loss = sum(objective.loss(p, suffix_embeds=emb, kv_out=caches, logits_out=logits)[0].sum() for p in prompts)
        (g,) = torch.autograd.grad(loss, one_hot)
        for p, lg in zip(prompts, logits):
            if lg is not None:
                objective.narrow(p, lg[0])
        fulls = [None if c is None else PrefixCache.from_cache(cm, c, p.cache.length + len(ids))
                 for p, c in zip(prompts, caches)]
        return g.float(), fulls

    def _batched(self, objective, prompts, cands: Tensor, current: Tensor, batch_size: int,
                 fulls: list[PrefixCache | None] | None = None) -> tuple[Tensor, Tensor | None, int]:
        """Losses of all candidates ``[n]`` (``inf`` for candidates rejected early, which cannot
        be the best), whether every target is their greedy continuation ``[n]`` (target
        objective only, else None), and the batch size that fit; halves the batch size on
        CUDA out-of-memory. ``fulls``: per prompt the cache of the prompt and ``current``,
        where already known.
        """
        packed = objective.terms == ["target"]
        if packed or self.config.reuse_groups > 1:  # else no cache of `current` is read
            fulls = [f if f is not None else p.cache.extended(current.tolist())
                     for p, f in zip(prompts, fulls or [None] * len(prompts))]
        else:
            fulls = [None] * len(prompts)
        fit = batch_size  # what to try next step: 0 (all at once) unless out-of-memory forced a size
        first_diff = (cands != current).int().argmax(1)  # [n]
        size = batch_size or len(cands)
        while True:
            try:
                if packed:
                    chunks = [torch.arange(s, min(s + size, len(cands))) for s in range(0, len(cands), size)]
                    return (*self._target_losses(objective, prompts, cands, fulls, chunks, first_diff), fit)
                return self._grouped(objective, prompts, cands, fulls, size, first_diff), None, fit
            except torch.cuda.OutOfMemoryError:
                if size == 1:
                    raise
                size = fit = max(1, size // 2)
                torch.cuda.empty_cache()
                log.info("out of memory: candidate batch size now %d", size)

    def _grouped(self, objective, prompts, cands: Tensor, fulls: list[PrefixCache | None], size: int,
                 first_diff: Tensor) -> Tensor:
        """Any objective: candidates sorted by the first suffix position they change and run in
        ``reuse_groups`` groups, each from the current suffix's cache cropped at its first change
        (``fulls`` None: from the prompt's cache, whole suffixes)."""
        order = first_diff.argsort(stable=True)
        groups = max(1, min(self.config.reuse_groups, len(cands)))
        size = min(size, -(-len(cands) // groups))
        chunks = [order[s:s + size] for s in range(0, len(order), size)]
        total = torch.zeros(len(cands))
        for p, full in zip(prompts, fulls):
            for idx in chunks:
                if full is None:
                    loss, _ = objective.loss(p, cands[idx])
                else:
                    start = int(first_diff[idx].min())
                    loss, _ = objective.loss(p, cands[idx, start:], cache=full.cropped(p.cache.length + start))
                total[idx] += loss.float().cpu()
        return total

    def _target_losses(self, objective, prompts, cands: Tensor, fulls: list[PrefixCache], chunks: list[Tensor],
                       first_diff: Tensor) -> tuple[Tensor, Tensor]:
        """Target loss (``sum over prompts of mean target cross-entropy``) with exact early
        rejection (see ``prune_after``), and greedy matches, of the candidates in ``chunks``.

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
        Losses of the others are returned as ``inf``.
        """
        cfg = self.config
        p, n = prompts[0], len(cands)
        n_target = len(p.target)
        m = cfg.prune_after or n_target
        if len(prompts) > 1 or m >= n_target:
            return self._target_losses_rerun(objective, prompts, cands, fulls, chunks, first_diff)
        hid = None  # [n, n_target, ...] hidden states of the target positions scored so far
        part = torch.zeros(n)  # lower bound of the summed cross-entropy, over the tokens scored so far
        done = torch.zeros(n, dtype=torch.bool)  # every target token scored
        exact = torch.zeros(n, dtype=torch.bool)
        loss = torch.full((n,), torch.inf)  # exact summed cross-entropy, where known
        hit = torch.zeros(n, dtype=torch.bool)  # every target token is the greedy one, where known

        def keep(idx: Tensor, frm: int, h: Tensor) -> None:
            nonlocal hid
            if hid is None:
                hid = h.new_zeros(n, n_target, *h.shape[2:])
            hid[idx, frm:frm + h.shape[1]] = h
            part[idx] += objective.target_bound(p, h, frm).sum(1).float()

        pass1 = []  # per chunk: (packed cache, the candidates its runs are)
        for idx in chunks:
            h, packed = objective.target_hidden(p, cands[idx], first_diff[idx], fulls[0], m, keep_cache=True)
            keep(idx, 0, h)
            pass1.append((packed, idx))
        first = part.clone()

        def finish(sel: Tensor) -> None:
            """Score candidates ``sel`` (dropped, or not yet past pass 1) to the end, from pass 1's caches."""
            part[sel] = first[sel]
            for packed, idx in pass1:
                rows = torch.isin(idx, sel).nonzero().flatten()
                if len(rows):
                    h, _ = objective.target_hidden_more(p, packed, rows, m, n_target)
                    keep(idx[rows], m, h)
                    done[idx[rows]] = True

        def settle(sel: Tensor) -> None:
            """Exact losses of completed candidates ``sel``."""
            ce, ok = objective.target_exact(p, hid[sel])
            loss[sel], hit[sel], exact[sel] = ce.sum(1).float(), ok.all(1), True

        if self._gap is None:  # no guess yet: complete the most promising few for a true bound
            probe = first.argsort()[: cfg.prune_probe]
            finish(probe)
            settle(probe)
            tau = float(loss[probe].min())
        else:
            tau = float(first.min()) + self._gap
        state, pos = pass1, m
        while pos < n_target:
            nxt = min(n_target, pos + cfg.prune_every) if cfg.prune_every else n_target
            nxt_state = []
            for packed, idx in state:
                rows = ((part[idx] <= tau) & ~done[idx]).nonzero().flatten()
                if len(rows):
                    h, cont = objective.target_hidden_more(p, packed, rows, pos, nxt, keep_cache=nxt < n_target)
                    keep(idx[rows], pos, h)
                    nxt_state.append((cont, idx[rows]))
            state, pos = nxt_state, nxt
        for _, idx in state:
            done[idx] = True
        while True:
            best = float(loss.min())
            ready = (done & ~exact & (part <= best)).nonzero().flatten()
            if len(ready):  # completed, and the bound does not rule it out: lowest bounds first
                settle(ready[part[ready].argsort()[: cfg.prune_probe]])
                continue
            pending = (~done & (part <= best)).nonzero().flatten()
            if not len(pending):
                break
            # the guess was low: what was dropped below the best may beat it (the most promising first)
            finish(pending if exact.any() else pending[part[pending].argsort()[: cfg.prune_probe]])
        self._gap = (best - float(first.min())) * 1.1
        return loss / n_target, hit & exact

    def _target_losses_rerun(self, objective, prompts, cands: Tensor, fulls: list[PrefixCache],
                             chunks: list[Tensor], first_diff: Tensor) -> tuple[Tensor, Tensor]:
        """Several prompts (or no early rejection): pass 1 on the first ``prune_after`` target
        tokens of every prompt; the candidates with the lowest bounds are completed first (by
        rerunning them), then those whose bound is not above the best loss so far."""
        m = self.config.prune_after or max(len(p.target) for p in prompts)
        n = len(cands)
        part = torch.zeros(len(prompts), n)  # pass-1 cross-entropy sums per prompt
        ok = torch.ones(n, dtype=torch.bool)

        def scored(p, rows: Tensor, pi: int, upto: int) -> tuple[Tensor, Tensor]:
            h, _ = objective.target_hidden(p, cands[rows], first_diff[rows], fulls[pi], upto)
            return objective.target_exact(p, h)

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
        head = order[: self.config.prune_probe]
        total[head], match[head] = complete(head)
        upper = float(total[head].min())
        rest = order[self.config.prune_probe:]
        rest = rest[bound[rest] <= upper]
        if len(rest):
            total[rest], match[rest] = complete(rest)
        return total, match

    def _succeeds(self, objective: GCGObjective, prompts: list[_Prompt], ids: Tensor) -> bool:
        """With a target: every target is the greedy continuation. Without: no response
        starts more likely with a refusal token than without (refusal score < 0)."""
        if "target" in objective.terms:
            return all(bool(objective.loss(p, ids[None], with_match=True)[1][0]) for p in prompts)
        return all(float(objective.refusal_score(p, ids[None])[0]) < 0 for p in prompts)

    def _update_buffer(self, state: dict, loss: float, ids: list[int]) -> None:
        """Plain GCG (buffer 0) always moves to the step's best candidate; a buffer keeps the
        best N suffixes seen and grows from its best. ``best`` is the lowest loss ever seen."""
        buf = state["buffer"]
        if self.config.buffer_size == 0:
            buf[:] = [(loss, ids)]
        elif len(buf) < self.config.buffer_size:
            buf.append((loss, ids))
        elif loss < buf[-1][0]:
            buf[-1] = (loss, ids)
        buf.sort(key=lambda x: x[0])
        if loss < state["best"][0]:
            state["best"] = (loss, ids)

    # -- checkpoints --------------------------------------------------------------------------------
    def _save_checkpoint(self, path: Path, meta: dict, state: dict, gen: torch.Generator) -> None:
        from ..artifacts import write_json_atomic

        write_json_atomic(path, {**meta, **state, "rng": gen.get_state().tolist()})

    def _load_checkpoint(self, path: Path | None, meta: dict, gen: torch.Generator) -> dict:
        if path is None or not path.is_file():
            raise UserError(f"nothing to resume: no checkpoint at {path}")
        try:
            ck = json.loads(path.read_text())
        except ValueError:
            raise UserError(f"checkpoint {path} is corrupted; remove it and start again") from None
        if ck.get("fingerprint") != meta["fingerprint"]:
            raise UserError(f"checkpoint {path} is from another model; resume with the model it was made with")
        if ck.get("config") != meta["config"] or ck.get("data") != meta["data"]:
            raise UserError(f"checkpoint {path} was made with another config or other instructions/targets; "
                            "resume with the same settings (only --steps and speed settings such as "
                            "--prune-after or --batch-size may change)")
        gen.set_state(torch.tensor(ck["rng"], dtype=torch.uint8))
        state = {k: ck[k] for k in ("step", "buffer", "best", "losses", "suffixes", "step_seconds", "n_active")}
        state["buffer"] = [tuple(b) for b in state["buffer"]]
        state["best"] = tuple(state["best"])
        return state
