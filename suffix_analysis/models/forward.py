"""Batched forward passes that compute the shared token prefix once.

Chat prompts share a long prefix (BOS, system prompt, the user header). For many forward
passes over the same prompts (one per candidate direction, one per attack candidate), the
prefix is computed once per pass with batch size 1 and its key/value cache is broadcast to
every row. Rows are laid out as ``[shared prefix][padding][rest]`` with position ids that
skip the padding, so each row sees exactly the positions it would see alone.

Hooks registered on the model (ablation, addition, recorders) act on the prefix pass and
on the rest, position by position, so results equal a plain padded forward.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator

import torch
from transformers import DynamicCache

from .chat import pad_left, pad_token_id, position_ids
from .loading import ChatModel


@functools.cache
def _cache_arg(model_class: type) -> str:
    # transformers 5.24 renamed the argument ``past_key_values`` to ``cache`` (the old name
    # warns, and goes in 5.40); older releases and remote code know only the old one.
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def with_cache(model: torch.nn.Module, cache: DynamicCache | None) -> dict:
    """The keyword argument that passes ``cache`` to ``model``'s forward pass."""
    return {_cache_arg(type(model)): cache}


def returned_cache(output) -> DynamicCache | None:
    """The cache a forward pass returned (the output field is named as the argument)."""
    for name in ("cache", "past_key_values"):
        if name in output.keys():
            return output[name]
    return None


def common_prefix_len(rows: list[list[int]], own: int) -> int:
    """Length of the token prefix all rows share, leaving at least ``own`` tokens per row."""
    n = min(len(r) for r in rows) - own
    first = rows[0]
    for r in rows[1:]:
        i = 0
        while i < n and r[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


class PrefixCache:
    """The key/value cache of a prefix, computed once, broadcast to any batch size."""

    def __init__(self, cm: ChatModel, prefix: list[int]):
        self.cm = cm
        self.length = len(prefix)
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        if prefix:
            ids = torch.tensor([prefix], device=cm.device)
            cache = DynamicCache(config=cm.model.config)
            cm.model.base_model(input_ids=ids, **with_cache(cm.model.base_model, cache), use_cache=True)
            self.kv = [(layer.keys, layer.values) for layer in cache.layers]

    @classmethod
    def _from(cls, cm: ChatModel, kv: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> "PrefixCache":
        new = cls.__new__(cls)
        new.cm, new.kv, new.length = cm, kv, length
        return new

    @classmethod
    def from_cache(cls, cm: ChatModel, cache: DynamicCache, length: int) -> "PrefixCache":
        """The first ``length`` positions of a batch-1 cache from another pass (detached)."""
        kv = [(layer.keys[:1, :, :length].detach(), layer.values[:1, :, :length].detach()) for layer in cache.layers]
        return cls._from(cm, kv, length)

    def extended(self, ids: list[int]) -> "PrefixCache":
        """The cache of this prefix followed by ``ids`` (one more batch-1 forward pass)."""
        cm = self.cm
        cache = self.expand(1) or DynamicCache(config=cm.model.config)
        pos = torch.arange(self.length, self.length + len(ids), device=cm.device)[None]
        cm.model.base_model(input_ids=torch.tensor([ids], device=cm.device), position_ids=pos,
                            **with_cache(cm.model.base_model, cache), use_cache=True)
        return PrefixCache._from(cm, [(layer.keys, layer.values) for layer in cache.layers], self.length + len(ids))

    def cropped(self, length: int) -> "PrefixCache":
        """The cache of the first ``length`` tokens (views, no copy)."""
        return PrefixCache._from(self.cm, [(k[:, :, :length], v[:, :, :length]) for k, v in self.kv], length)

    def expand(self, batch: int) -> DynamicCache | None:
        if not self.length:
            return None
        # expand() is a view: the forward pass concatenates onto copies, the prefix stays intact
        data = [(k.expand(batch, *k.shape[1:]), v.expand(batch, *v.shape[1:])) for k, v in self.kv]
        return DynamicCache(ddp_cache_data=data, config=self.cm.model.config)


def prefix_batches(
    cm: ChatModel,
    rows: list[list[int]],
    batch_size: int = 32,
    own: int = 1,
) -> Iterator[tuple[list[int], dict]]:
    """Model kwargs for ``rows`` (token id lists) in batches of similar length, after their
    common prefix: each batch's row indices and the kwargs of its pass.

    The prefix is run once (batch size 1) before the first batch is handed out; ``own``
    tokens of every row stay out of it (e.g. the EOI tokens a hook reads at negative
    positions). Run each batch with ``cm.model(**kwargs)`` or ``cm.model.base_model(**kwargs)``.
    """
    p_len = common_prefix_len(rows, own)
    prefix = PrefixCache(cm, rows[0][:p_len])
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths, less padding
    pad = pad_token_id(cm.tokenizer)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        rest = pad_left([rows[i][p_len:] for i in idx], pad)
        ids, rest_mask = rest["input_ids"], rest["attention_mask"]
        mask = torch.cat([torch.ones(len(idx), p_len, dtype=torch.long), rest_mask], 1)
        pos = p_len + position_ids(rest_mask)
        yield idx, dict(input_ids=ids.to(cm.device), attention_mask=mask.to(cm.device),
                        position_ids=pos.to(cm.device), **with_cache(cm.model, prefix.expand(len(idx))),
                        use_cache=prefix.length > 0)


def run_batches(
    cm: ChatModel,
    rows: list[list[int]],
    batch_size: int = 32,
    logits: bool = True,
    own: int = 1,
    on_batch: Callable[[list[int]], None] | None = None,
) -> torch.Tensor | None:
    """Forward ``rows`` (token id lists) sharing their common prefix (:func:`prefix_batches`).

    Args:
        logits: return next-token logits at the last position, ``[n_rows, vocab]`` float32,
            in the order of ``rows``; otherwise only run the model (for hooks) and return None.
        own: tokens every row keeps out of the shared prefix (e.g. the EOI tokens a hook reads
            at negative positions).
        on_batch: called with the row indices of each batch before it runs (hooks that
            collect per-row results use it).
    """
    out = torch.empty(len(rows), cm.model.config.get_text_config().vocab_size) if logits else None
    for idx, kwargs in prefix_batches(cm, rows, batch_size, own):
        if on_batch is not None:
            on_batch(idx)
        if logits:
            res = cm.model(**kwargs, logits_to_keep=1).logits[:, -1]
            out[idx] = res.float().cpu()
        else:
            cm.model.base_model(**kwargs)
    return out
