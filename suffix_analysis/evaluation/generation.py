"""Batched greedy generation that also returns the first response position's logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..models.loading import ChatModel


@dataclass
class Generations:
    completions: list[str]
    first_logits: torch.Tensor  # [n, vocab] float32, logits predicting the first response token


@torch.no_grad()
def generate(
    cm: ChatModel,
    instructions: list[str],
    suffixes: list[str] | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: bool = True,
) -> Generations:
    """Greedy completions of ``instructions`` (each optionally followed by a suffix)."""
    tok = cm.tokenizer
    completions: list[str] = []
    first: list[torch.Tensor] = []
    bar = tqdm(total=len(instructions), desc="generating", unit="prompt", disable=not progress)
    for start in range(0, len(instructions), batch_size):
        chunk = instructions[start:start + batch_size]
        sfx = suffixes[start:start + batch_size] if suffixes else None
        batch = cm.chat.encode(chunk, sfx, device=cm.device)
        out = cm.model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            return_dict_in_generate=True,
            output_logits=True,
        )
        new = out.sequences[:, batch["input_ids"].shape[1]:]
        completions += tok.batch_decode(new, skip_special_tokens=True)
        first.append(out.logits[0].float().cpu())
        bar.update(len(chunk))
    bar.close()
    return Generations(completions, torch.cat(first))
