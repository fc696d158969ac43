"""Packed runs over a shared cache equal one plain forward pass per run."""

import contextlib

import pytest
import torch
from conftest import tiny_chat_model

from suffix_analysis.models.forward import PrefixCache
from suffix_analysis.models.packing import continue_packed, forward_packed, unembed


def _plain_logits(cm, ids):
    with torch.no_grad():
        return cm.model(input_ids=torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("model_type,attention", [("llama", "cpu-default"), ("llama", "sdpa"),
                                                   ("qwen2", "cpu-default"), ("gemma2", "cpu-default")])
def test_packed_runs_equal_plain_forwards_and_continue(model_type, attention, monkeypatch):
    cm = tiny_chat_model(model_type)
    if attention == "sdpa":  # what a GPU runs: the model's SDPA with the packed mask
        from suffix_analysis.models import packing

        cm.model.set_attn_implementation("sdpa")
        monkeypatch.setattr(packing, "_dense_mask_attention", lambda cm: contextlib.nullcontext())
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(5, 300, (9,), generator=g).tolist()
    current = torch.randint(5, 300, (6,), generator=g).tolist()
    tail = [7, 8, 9]
    shared = PrefixCache(cm, prefix).extended(current)
    starts = [0, 5, 2, 2, 4, 1, 3]
    seqs = []  # each run: the current suffix changed at its start, then a common tail
    for i, s in enumerate(starts):
        suffix = current.copy()
        suffix[s] = 10 + i
        seqs.append(suffix)
    runs = [suffix[s:] + tail for suffix, s in zip(seqs, starts)]
    more = [[11, 12], [13, 14, 15]]  # unequal lengths: the shorter one is padded
    with torch.no_grad():
        # row_tokens=8 forces several runs per row and rows of unequal fill
        h, packed = forward_packed(cm, shared, runs, [len(prefix) + s for s in starts], read=3, row_tokens=8,
                                   keep_cache=True)
        got = unembed(cm, h).float()  # [runs, 3, vocab]
        h2, again = continue_packed(cm, packed, [5, 2], more, read=2, keep_cache=True)
        got2 = unembed(cm, h2).float()
        h3, _ = continue_packed(cm, again, [1, 0], [[16, 17], [18]], read=1)  # runs 2 and 5, once more
        got3 = unembed(cm, h3).float()
    for i, suffix in enumerate(seqs):
        want = _plain_logits(cm, prefix + suffix + tail)[-3:]
        torch.testing.assert_close(got[i], want, atol=1e-4, rtol=1e-4)
    for j, i in enumerate([5, 2]):
        want = _plain_logits(cm, prefix + seqs[i] + tail + more[j])[-2:]
        torch.testing.assert_close(got2[j], want, atol=1e-4, rtol=1e-4)
    for j, (i, extra) in enumerate([(2, [16, 17]), (5, [18])]):
        k = [5, 2].index(i)
        want = _plain_logits(cm, prefix + seqs[i] + tail + more[k] + extra)[-1:]
        torch.testing.assert_close(got3[j], want, atol=1e-4, rtol=1e-4)
