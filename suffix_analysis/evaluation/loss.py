"""Cross-entropy checks that an intervention keeps the model's other behaviour.

* ``completion_ce``: loss of the model's own (clean) greedy completions of harmless
  instructions, under whatever hooks are active: on-distribution coherence.
* ``corpus_ce``: loss on a plain text corpus (no chat template): general language modelling.
* ``response_logprobs``: the per-token log-probabilities both rest on (the compliance judge's too).
"""

from __future__ import annotations

import torch

from ..models.chat import pad_token_id
from ..models.forward import PrefixCache, common_prefix_len, with_cache
from ..models.loading import ChatModel
from ..models.packing import unembed


@torch.no_grad()
def response_logprobs(cm: ChatModel, prompts: list[list[int]], responses: list[list[int]],
                      batch_size: int = 32) -> list[torch.Tensor]:
    """Per-token log-probabilities ``[len(response)]`` of each response after its prompt.

    The prefix every prompt shares (the chat template's system prompt and role header) is
    run once and its key/value cache broadcast; the rest is right-padded in batches of
    similar length, and only the response positions are unembedded.
    """
    pad = pad_token_id(cm.tokenizer)
    out: list[torch.Tensor] = [torch.empty(0)] * len(prompts)
    if not prompts:
        return out
    p_len = common_prefix_len(prompts, 1)  # each prompt keeps its last token: it predicts the first response token
    prefix = PrefixCache(cm, prompts[0][:p_len])
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        rows = [prompts[i][p_len:] + responses[i] for i in idx]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), p_len + width), dtype=torch.long)
        mask[:, :p_len] = 1
        for j, r in enumerate(rows):
            ids[j, :len(r)] = torch.tensor(r)
            mask[j, p_len:p_len + len(r)] = 1
        pos = torch.arange(p_len, p_len + width).expand(len(rows), -1)
        hidden = cm.model.base_model(input_ids=ids.to(cm.device), attention_mask=mask.to(cm.device),
                                     position_ids=pos.to(cm.device), **with_cache(cm.model.base_model,
                                                                                 prefix.expand(len(rows))),
                                     use_cache=prefix.length > 0).last_hidden_state
        for j, i in enumerate(idx):
            start, n = len(prompts[i]) - p_len - 1, len(responses[i])  # hidden states that predict the response
            logp = torch.log_softmax(unembed(cm, hidden[j, start:start + n]).float(), -1)
            tgt = torch.tensor(responses[i], device=logp.device)
            out[i] = logp.gather(-1, tgt[:, None])[:, 0].cpu()
    return out


def _token_ce(cm: ChatModel, rows: list[list[int]], starts: list[int], batch_size: int) -> float:
    """Mean next-token cross-entropy over tokens ``row[start:]`` of each row (the first token,
    which nothing predicts, is never scored)."""
    cut = [max(k, 1) for k in starts]
    keep = [(r[:k], r[k:]) for r, k in zip(rows, cut) if len(r) > k]
    if not keep:
        return 0.0
    lps = response_logprobs(cm, [p for p, _ in keep], [t for _, t in keep], batch_size)
    return -float(torch.cat(lps).double().sum()) / sum(len(lp) for lp in lps)


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
