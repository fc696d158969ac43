"""Draft models: cheap stand-ins that rank inputs roughly as a model does (GCG's probe
sampling scores every candidate on a draft and only the promising ones on the model).

* ``layers:N``: the model's own first ``N`` blocks, then its final norm and unembedding.
  No weights are copied: the draft's modules are the model's.
* any other spec: a model loaded as ``load_model`` loads it, which must share the model's
  tokenizer (the candidates are token ids).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

from ..errors import UserError
from .loading import ChatModel, load_model

LAYERS = "layers:"


def first_layers(cm: ChatModel, n: int) -> ChatModel:
    """``cm`` cut after its first ``n`` blocks (the final norm and unembedding kept), sharing
    every weight with it. The copies along the path to the block list are shallow, so the
    model itself is untouched."""
    if not 1 <= n < cm.n_layers:
        raise UserError(f"a draft of the first {n} layers needs 1 <= N < {cm.n_layers} (the model's layer count)")
    config = copy.deepcopy(cm.model.config)
    text = config.get_text_config()
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(text, key):
            setattr(text, key, n)
    if getattr(text, "layer_types", None):
        text.layer_types = list(text.layer_types)[:n]
    *path, leaf = cm.arch.layers.split(".")
    copies = [copy.copy(cm.model)]
    for name in path:
        copies.append(copy.copy(copies[-1]._modules[name]))
    for parent, child, name in zip(copies, copies[1:], path):
        parent._modules = {**parent._modules, name: child}
    copies[-1]._modules = {**copies[-1]._modules, leaf: torch.nn.ModuleList(list(cm.layers)[:n])}
    for module in copies:  # each reads the layer count from its config (the blocks keep theirs)
        if hasattr(module, "config"):
            module.config = config if module.config is cm.model.config else text
    return replace(cm, model=copies[0], name=f"{cm.name} (first {n} layers)")


def load_draft(spec: str, cm: ChatModel) -> ChatModel:
    """The draft ``spec`` names for ``cm``: ``layers:N`` or a model sharing ``cm``'s tokenizer
    (checked before anything is scored)."""
    if spec.startswith(LAYERS):
        try:
            n = int(spec[len(LAYERS):])
        except ValueError:
            raise UserError(f"draft {spec!r}: write layers:N with N a number of layers") from None
        return first_layers(cm, n)
    draft = load_model(spec, device=str(cm.device), dtype=str(cm.dtype).removeprefix("torch."))
    if draft.tokenizer.get_vocab() != cm.tokenizer.get_vocab():
        raise UserError(f"draft model {spec!r} has another tokenizer than {cm.name!r}; probe sampling scores the "
                        "same token ids on both, so use a draft of the same family or layers:N (the model's own "
                        "first N layers)")
    rows = draft.model.get_input_embeddings().weight.shape[0]
    if rows < len(cm.tokenizer):
        raise UserError(f"draft model {spec!r} embeds {rows} tokens, fewer than the tokenizer's {len(cm.tokenizer)}")
    return draft
