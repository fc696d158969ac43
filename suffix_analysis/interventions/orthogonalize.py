"""Weight orthogonalization: bake directional ablation into the weights.

Every matrix that writes into the residual stream is replaced by ``W - r^ r^T W`` (output
side): the token embedding (rows), each attention output projection, each MLP output
projection, their biases, and a learned position embedding where there is one. With
nothing written along ``r^``, the residual stream never holds it, which is what
inference-time ablation enforces with hooks; the two agree up to float error.

Tied embeddings (SmolLM2, Gemma, Llama-3.2 small): the unembedding shares the embedding's
storage, but it reads the residual stream and must stay as it was, so it is untied into a
copy of the original weights first and the config says ``tie_word_embeddings = False``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..artifacts import atomic_folder
from ..errors import UserError
from ..models.loading import MARKER_FILE, ChatModel


def _untie_unembedding(cm: ChatModel) -> bool:
    model = cm.model
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or out.weight.data_ptr() != inp.weight.data_ptr():
        return False
    out.weight = torch.nn.Parameter(out.weight.detach().clone(), requires_grad=False)
    for cfg in {id(model.config): model.config, id(model.config.get_text_config()): model.config.get_text_config()}.values():
        cfg.tie_word_embeddings = False
    return True


@torch.no_grad()
def orthogonalize_(cm: ChatModel, direction: torch.Tensor) -> list[str]:
    """Edit ``cm.model`` in place; returns the names of the edited parameters."""
    from .directional import check_direction

    if cm.arch.post_norm_writers:
        raise UserError(
            f"{cm.model.config.model_type} adds a normalization after its attention and MLP outputs, so no weight "
            "edit removes a direction exactly; use inference-time ablation (--intervention ablate) instead")
    d = check_direction(cm, direction).float()
    if d.norm() == 0:
        raise UserError("the direction is the zero vector; there is nothing to orthogonalize against")
    u = d / d.norm()
    _untie_unembedding(cm)
    edited = []

    def rows_(name: str, w: torch.Tensor):  # residual vectors stored as rows: [n, d_model]
        wf = w.float()
        w.copy_(wf - (wf @ u).unsqueeze(-1) * u)
        edited.append(name)

    def out_side_(name: str, linear: torch.nn.Module):  # nn.Linear, weight [d_model, d_in]
        wf = linear.weight.float()
        linear.weight.copy_(wf - torch.outer(u, u @ wf))
        edited.append(f"{name}.weight")
        if getattr(linear, "bias", None) is not None:
            rows_(f"{name}.bias", linear.bias)

    rows_(f"{cm.arch.embed}.weight", cm.model.get_submodule(cm.arch.embed).weight)
    if cm.arch.pos_embed:
        rows_(f"{cm.arch.pos_embed}.weight", cm.model.get_submodule(cm.arch.pos_embed).weight)
    for l, layer in enumerate(cm.layers):
        for path in (cm.arch.attn_out, cm.arch.mlp_out):
            module = layer.get_submodule(path)
            if not isinstance(module, torch.nn.Linear):
                raise UserError(f"{cm.arch.layers}.{l}.{path} is a {type(module).__name__}, not a linear map; "
                                "this architecture needs its own orthogonalization rule")
            out_side_(f"{cm.arch.layers}.{l}.{path}", module)
    return edited


def export_orthogonalized(cm: ChatModel, direction: torch.Tensor, out: str | Path, provenance: dict) -> Path:
    """Orthogonalize ``cm`` (in place) and save an ordinary ``transformers`` folder at ``out``.

    Written to a temporary sibling and renamed, so ``out`` is complete or absent.
    """
    edited = orthogonalize_(cm, direction)
    with atomic_folder(out) as tmp:
        cm.model.save_pretrained(tmp)
        cm.tokenizer.save_pretrained(tmp)
        marker = {"orthogonalized": True, "edited_parameters": len(edited), **provenance}
        if cm.preset:
            marker["preset"] = cm.preset.name
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=1))
    return Path(out).expanduser().resolve()
