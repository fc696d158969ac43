"""Cross-entropy checks that an intervention keeps the model's other behaviour.

* ``completion_ce``: loss of the model's own (clean) greedy completions of harmless
  instructions, under whatever hooks are active: on-distribution coherence.
* ``corpus_ce``: loss on a plain text corpus (no chat template): general language modelling.
"""

from __future__ import annotations

import torch

from ..models.chat import pad_token_id
from ..models.loading import ChatModel


@torch.no_grad()
def _token_ce(cm: ChatModel, rows: list[list[int]], starts: list[int], batch_size: int) -> float:
    """Mean next-token cross-entropy over tokens ``row[start:]`` of each row (right-padded)."""
    total, count = 0.0, 0
    pad = pad_token_id(cm.tokenizer)
    for s in range(0, len(rows), batch_size):
        chunk, st = rows[s:s + batch_size], starts[s:s + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, (r, k) in enumerate(zip(chunk, st)):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
            labels[i, k:len(r)] = torch.tensor(r[k:])
        logits = cm.model(input_ids=ids.to(cm.device), attention_mask=mask.to(cm.device)).logits[:, :-1].float()
        target = labels[:, 1:].to(cm.device)
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="sum")
        total += loss.item()
        count += int((target != -100).sum())
    return total / max(count, 1)


def completion_ce(cm: ChatModel, instructions: list[str], completions: list[str], batch_size: int = 16) -> float:
    """Mean per-token CE of ``completions`` as responses to ``instructions``."""
    tok = cm.tokenizer
    prompts = cm.chat.tokenize(instructions)
    rows, starts = [], []
    for p, c in zip(prompts, completions):
        reply = tok(c, add_special_tokens=False)["input_ids"]
        if reply:
            rows.append(p + reply)
            starts.append(len(p))
    return _token_ce(cm, rows, starts, batch_size)


def corpus_ce(cm: ChatModel, texts: list[str], max_tokens: int = 256, batch_size: int = 8) -> float:
    """Mean per-token CE on plain texts, each cut to ``max_tokens`` tokens."""
    tok = cm.tokenizer
    rows = [r[:max_tokens] for r in tok(texts, add_special_tokens=True)["input_ids"] if len(r) > 1]
    return _token_ce(cm, rows, [0] * len(rows), batch_size)
