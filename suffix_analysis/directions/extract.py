"""Difference-in-means candidate directions at every layer and every EOI position.

``r[i, l] = mean(resid_pre[l] at EOI position i | harmful) - mean(... | harmless)``. The
means are running float64 sums over batches, so memory does not grow with the number of
prompts, and one forward pass per batch serves every layer.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..models.forward import run_batches
from ..models.loading import ChatModel


class ResidPreRecorder:
    """Forward pre-hooks that sum ``blocks.{l}.hook_resid_pre`` at chosen positions.

    ``sums`` is ``[n_positions, n_layers, d_model]`` float64. Records only while ``active``
    (a shared-prefix pass must not be counted).
    """

    def __init__(self, cm: ChatModel, positions: list[int]):
        self.positions = positions
        self.sums = torch.zeros(len(positions), cm.n_layers, cm.d_model, dtype=torch.float64)
        self.count = 0
        self.active = False
        self._handles = [layer.register_forward_pre_hook(self._hook(l), with_kwargs=True)
                         for l, layer in enumerate(cm.layers)]

    def _hook(self, l: int):
        def hook(module, args, kwargs):
            if not self.active:
                return
            x = args[0] if args else kwargs["hidden_states"]  # [batch, pos, d_model]
            self.sums[:, l] += x[:, self.positions].sum(0).to("cpu", torch.float64)
        return hook

    def remove(self):
        for h in self._handles:
            h.remove()


@torch.no_grad()
def mean_resid_pre(cm: ChatModel, instructions: list[str], positions: list[int] | None = None,
                   batch_size: int = 32, progress: bool = False, desc: str = "activations") -> torch.Tensor:
    """Mean ``resid_pre`` over ``instructions``: ``[n_positions, n_layers, d_model]`` float64.

    ``positions`` are negative EOI positions (default: all of them).
    """
    positions = positions or cm.chat.eoi_positions
    rows = cm.chat.tokenize(instructions)
    rec = ResidPreRecorder(cm, positions)
    bar = tqdm(total=len(rows), desc=desc, disable=not progress)

    def on_batch(idx):
        rec.active = True
        rec.count += len(idx)
        bar.update(len(idx))

    try:
        # only resid_pre is needed: no unembedding; the EOI positions stay out of the shared prefix
        run_batches(cm, rows, batch_size, logits=False, keep=-min(positions), on_batch=on_batch)
    finally:
        rec.remove()
        bar.close()
    return rec.sums / rec.count


def diff_in_means(cm: ChatModel, harmful: list[str], harmless: list[str], positions: list[int] | None = None,
                  batch_size: int = 32, progress: bool = False) -> torch.Tensor:
    """Candidate directions ``[n_positions, n_layers, d_model]`` (float64)."""
    return (mean_resid_pre(cm, harmful, positions, batch_size, progress, "harmful activations")
            - mean_resid_pre(cm, harmless, positions, batch_size, progress, "harmless activations"))
