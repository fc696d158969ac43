"""Hijacking suppression: a defence read off the mechanism (after Ben-Tov, Geva and Sharif
2025, "Universal jailbreak suffixes are strong attention hijackers").

A universal suffix works by dominating what attention writes at the positions after the
user's message (the EOI positions): ``attribution/hijack.py`` measures that dominance, and on
the organism a few heads just below the direction's layer move their attention from the
instruction to the suffix. At inference the defence sees only the prompt: it knows where the
user's message is (the chat template says so), not where a suffix starts. It looks at every
span of ``window`` consecutive tokens of the user's message, at each EOI position ``j`` of
each defended layer ``l``:

* rule ``head`` (the default): the attention mass head ``h`` puts on the span,
  ``sum_{i in span} A[l, h, j, i]``; above the head's threshold ``tau[l, h]``, the span's
  write in that head, ``A[h, j, i] v[i, h] W_O[h]``, is scaled by ``scale``;
* rule ``layer``: the span's share of the layer's write,
  ``< sum_{i in span, h} A[h, j, i] v[i, h] W_O[h], o[l, j] > / ||o[l, j]||^2`` (the suite's
  dominance); above ``tau[l]``, the span's write is scaled in every head.

The probabilities are not renormalized: what the span wrote shrinks, nothing else grows.
The thresholds come from clean training prompts only (:func:`calibrate`): each is the
``quantile`` of the largest span value per prompt over prompts without a suffix, so a clean
prompt is rarely touched (at most ``1 - quantile`` of them per head or layer).

Hook vocabulary: the defence reads ``blocks.{l}.attn.hook_pattern`` and the value vectors,
and edits the attention module's output at the EOI rows of the prompt's pass. With
``generated`` thresholds (calibrated on clean greedy continuations, :func:`calibrate`'s
``generate_tokens``) it also edits each generated token's row at its decoding step, by the
same rule: a suffix's words can reach the answer through the generated tokens, which attend
to it directly. The value vectors of earlier steps are kept for that (the model's KV cache
is not read). A hook on
``blocks.{l}.hook_attn_out`` (the output projection) still sees the undefended write;
``blocks.{l}.hook_resid_mid`` and everything after it see the defended one. It needs eager attention
(switched on while it runs) and a model with a pre-norm residual (no norm after attention).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..attribution.regions import prompt_regions
from ..attribution.writers import head_weights, recording_values
from ..config import setting
from ..errors import UserError
from ..models.chat import position_ids
from ..models.hooks import run_with_hooks
from ..models.loading import ChatModel

log = logging.getLogger(__name__)


RULES = ("head", "layer")


@dataclass(frozen=True)
class SuppressionConfig:
    """Hijacking suppression settings; the thresholds are calibrated unless given."""

    layers: str = setting("upto", "defended layers: 'upto' (every layer up to the direction's), 'below' (those "
                                  "below it), 'all', or 'A-B'")
    threshold: float = setting(0.0, "one threshold in (0, 1] for every layer instead of calibrated ones "
                                    "(0: calibrate on clean train prompts)")
    quantile: float = setting(0.9, "calibration: a threshold is this quantile of clean prompts' largest span value")
    scale: float = setting(0.1, "factor on the write of a dominating token (0 removes it)")
    rule: str = setting("head", "head: a span whose attention mass in one head is above that head's threshold is "
                                "scaled in that head; layer: a span whose share of the layer's write is above the "
                                "layer's threshold is scaled in every head")
    window: int = setting(4, "tokens per source span: a span of this many consecutive user tokens whose summed "
                             "share is above the threshold is suppressed whole (1: single tokens)")
    n_calibration: int = setting(64, "clean train prompts per class (harmful, harmless) to calibrate on")
    generated: int = setting(0, "also defend the generated tokens, with thresholds of their own calibrated on this "
                                "many greedy tokens of each clean prompt (0: the EOI positions only)")
    persist: bool = setting(False, "keep scaling the spans flagged at the EOI positions (in the same heads) in every "
                                   "generated token's row too: a hijacking span stays suppressed for the whole answer")

    def validate(self) -> None:
        if not (self.threshold == 0 or 0 < self.threshold <= 1):
            raise UserError(f"the suppression threshold must be in (0, 1] (or 0: calibrate), got {self.threshold}")
        if not 0 < self.quantile < 1:
            raise UserError(f"quantile must be in (0, 1), got {self.quantile}")
        if not 0 <= self.scale < 1:
            raise UserError(f"scale must be in [0, 1) (1 would change nothing), got {self.scale}")
        if self.n_calibration < 1:
            raise UserError("n_calibration must be at least 1")
        if self.window < 1:
            raise UserError(f"window must be at least 1 token, got {self.window}")
        if self.generated < 0:
            raise UserError(f"generated must be 0 (EOI positions only) or a number of tokens, got {self.generated}")
        if self.rule not in RULES:
            raise UserError(f"unknown suppression rule {self.rule!r}; use {' or '.join(RULES)}")


@dataclass
class Suppression:
    """A calibrated defence: the threshold of each defended layer and the scale."""

    thresholds: dict[int, float | list[float]]  # per layer (rule 'layer'), or per layer a list per head ('head')
    scale: float = 0.1
    record: dict = field(default_factory=dict)  # how the thresholds were made
    window: int = 1  # tokens per source span
    rule: str = "layer"
    generated: dict[int, float | list[float]] | None = None  # thresholds of the generated tokens' rows (None: undefended)
    persist: bool = False  # the sources flagged at the EOI rows stay scaled in the generated tokens' rows

    def to_dict(self) -> dict:
        gen = None if self.generated is None else {str(l): t for l, t in self.generated.items()}
        return {"thresholds": {str(l): t for l, t in self.thresholds.items()}, "scale": self.scale,
                "window": self.window, "rule": self.rule, "generated": gen, "persist": self.persist, **self.record}

    @classmethod
    def from_dict(cls, d: dict) -> Suppression:
        try:
            def read(m: dict) -> dict:
                return {int(l): [float(x) for x in t] if isinstance(t, list) else float(t) for l, t in m.items()}

            rest = {k: v for k, v in d.items()
                    if k not in ("thresholds", "scale", "window", "rule", "generated", "persist")}
            gen = read(d["generated"]) if d.get("generated") else None
            return cls(read(d["thresholds"]), float(d["scale"]), rest, int(d.get("window", 1)),
                       str(d.get("rule", "layer")), gen, bool(d.get("persist", False)))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise UserError("not a suppression record this suite wrote (thresholds and scale)") from None


def check_model(cm: ChatModel) -> None:
    """One line for a model the defence cannot run on, before anything runs."""
    if cm.arch.post_norm_writers:
        raise UserError(f"{cm.model.config.model_type} normalizes attention's output before the residual stream; "
                        "hijacking suppression is implemented for pre-norm models (Llama, Qwen2, Mistral, SmolLM)")
    if cm.arch.pattern_output is None:
        raise UserError(f"{cm.model.config.model_type} attention does not return its probabilities (e.g. Qwen-1's "
                        "remote code); hijacking suppression needs attn.hook_pattern")
    if cm.dispatched:
        raise UserError("hijacking suppression reads W_O and the value vectors of one device; load the model "
                        "without a device map or quantization")


def parse_layers(cm: ChatModel, spec: str, direction_layer: int) -> list[int]:
    """The defended layers of ``spec`` ('upto', 'below', 'all', 'A-B')."""
    if spec == "upto":
        out = list(range(direction_layer + 1))
    elif spec == "below":
        out = list(range(max(direction_layer, 1)))
    elif spec == "all":
        out = list(range(cm.n_layers))
    else:
        try:
            a, _, b = spec.partition("-")
            out = list(range(int(a), int(b or a) + 1))
        except ValueError:
            raise UserError(f"layers must be 'upto', 'below', 'all' or 'A-B', got {spec!r}") from None
    if not out or min(out) < 0 or max(out) >= cm.n_layers:
        raise UserError(f"layers {spec!r} out of range for a model with {cm.n_layers} layers")
    return out


def user_start(cm: ChatModel) -> int:
    """Tokens of the template before the user's message (constant for a template: checked on
    two probe messages)."""
    starts = {r.spans["instruction"][0] for r in prompt_regions(cm.chat, ["Hello there.", "Write a list of words"])}
    if len(starts) != 1:
        raise UserError("the chat template puts the user's message at different offsets for different messages; "
                        "hijacking suppression cannot locate it")
    return starts.pop()


def shares(pattern: Tensor, values: Tensor, w_o: Tensor, n_dest: int) -> Tensor:
    """``share[b, j, i]`` for the last ``n_dest`` query rows: each source's part of the
    attention output there. ``pattern`` ``[b, h, q, k]``, ``values`` ``[b, k, h, d_head]``,
    ``w_o`` ``[h, d_head, d_model]``. Never forms per-source ``d_model`` vectors: the output
    is projected back through ``W_O`` per head (``g = W_O[h] o``)."""
    a = pattern[:, :, -n_dest:].float()  # [b, h, j, k]
    v = values.float()
    z = torch.einsum("bhjk,bkhd->bjhd", a, v)  # [b, j, h, d_head]
    o = torch.einsum("bjhd,hdm->bjm", z, w_o)  # [b, j, d_model]
    g = torch.einsum("hdm,bjm->bjhd", w_o, o)  # [b, j, h, d_head]
    num = torch.einsum("bhjk,bkhd,bjhd->bjk", a, v, g)
    return num / o.pow(2).sum(-1, keepdim=True).clamp_min(1e-12)


def span_shares(s: Tensor, user: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """Summed shares of every span of ``window`` consecutive user tokens, ``[b, j, k]`` (at the
    span's first token; -inf where the span leaves the user's message), and, per token, the
    largest span share covering it. ``s`` ``[b, j, k]``, ``user`` ``[b, 1, k]`` bool."""
    if window == 1:
        spans = torch.where(user, s, torch.full_like(s, float("-inf")))
        return spans, spans
    su = torch.where(user, s, torch.zeros_like(s))
    pad = torch.nn.functional.pad
    csum = pad(su.cumsum(-1), (1, 0))
    count = pad(user.float().cumsum(-1), (1, 0)).expand_as(csum)
    k = s.shape[-1]
    sums = torch.full_like(s, float("-inf"))
    if k >= window:
        inside = (count[..., window:] - count[..., :-window]) == window
        sums[..., : k - window + 1] = torch.where(inside, csum[..., window:] - csum[..., :-window],
                                                  torch.full_like(inside, float("-inf"), dtype=s.dtype))
    # a token's largest covering span: max over the spans starting at i - window + 1 .. i
    cover = pad(sums, (window - 1, 0), value=float("-inf")).unfold(-1, window, 1).amax(-1)
    return sums, cover


class _Pass:
    """What one forward pass needs: the rows' user spans (from the attention mask of the
    prompt's pass; a decoding step keeps them) and where the prompt ends (``prompt_len``: a
    pass whose tokens go on after the prompt, a continuation scored with teacher forcing)."""

    def __init__(self, cm: ChatModel, prompt_len: int | None = None):
        self.start, self.n_eoi, self.prompt_len = user_start(cm), cm.chat.n_eoi, prompt_len
        self.user: Tensor | None = None  # [b, k] bool: the user's message tokens
        self.end = 0  # the prompt's end in this pass: its EOI rows are end - n_eoi .. end
        self.decoding = False

    def capture(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:  # embeddings given (an attack's gradient pass): the same positions
            ids = kwargs.get("inputs_embeds")
        if ids is None:
            self.user = None
            return
        mask = kwargs.get("attention_mask")
        b, k = ids.shape[:2]
        cached = mask is not None and mask.shape[-1] > k  # tokens before this pass sit in a cache
        self.decoding = cached and k == 1
        if self.decoding:  # a step of generate: the prompt's user spans still hold
            return
        # A pass after a shared prefix (CE, scoring), or of the prefix itself (no mask): where its
        # prompt ends is unknown here, so it runs undefended; score a continuation in one pass
        # with prompt_len instead.
        if cached or (mask is None and self.prompt_len is None) or (self.prompt_len is None and k <= self.n_eoi):
            self.user = None
            return
        self.end = k if self.prompt_len is None else self.prompt_len
        if not self.n_eoi < self.end <= k:
            raise UserError(f"prompt_len {self.prompt_len} does not fit a pass of {k} tokens")
        pad = (k - mask.sum(-1)).long() if mask is not None else torch.zeros(b, dtype=torch.long, device=ids.device)
        pos = torch.arange(k, device=ids.device)[None]
        self.user = (pos >= (pad + self.start)[:, None]) & (pos < self.end - self.n_eoi)


@contextmanager
def suppressing(cm: ChatModel, defence: Suppression, observe: dict | None = None,
                prompt_len: int | None = None) -> Iterator[None]:
    """Run ``cm`` with hijacking suppressed (``generate`` included) inside the block.
    ``observe``, if given, receives per layer the shares ``[b, n_eoi, k]`` and the suppressed
    mask of the last prompt pass, and ``generated``: the largest span value each row's
    generated tokens reached so far, ``[b]`` (rule 'layer') or ``[b, h]`` (for calibration
    and tests). ``prompt_len``: every pass holds a prompt of that many tokens (rows padded on
    the left to it) followed by a continuation, as when an attacker scores a target with
    teacher forcing; the continuation's rows are defended as generated tokens are."""
    check_model(cm)
    layers = sorted(defence.thresholds)
    state = _Pass(cm, prompt_len)
    w_o = {l: head_weights(cm, l) for l in layers}
    at = cm.arch.pattern_output
    past: dict[int, Tensor] = {}  # per layer: the value vectors of the prompt and the steps so far
    flagged: dict[int, Tensor] = {}  # per layer: the sources hit at the EOI rows, [b, h or 1, k] (persist)
    heads = cm.model.config.get_text_config().num_attention_heads
    never = [float("inf")] * heads if defence.rule == "head" else float("inf")

    def judge(l: int, a: Tensor, v: Tensor, rows: slice, th_l, user: Tensor) -> tuple:
        """Which sources to scale in ``rows`` of the pattern ``a`` ``[b, h, q, k]``: the hit mask
        ``[b, h or 1, j, k]``, and the shares and span values behind it."""
        if defence.rule == "head":  # the attention mass each head puts on each span
            m = a[:, :, rows].float()  # [b, h, j, k]
            b_, h_, j_, k_ = m.shape
            spans, cover = span_shares(m.reshape(b_, h_ * j_, k_), user, defence.window)
            th = torch.tensor(th_l, device=m.device)[None, :, None, None]
            hit = user[:, None] & (cover.reshape(m.shape) > th)  # [b, h, j, k]
            shown = torch.where(user[:, None], m, torch.full_like(m, float("nan")))
            return hit, shown, spans.reshape(m.shape)
        sub = a[:, :, rows]
        s = shares(sub, v, w_o[l], sub.shape[2])  # [b, j, k]: the share of the layer's write each source takes
        spans, cover = span_shares(s, user, defence.window)
        hit = (user & (cover > th_l))[:, None]  # [b, 1, j, k]: every head
        return hit, torch.where(user, s, torch.full_like(s, float("nan"))), spans

    def edit(l: int, values: dict[int, Tensor]):
        # a forward hook on the attention module: its output holds the probabilities and the
        # output projection's result (``hook_attn_out`` of a pre-norm model), so both are read here
        def fn(module, args, out):
            a = out[at] if isinstance(out, tuple) and len(out) > at else None
            if state.user is None or a is None:
                return None
            q, k = a.shape[2], a.shape[-1]
            gen = (defence.generated or {}).get(l, never if observe is not None else None)
            if state.decoding and q == 1:  # one generated token's row, against every key so far
                if (gen is None and not defence.persist) or l not in past:
                    return None
                past[l] = v = torch.cat([past[l], values[l]], 1)
                groups = [(slice(q - 1, q), gen, True)]
            elif q <= 1:
                return None
            else:
                past[l] = v = values[l]  # flagged[l] is set anew by the EOI rows below
                e = state.end
                groups = [(slice(e - state.n_eoi, e), defence.thresholds[l], False)]
                if e < q and (gen is not None or defence.persist):  # a teacher-forced continuation
                    groups.append((slice(e, q), gen, True))
            user = torch.nn.functional.pad(state.user, (0, k - state.user.shape[1]))[:, None].to(a.device)  # [b, 1, k]
            o, new = out[0], None
            for rows, th_l, generated in groups:
                if th_l is None:  # persist alone: only the spans flagged at the EOI rows
                    hit = torch.zeros(1, 1, 1, k, dtype=torch.bool, device=a.device)
                else:
                    hit, shown, spans = judge(l, a, v, rows, th_l, user)
                if generated and defence.persist and l in flagged:
                    hit = hit | torch.nn.functional.pad(flagged[l], (0, k - flagged[l].shape[-1]))[:, :, None]
                elif not generated:
                    flagged[l] = hit.any(2)  # [b, h or 1, k]
                if observe is not None and th_l is not None:
                    if generated:
                        top = spans.amax(dim=(-2, -1)).clamp_min(-1.0).detach().cpu()  # [b] or [b, h]
                        seen = observe.setdefault(l, {})
                        seen["generated"] = top if "generated" not in seen else torch.maximum(seen["generated"], top)
                    else:
                        observe[l] = {"shares": shown.detach().cpu(), "spans": spans.detach().cpu(), "hit": hit.cpu()}
                if not hit.any():
                    continue
                aa = a[:, :, rows].float() * hit.float()  # [b, h, j, k]: only the dominating sources
                removed = torch.einsum("bhjk,bkhd,hdm->bjm", aa, v.float(), w_o[l])
                new = o.clone() if new is None else new
                new[:, rows] = (o[:, rows].float() - (1 - defence.scale) * removed).to(o.dtype)
            return None if new is None else (new, *out[1:])
        return fn

    with ExitStack() as stack:
        values = stack.enter_context(recording_values(cm, layers))
        # a read-only pattern hook per layer makes run_with_hooks switch to eager attention
        stack.enter_context(run_with_hooks(cm, [(f"blocks.{l}.attn.hook_pattern", lambda a, hook: None)
                                                for l in layers]))
        # on the decoder, which every entry point calls (the causal LM, or its base_model directly)
        handles = [cm.model.base_model.register_forward_pre_hook(state.capture, with_kwargs=True)]
        handles += [cm.layers[l].get_submodule(cm.arch.attn).register_forward_hook(edit(l, values)) for l in layers]
        for h in handles:
            stack.callback(h.remove)
        yield


@torch.no_grad()
def calibrate(cm: ChatModel, instructions: list[str], layers: list[int], quantile: float = 0.9,
              scale: float = 0.1, batch_size: int = 16, window: int = 4, rule: str = "head",
              generate_tokens: int = 0) -> Suppression:
    """Thresholds from clean prompts: ``tau`` = the ``quantile`` of the largest value any span of
    ``window`` user tokens takes per prompt: per layer its share of the write (rule 'layer'),
    per head its attention mass (rule 'head'). With ``generate_tokens``, the generated tokens'
    thresholds too: the same quantile of the largest value over each prompt's first
    ``generate_tokens`` greedy tokens."""
    if not instructions:
        raise UserError("calibrating hijacking suppression needs clean training prompts; none were given")
    heads = cm.model.config.get_text_config().num_attention_heads
    never = {l: [float("inf")] * heads if rule == "head" else float("inf") for l in layers}
    probe = Suppression(never, scale, window=window, rule=rule)  # nothing is suppressed
    maxima: dict[int, list[Tensor]] = {l: [] for l in layers}
    gen_maxima: dict[int, list[Tensor]] = {l: [] for l in layers}
    for s in range(0, len(instructions), batch_size):
        seen: dict = {}
        batch = cm.chat.encode(instructions[s:s + batch_size], device=cm.device)
        with suppressing(cm, probe, observe=seen):  # positions from each row's first token, as generate numbers them
            if generate_tokens:
                cm.model.generate(**batch, max_new_tokens=generate_tokens, do_sample=False,
                                  pad_token_id=cm.tokenizer.pad_token_id)
            else:
                cm.model(**batch, position_ids=position_ids(batch["attention_mask"]))
        for l in layers:
            maxima[l].append(seen[l]["spans"].amax(dim=(-2, -1)).clamp_min(-1.0))  # [b] or [b, h]
            if generate_tokens:
                gen_maxima[l].append(seen[l]["generated"])

    def quantiles(m: dict[int, list[Tensor]]) -> dict:
        out = {}
        for l in layers:
            q = torch.quantile(torch.cat(m[l]).float(), quantile, dim=0)
            out[l] = [float(x) for x in q] if rule == "head" else float(q)
        return out

    record = {"quantile": quantile, "n_calibration": len(instructions), "generate_tokens": generate_tokens}
    return Suppression(quantiles(maxima), scale, record, window, rule,
                       quantiles(gen_maxima) if generate_tokens else None)


CALIBRATION_SETS = ("harmful:train", "harmless:train")


def build_defence(cm: ChatModel, cfg: SuppressionConfig, direction_layer: int, data_dir: str | None = None,
                  batch_size: int = 16) -> Suppression:
    """The defence of ``cfg``: its layers, and its thresholds (one given, or calibrated on the
    first ``n_calibration`` prompts of harmful:train and harmless:train, without suffixes)."""
    from ..datasets import load_instructions

    cfg.validate()
    check_model(cm)
    layers = parse_layers(cm, cfg.layers, direction_layer)
    if cfg.threshold:
        heads = cm.model.config.get_text_config().num_attention_heads
        th = {l: [cfg.threshold] * heads if cfg.rule == "head" else cfg.threshold for l in layers}
        return Suppression(th, cfg.scale, {"threshold": cfg.threshold}, cfg.window, cfg.rule,
                           th if cfg.generated else None, cfg.persist)
    clean = [x.instruction for spec in CALIBRATION_SETS
             for x in load_instructions(spec, data_dir)[: cfg.n_calibration]]
    d = calibrate(cm, clean, layers, cfg.quantile, cfg.scale, batch_size, cfg.window, cfg.rule, cfg.generated)
    d.record["calibration"] = f"first {cfg.n_calibration} of {' and '.join(CALIBRATION_SETS)}"
    d.persist = cfg.persist
    flat = [x for t in d.thresholds.values() for x in (t if isinstance(t, list) else [t])]
    log.info("hijacking suppression: per %s, layers %s, spans of %d, thresholds %.3f..%.3f (quantile %.2f of %d clean "
             "train prompts), scale %g", cfg.rule, cfg.layers, cfg.window, min(flat), max(flat), cfg.quantile,
             len(clean), cfg.scale)
    if d.generated:
        gen = [x for t in d.generated.values() for x in (t if isinstance(t, list) else [t])]
        log.info("hijacking suppression of the generated tokens: thresholds %.3f..%.3f (the same quantile over %d "
                 "greedy tokens of each)", min(gen), max(gen), cfg.generated)
    return d


@torch.no_grad()
def completion_ce(cm: ChatModel, defence: Suppression, instructions: list[str], completions: list[str],
                  batch_size: int = 16) -> float:
    """Mean per-token CE of ``completions`` as responses to ``instructions`` under the defence
    (``evaluation.loss.completion_ce`` with the defence on: each prompt and its response in one
    teacher-forced pass, prompts padded on the left and responses on the right, so the
    defence knows where each prompt ends)."""
    tok = cm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    pairs = [(p, tok(c, add_special_tokens=False)["input_ids"]) for p, c in zip(cm.chat.tokenize(instructions),
                                                                              completions)]
    pairs = [(p, r) for p, r in pairs if r]
    total, count = 0.0, 0
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        n_p, n_r = max(len(p) for p, _ in chunk), max(len(r) for _, r in chunk)
        ids = torch.full((len(chunk), n_p + n_r), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, (p, r) in enumerate(chunk):
            ids[j, n_p - len(p): n_p + len(r)] = torch.tensor(p + r)
            mask[j, n_p - len(p): n_p + len(r)] = 1
        ids, mask = ids.to(cm.device), mask.to(cm.device)
        with suppressing(cm, defence, prompt_len=n_p):
            logits = cm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
        lp = torch.log_softmax(logits[:, n_p - 1: -1].float(), -1).gather(-1, ids[:, n_p:, None])[..., 0]
        keep = mask[:, n_p:].bool()
        total -= float(lp[keep].double().sum())
        count += int(keep.sum())
    return total / max(count, 1)
