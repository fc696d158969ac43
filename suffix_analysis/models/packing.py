"""Many short token runs that continue one shared cache, packed into few batch rows.

GCG scores hundreds of candidate suffixes that differ from the current suffix from some
position on. Each candidate only needs the tokens from its first change onward; the rest
(the prompt and the unchanged suffix head) is in the key/value cache of the current
suffix. The runs have different lengths and see different amounts of that cache, so in a
plain batch they would need padding (or one call per length). Here they are packed end to
end into a few rows of one batch, and a block mask lets each token attend to

* the shared cache up to the run's own ``visible`` length,
* the run's tokens from an earlier packed pass (when continuing one),
* the run's own tokens so far (causal),

and nothing else. Position ids are the ones each run would have alone, so the outputs equal
one forward pass per run. On a CPU every forward call reads all weights once (about 0.4 GB
for a 135M-parameter model in float32, ~45 ms), so one call instead of one per group also
matters, as much as the padding it saves.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache

from .forward import PrefixCache, returned_cache, with_cache
from .loading import ChatModel


@dataclass
class Packed:
    """Where a packed pass put each run, and the cache to continue from."""

    kv: DynamicCache  # [rows, kv_heads, shared + packed, head_dim] per layer
    row: Tensor  # [n_runs] the row of each run
    cols: Tensor  # [n_runs, longest] cache columns of each run's tokens, in order (padded with its last)
    length: Tensor  # [n_runs] tokens of the run so far
    visible: Tensor  # [n_runs] shared-cache positions each run sees
    shared: int  # length of the shared cache


def unembed(cm: ChatModel, hidden: Tensor) -> Tensor:
    """Logits ``[..., vocab]`` from final hidden states ``[..., d_model]`` (final norm applied),
    as the model's own head computes them (Gemma-2/3 soft-cap their logits)."""
    return softcap(cm, cm.model.get_output_embeddings()(hidden))


def softcap(cm: ChatModel, logits: Tensor) -> Tensor:
    """The model's final logit soft-capping, if it has one (Gemma-2/3), applied to any logits."""
    cap = getattr(cm.model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def _assign_rows(lengths: list[int], n_rows: int) -> list[int]:
    """Longest run first into the emptiest row: rows of nearly equal length."""
    load = [0] * n_rows
    row = [0] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = min(range(n_rows), key=load.__getitem__)
        row[i] = r
        load[r] += lengths[i]
    return row


@contextmanager
def _dense_mask_attention(cm: ChatModel):
    """Eager attention on a CPU for the packed passes: with a dense arbitrary mask PyTorch's
    CPU SDPA kernel is slower than matmul + softmax (about 10% of a packed pass on the
    organism, float32 and bfloat16). GPUs keep the model's own implementation."""
    impl = cm.model.config._attn_implementation
    if cm.device.type != "cpu" or impl == "eager":
        yield
        return
    cm.model.set_attn_implementation("eager")
    try:
        yield
    finally:
        cm.model.set_attn_implementation(impl)


def _additive(cm: ChatModel, allowed: Tensor) -> Tensor:
    """``[rows, q, k]`` bool -> ``[rows, 1, q, k]`` additive mask in the model's dtype."""
    mask = torch.zeros(allowed.shape, dtype=cm.dtype).masked_fill_(~allowed, torch.finfo(cm.dtype).min)
    return mask[:, None].to(cm.device)


def forward_packed(
    cm: ChatModel,
    shared: PrefixCache,
    runs: list[list[int]],
    visible: list[int],
    read: int,
    row_tokens: int = 128,
    keep_cache: bool = False,
) -> tuple[Tensor, Packed | None]:
    """Final hidden states of the last ``read`` tokens of every run: ``[n_runs, read, d_model]``.

    Run ``i`` sees the first ``visible[i]`` positions of ``shared`` and starts at position
    ``visible[i]``. ``row_tokens`` bounds the packed length per row: longer rows pay more for
    the (masked, dense) attention, shorter ones for more rows. With ``keep_cache`` the runs
    can be continued by :func:`continue_packed`.
    """
    lengths = [len(r) for r in runs]
    if min(lengths) < read:
        raise ValueError(f"a run has fewer than {read} tokens")
    n_rows = max(1, min(len(runs), -(-sum(lengths) // row_tokens)))
    row_of = _assign_rows(lengths, n_rows)
    width = max(sum(n for n, r in zip(lengths, row_of) if r == row) for row in range(n_rows))
    ids = torch.zeros(n_rows, width, dtype=torch.long)
    pos = torch.zeros(n_rows, width, dtype=torch.long)
    run_at = torch.full((n_rows, width), -1, dtype=torch.long)  # which run each token is (-1: padding)
    offset = torch.zeros(len(runs), dtype=torch.long)
    reads = torch.empty(len(runs), read, dtype=torch.long)  # flat index row * width + col
    fill = [0] * n_rows
    for i, (tokens, r, v) in enumerate(zip(runs, row_of, visible)):
        a, n = fill[r], len(tokens)
        ids[r, a:a + n] = torch.tensor(tokens)
        pos[r, a:a + n] = torch.arange(v, v + n)
        run_at[r, a:a + n] = i
        offset[i] = a
        reads[i] = r * width + torch.arange(a + n - read, a + n)
        fill[r] += n
    vis = torch.tensor(visible)
    real = run_at >= 0
    q_vis = torch.where(real, vis[run_at.clamp(min=0)], 1)  # padding sees position 0 only
    see_shared = torch.arange(shared.length)[None, None, :] < q_vis[:, :, None]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    see_own = (run_at[:, None, :] == run_at[:, :, None]) & causal & real[:, :, None]
    mask = _additive(cm, torch.cat([see_shared, see_own], -1))
    with _dense_mask_attention(cm):
        out = cm.model.base_model(input_ids=ids.to(cm.device), position_ids=pos.to(cm.device), attention_mask=mask,
                                  **with_cache(cm.model.base_model, shared.expand(n_rows)), use_cache=True)
    last = out.last_hidden_state  # on the final norm's device, which a device map may put off cm.device
    hidden = last.reshape(n_rows * width, -1)[reads.to(last.device)]
    if not keep_cache:
        return hidden, None
    length = torch.tensor(lengths)
    cols = shared.length + offset[:, None] + torch.minimum(torch.arange(max(lengths))[None], length[:, None] - 1)
    return hidden, Packed(kv=returned_cache(out), row=torch.tensor(row_of), cols=cols, length=length, visible=vis,
                          shared=shared.length)


def continue_packed(cm: ChatModel, prior: Packed, which: list[int], runs: list[list[int]], read: int,
                    keep_cache: bool = False) -> tuple[Tensor, Packed | None]:
    """Continue runs ``which`` of an earlier pass with the tokens ``runs``: final hidden
    states of their last ``read`` tokens ``[len(which), read, d_model]``, and (``keep_cache``)
    a :class:`Packed` whose run ``j`` is run ``which[j]`` continued, to continue again.

    Each continued run gets a row of its own, with a cache gathered from the shared part
    and its own earlier tokens, so survivors scattered over the packed rows pay no padding
    for one another.
    """
    dev = cm.device
    w = torch.tensor(which)
    n, width = len(which), max(len(r) for r in runs)
    before = prior.length[w]  # [n] tokens each run has so far
    own = int(before.max())
    rows = prior.row[w].to(dev)
    cols = prior.cols[w, :own].to(dev)  # [n, own]
    data = []
    for layer in prior.kv.layers:
        pair = []
        for x in (layer.keys, layer.values):  # [rows, heads, shared + packed, head_dim]
            # each layer's cache lives on that layer's device
            mine = x[rows.to(x.device)[:, None], :, cols.to(x.device)].permute(0, 2, 1, 3)  # [n, heads, own, head_dim]
            pair.append(torch.cat([x[:1, :, :prior.shared].expand(n, -1, -1, -1), mine], 2))
        data.append(tuple(pair))
    kv = DynamicCache(ddp_cache_data=data, config=cm.model.config)
    lengths = torch.tensor([len(r) for r in runs])
    ids = torch.zeros(n, width, dtype=torch.long)
    for j, tokens in enumerate(runs):
        ids[j, :len(tokens)] = torch.tensor(tokens)
    pos = (prior.visible[w] + before)[:, None] + torch.arange(width)[None]
    t = torch.arange(own)
    see_shared = (torch.arange(prior.shared)[None, :] < prior.visible[w][:, None])[:, None, :].expand(n, width, -1)
    see_before = (t[None, :] < before[:, None])[:, None, :].expand(n, width, -1)
    see_new = torch.ones(width, width, dtype=torch.bool).tril()[None].expand(n, -1, -1)
    mask = _additive(cm, torch.cat([see_shared, see_before, see_new], -1))
    with _dense_mask_attention(cm):
        out = cm.model.base_model(input_ids=ids.to(dev), position_ids=pos.to(dev), attention_mask=mask,
                                  **with_cache(cm.model.base_model, kv), use_cache=True)
    last = out.last_hidden_state
    at = (lengths[:, None] - read + torch.arange(read)[None]).to(last.device)  # [n, read]
    hidden = last[torch.arange(n, device=last.device)[:, None], at]
    if not keep_cache:
        return hidden, None
    # run j's tokens: its earlier ones (columns shared..shared+before_j), then the new ones
    total = before + lengths
    k = torch.arange(int(total.max()))[None]
    new_cols = torch.where(k < before[:, None], prior.shared + k, prior.shared + own + k - before[:, None])
    new_cols = torch.minimum(new_cols, (prior.shared + own + lengths - 1)[:, None])
    return hidden, Packed(kv=returned_cache(out), row=torch.arange(n), cols=new_cols, length=total,
                          visible=prior.visible[w], shared=prior.shared)
