"""What GCG minimizes, for batches of suffixes on one prompt.

Terms (``objective``, combined with ``+``):

* ``target``: mean cross-entropy of the target response (the classic GCG loss);
* ``refusal``: the refusal score (log-odds of the refusal tokens) at the response start;
* ``direction``: mean projection of ``blocks.{l}.hook_resid_pre`` at the EOI positions
  onto the refusal direction of a direction run, counted only above a floor per position
  (harmless prompts' mean, when given) (the pass stops at layer ``l`` when nothing above
  it is needed);
* ``harmfulness``: how far the projection of the same ``hook_resid_pre`` at the suffix's
  last token (where the user's message ends) onto the harmfulness direction (harmful minus
  harmless mean, no suffix) has fallen below a set share of the harmful-harmless gap: keeps
  the request read as harmful, so that the refusal falls without the answer changing topic;
* ``attention``: minus the share of attention the last prompt token pays to the suffix
  (``attn.hook_pattern``), averaged over heads and layers (eager attention).

The target term also has the cheap forms the candidate scoring needs: hidden states of
packed candidate runs (:meth:`GCGObjective.target_hidden`), their exact cross-entropy
(:meth:`~GCGObjective.target_exact`) and a lower bound of it over a vocabulary subset
(:meth:`~GCGObjective.target_bound`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache

from ...errors import UserError
from ...metrics import refusal_score, token_ce
from ...models.forward import PrefixCache, with_cache
from ...models.hooks import run_with_hooks
from ...models.loading import ChatModel
from ...models.packing import Packed, continue_packed, forward_packed, softcap, unembed
from ...models.placement import materialized
from .config import GCGConfig


@dataclass
class Prompt:
    """One instruction as GCG sees it: the tokens around the suffix, and its caches."""

    instruction: str
    before: list[int]  # tokens before the suffix (chat prefix + instruction)
    after: list[int]  # EOI tokens after the suffix
    target: list[int]
    cache: PrefixCache | None = None  # of ``before``
    bound_ids: Tensor | None = None  # [n_target, K] vocabulary subsets for GCGObjective.target_bound
    bound_rows: Tensor | None = None  # [n_target, K, d_model] their unembedding rows, gathered on first use


@dataclass
class Harmfulness:
    """The harmfulness term's reference at the direction's layer: the unit harmful minus
    harmless mean ``[d_model]`` at the last token of the user's message, and the two means'
    projections onto it."""

    unit: Tensor  # [d_model]
    harmful: float
    harmless: float

    def level(self, keep: float) -> float:
        """The projection that keeps ``keep`` of the harmful-harmless gap."""
        return self.harmless + keep * (self.harmful - self.harmless)


class _StopAtProbe(Exception):
    """Raised by the direction probe once it has what it needs: the layers above it are skipped."""


class GCGObjective:
    """Computes the (weighted, summed) objective for batches of suffixes on one prompt."""

    def __init__(self, cm: ChatModel, cfg: GCGConfig, direction: tuple[Tensor, int] | None, suffix_len: int,
                 direction_floor: Tensor | None = None, harmfulness: Harmfulness | None = None):
        self.cm, self.cfg, self.suffix_len = cm, cfg, suffix_len
        self.terms = cfg.terms
        self.direction = None  # (unit vector [d_model] float32, layer)
        self.floor = None  # [n_eoi] projection floor per EOI position
        self.harm = None  # (unit vector [d_model] float32, projection level below which the term grows)
        if "harmfulness" in self.terms:
            if direction is None or harmfulness is None:
                raise UserError("the harmfulness objective needs --direction RUN (its layer is the direction's)")
            self.harm = (harmfulness.unit.to(cm.device, torch.float32), harmfulness.level(cfg.harmfulness_keep))
        if "direction" in self.terms or self.harm is not None:
            if direction is None:
                raise UserError("the direction objective needs --direction RUN")
            vec, layer = direction
            self.direction = ((vec / vec.norm()).to(cm.device, torch.float32), layer)
            if direction_floor is not None:
                if direction_floor.shape != (len(cm.chat.eoi_ids),):
                    raise UserError(f"direction floor has shape {tuple(direction_floor.shape)}, expected one value "
                                    f"per EOI position ({len(cm.chat.eoi_ids)})")
                self.floor = direction_floor.to(cm.device, torch.float32)
        if "attention" in self.terms and getattr(cm.model.config, "_attn_implementation", "eager") != "eager":
            cm.model.set_attn_implementation("eager")  # once, not per pass: only eager returns the pattern

    def _inputs(self, suffix: Tensor | None, suffix_embeds: Tensor | None, rest: list[int],
                cache: PrefixCache | DynamicCache | None, start: int) -> tuple[dict, DynamicCache | None]:
        """Model kwargs for suffix tokens (ids ``[batch, n]`` or embeddings) then ``rest``,
        after ``start`` cached positions, and the cache they pass (the pass extends it)."""
        cm, dev = self.cm, self.cm.device
        batch = suffix.shape[0] if suffix is not None else suffix_embeds.shape[0]
        rest_t = torch.tensor(rest, device=dev, dtype=torch.long).expand(batch, -1)
        if suffix_embeds is not None:
            kwargs = {"inputs_embeds": torch.cat([suffix_embeds, cm.model.get_input_embeddings()(rest_t)], 1)}
        else:
            kwargs = {"input_ids": torch.cat([suffix.to(dev), rest_t], 1)}
        length = next(iter(kwargs.values())).shape[1]
        if isinstance(cache, PrefixCache):
            cache = cache.expand(batch)
        kwargs.update(position_ids=torch.arange(start, start + length, device=dev).expand(batch, -1),
                      **with_cache(cm.model, cache), use_cache=start > 0 or cache is not None)
        return kwargs, cache

    def _term_hooks(self, prompt: Prompt, n_suffix: int, stop: bool, values: dict) -> list:
        """Hooks that read the direction and attention terms of one pass into ``values``."""
        hooks = []
        n_after = len(prompt.after)
        if self.direction is not None:
            unit, layer = self.direction
            eoi = slice(n_suffix, n_suffix + n_after)  # where the EOI tokens sit in the tokens being run

            def probe(x: Tensor, hook) -> None:  # x: [batch, run tokens, d_model]
                # x sits on its layer's device (a device map may spread the layers)
                if "direction" in self.terms:
                    proj = x[:, eoi].float() @ unit.to(x.device)  # [batch, n_eoi]
                    if self.floor is not None:
                        proj = (proj - self.floor.to(x.device)).clamp(min=0)
                    values["direction"] = proj.mean(1).to(self.cm.device)  # [batch]
                if self.harm is not None:  # the suffix's last token is the run's token n_suffix - 1
                    h_unit, level = self.harm
                    reading = x[:, n_suffix - 1].float() @ h_unit.to(x.device)  # [batch]
                    values["harmfulness"] = (level - reading).clamp(min=0).to(self.cm.device)
                if stop:
                    raise _StopAtProbe

            hooks.append((f"blocks.{layer}.hook_resid_pre", probe))
        if "attention" in self.terms:
            s0 = len(prompt.before)  # the suffix's key positions follow the prompt's tokens
            q = n_suffix + n_after - 1  # the last EOI token, where the response starts
            shares = values.setdefault("attention", [])

            def share(pattern: Tensor, hook) -> None:  # [batch, head, run tokens, all tokens]
                shares.append(pattern[:, :, q, s0:s0 + self.suffix_len].sum(-1).mean(1).to(self.cm.device))

            hooks.append((lambda name: name.endswith("attn.hook_pattern"), share))
        return hooks

    def loss(self, prompt: Prompt, suffix: Tensor | None = None, suffix_embeds: Tensor | None = None,
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
        n_target = len(prompt.target)
        need_logits = any(t in self.terms for t in ("target", "refusal")) or with_match
        only_probe = set(self.terms) <= {"direction", "harmfulness"} and not with_match
        # The last target token predicts nothing the loss uses: it is not run.
        rest = prompt.after + prompt.target[:-1]
        kwargs, pass_cache = self._inputs(suffix, suffix_embeds, rest, cache, cache.length if cache else 0)
        n_logits = max(n_target, 1)  # logits at the last EOI position and every target position but the last
        values: dict = {}
        out = None
        try:
            with run_with_hooks(cm, self._term_hooks(prompt, n_suffix, only_probe, values)):
                out = cm.model.base_model(**kwargs) if only_probe else cm.model(**kwargs, logits_to_keep=n_logits)
        except _StopAtProbe:
            out = None
        if logits_out is not None and not need_logits:
            logits_out.append(None)
        if kv_out is not None:
            kv_out.append(pass_cache if out is not None and kwargs["use_cache"] else None)
        total = torch.zeros(batch, device=dev)
        match = None
        if need_logits:
            logits = out.logits.float().to(dev)  # [batch, max(n_target, 1), vocab]
            if logits_out is not None:
                logits_out.append(logits.detach())
            tgt = torch.tensor(prompt.target, device=dev)
            if "target" in self.terms:
                total = total + token_ce(logits, tgt.expand(batch, -1)).mean(1)
            if "refusal" in self.terms:
                total = total + self.cfg.refusal_weight * refusal_score(logits[:, 0], cm.refusal_ids)
            if with_match:
                match = (logits.argmax(-1) == tgt).all(1)
        if "direction" in values:
            total = total + self.cfg.direction_weight * values["direction"]
        if "harmfulness" in values:
            total = total + self.cfg.harmfulness_weight * values["harmfulness"]
        if "attention" in self.terms:
            total = total - self.cfg.attention_weight * torch.stack(values["attention"]).mean(0)
        return total, match

    def target_hidden(self, prompt: Prompt, cands: Tensor, first: Tensor, full: PrefixCache, upto: int,
                      keep_cache: bool = False) -> tuple[Tensor, Packed | None]:
        """Final hidden states ``[n, upto, d_model]`` that predict the first ``upto`` target
        tokens, for candidates ``[n, suffix_len]``, and (with ``keep_cache``) the packed cache
        to continue from.

        ``full`` is the cache of the prompt and the current suffix; candidate ``i`` first
        differs from it at suffix position ``first[i]`` and runs only the tokens from there
        on, all candidates packed into one call (see :mod:`suffix_analysis.models.packing`).
        """
        n_prefix = full.length - self.suffix_len
        tail = prompt.after + prompt.target[: upto - 1]
        starts = first.tolist()
        runs = [row[s:] + tail for row, s in zip(cands.tolist(), starts)]
        return forward_packed(self.cm, full, runs, [n_prefix + s for s in starts], upto,
                              row_tokens=self.cfg.row_tokens, keep_cache=keep_cache)

    def target_hidden_more(self, prompt: Prompt, packed: Packed, which: Tensor, frm: int, to: int,
                           keep_cache: bool = False) -> tuple[Tensor, Packed | None]:
        """Hidden states ``[len(which), to - frm, d_model]`` that predict target tokens
        ``frm..to-1``, continuing runs ``which`` of a pass that got the first ``frm``; and
        (``keep_cache``) the cache to continue from, whose run ``j`` is ``which[j]``."""
        runs = [prompt.target[frm - 1:to - 1]] * len(which)
        return continue_packed(self.cm, packed, which.tolist(), runs, to - frm, keep_cache=keep_cache)

    def target_exact(self, prompt: Prompt, hidden: Tensor, frm: int = 0) -> tuple[Tensor, Tensor]:
        """Cross-entropy of target tokens ``frm..frm+k-1`` from their hidden states ``[n, k, d_model]``,
        and whether each is the greedy token: ``[n, k]`` each, on the CPU."""
        logits = unembed(self.cm, hidden).float()  # [n, k, vocab]
        tgt = torch.tensor(prompt.target[frm:frm + hidden.shape[1]], device=logits.device).expand(len(hidden), -1)
        return token_ce(logits, tgt).cpu(), (logits.argmax(-1) == tgt).cpu()

    def target_bound(self, prompt: Prompt, hidden: Tensor, frm: int = 0) -> Tensor:
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
            with materialized(self.cm.model.get_output_embeddings()) as head:
                weight = head.weight.detach()
                prompt.bound_rows = weight[prompt.bound_ids.to(weight.device)].to(hidden.device)
        rows = prompt.bound_rows[frm:frm + hidden.shape[1]]  # [k, K, d_model], column 0: the target token
        logits = softcap(self.cm, torch.einsum("nkd,kvd->nkv", hidden, rows)).float()  # [n, k, K]
        return (torch.logsumexp(logits, -1) - logits[..., 0]).cpu()

    def narrow(self, prompt: Prompt, logits: Tensor) -> None:
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

    def refusal_score(self, prompt: Prompt, suffix: Tensor) -> Tensor:
        """Refusal score at the response start for suffixes ``[batch, suffix_len]``: ``[batch]``."""
        cache = prompt.cache
        kwargs, _ = self._inputs(suffix, None, prompt.after, cache, cache.length if cache else 0)
        out = self.cm.model(**kwargs, logits_to_keep=1)
        return refusal_score(out.logits[:, -1], self.cm.refusal_ids)
