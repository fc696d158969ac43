"""Weight orthogonalization: bake directional ablation into the weights.

Every matrix that writes into the residual stream is replaced by ``W - r^ r^T W`` (output
side; for a subspace with orthonormal basis ``Q``, ``W - Q^T Q W``): the token embedding
(rows), each attention output projection, each MLP output projection, their biases, and a
learned position embedding where there is one. With
nothing written along ``r^``, the residual stream never holds it, which is what
inference-time ablation enforces with hooks; the two agree up to float error.

Tied embeddings (SmolLM2, Gemma, Llama-3.2 small): the unembedding shares the embedding's
storage, but it reads the residual stream and must stay as it was, so it is untied into a
copy of the original weights first and the config says ``tie_word_embeddings = False``.

A partial edit (``scales``, e.g. a per-layer weight profile, ``interventions/profile.py``)
removes only the share ``s`` of what a writer puts along ``r^``: ``W - s r^ r^T W``. Each
parameter's share is looked up by the hook site it writes to (:func:`writer_sites`), so the
weight edit and the hooks that simulate it (``profile.profile_hooks``) read the same map.

A norm-preserving edit (``preserve_norms``, heretic's row normalization "full", after grimjim's
norm-preserving biprojected abliteration; exact here, where heretic approximates it with a
low-rank adapter) edits each linear writer's rows as directions and keeps their lengths: with
``N`` the row norms of ``W`` ``[d_model, d_in]``, ``W^ = N^-1 W`` is edited to
``W^ - s Q^T Q W^``, whose rows are rescaled to their old norms ``N``. What is removed is then
no longer exactly ``s`` of the direction, but the writer's output keeps its size per
residual dimension. Embeddings and biases are edited as before.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from ..artifacts import atomic_folder
from ..errors import UserError
from ..models.loading import MARKER_FILE, ChatModel


def _untie_config(config) -> None:
    """``tie_word_embeddings = False`` in ``config`` and its text config (one object or two)."""
    for c in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
        c.tie_word_embeddings = False


def _untie_unembedding(cm: ChatModel) -> bool:
    model = cm.model
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or out.weight.data_ptr() != inp.weight.data_ptr():
        return False
    out.weight = torch.nn.Parameter(out.weight.detach().clone(), requires_grad=False)
    _untie_config(model.config)
    return True


def _check(cm: ChatModel, direction: torch.Tensor) -> torch.Tensor:
    """The unit direction ``[d_model]`` float32 on the CPU, or a clear error."""
    from .directional import check_direction, check_subspace

    if cm.arch.post_norm_writers:
        raise UserError(
            f"{cm.model.config.model_type} adds a normalization after its attention and MLP outputs, so no weight "
            "edit removes a direction exactly; use inference-time ablation (--intervention ablate) instead")
    if direction.ndim == 2:  # a subspace (a refusal cone's basis): orthonormal rows [k, d_model]
        return check_subspace(cm, direction)
    d = check_direction(cm, direction).float().cpu()
    if d.norm() == 0:
        raise UserError("the direction is the zero vector; there is nothing to orthogonalize against")
    return d / d.norm()


def writers(cm: ChatModel) -> dict[str, str]:
    """Every parameter that writes into the residual stream, by name: ``"rows"`` (residual
    vectors stored as rows ``[n, d_model]``: embeddings, biases) or ``"out"`` (an
    ``nn.Linear`` weight ``[d_model, d_in]``, edited on its output side)."""
    return {name: kind for name, (kind, _) in writer_sites(cm).items()}


def writer_sites(cm: ChatModel) -> dict[str, tuple[str, str]]:
    """Every residual writer by parameter name: (its kind, as :func:`writers` gives it, and the
    hook site it writes to: ``blocks.0.hook_resid_pre`` for the embeddings,
    ``blocks.{l}.hook_attn_out`` and ``blocks.{l}.hook_mlp_out`` for the layers' outputs)."""
    out = {f"{cm.arch.embed}.weight": ("rows", "blocks.0.hook_resid_pre")}
    if cm.arch.pos_embed:
        out[f"{cm.arch.pos_embed}.weight"] = ("rows", "blocks.0.hook_resid_pre")
    for l, layer in enumerate(cm.layers):
        for path, site in ((cm.arch.attn_out, "hook_attn_out"), (cm.arch.mlp_out, "hook_mlp_out")):
            module = layer.get_submodule(path)
            if not isinstance(module, torch.nn.Linear):
                raise UserError(f"{cm.arch.layers}.{l}.{path} is a {type(module).__name__}, not a linear map; "
                                "this architecture needs its own orthogonalization rule")
            out[f"{cm.arch.layers}.{l}.{path}.weight"] = ("out", f"blocks.{l}.{site}")
            if getattr(module, "bias", None) is not None:
                out[f"{cm.arch.layers}.{l}.{path}.bias"] = ("rows", f"blocks.{l}.{site}")
    return out


def _scale_of(cm: ChatModel, scales: dict[str, float] | None) -> dict[str, float]:
    """Each writer's share by parameter name (1 everywhere without ``scales``, a map of hook
    site to share where a site not named is left as it is)."""
    sites = writer_sites(cm)
    if scales is None:
        return dict.fromkeys(sites, 1.0)
    unknown = sorted(set(scales) - {site for _, site in sites.values()})
    if unknown:
        raise UserError(f"a weight profile names {unknown[0]}, which is no residual writer of this model; was it made "
                        "for another model?")
    return {name: float(scales.get(site, 0.0)) for name, (_, site) in sites.items()}


def _units(cm: ChatModel, direction: torch.Tensor | dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """Each writer's unit direction (or subspace) by parameter name: one for all, or, for a map
    of hook site to direction (per-layer directions), its site's (``None``: a site not named)."""
    if not isinstance(direction, dict):
        u = _check(cm, direction)  # first: its one-line errors name the problem
        return dict.fromkeys(writer_sites(cm), u)
    sites = writer_sites(cm)
    unknown = sorted(set(direction) - {site for _, site in sites.values()})
    if unknown:
        raise UserError(f"per-site directions name {unknown[0]}, which is no residual writer of this model; were they "
                        "made for another model?")
    units = {site: _check(cm, d) for site, d in direction.items()}
    return {name: units.get(site) for name, (_, site) in sites.items()}


def row_rescale(w: torch.Tensor, q: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The norm-preserving edit of a linear writer ``w`` ``[d_model, d_in]`` against the
    orthonormal rows ``q`` ``[k, d_model]``, as two row factors ``[d_model]`` float32: the row
    norms ``N`` of ``w`` and those ``M`` of its edited unit rows. The edited weight is
    ``diag(N / M) (W^ - s Q^T Q W^)`` with ``W^ = diag(1 / N) W``, so a writer's edited output
    is ``(N / M) * (y / N - s Q^T Q (y / N))`` for its original output ``y`` (what the hooks of
    ``profile.profile_hooks`` compute)."""
    wf = w.float()
    n = wf.norm(dim=1).clamp_min(1e-30)
    unit = wf / n[:, None]
    m = (unit - scale * (q.T @ (q @ unit))).norm(dim=1).clamp_min(1e-30)
    return n, m


def edited(w: torch.Tensor, kind: str, u: torch.Tensor, scale: float = 1.0,
           preserve_norms: bool = False) -> torch.Tensor:
    """``w`` with nothing written along the unit ``u`` ``[d_model]`` (or into the span of the
    orthonormal rows ``u`` ``[k, d_model]``), computed in float32, in ``w``'s dtype; with
    ``scale`` s, only the share s of what it writes there is removed. ``preserve_norms``: a
    linear writer (``kind`` "out") keeps its row norms (:func:`row_rescale`)."""
    wf, u = w.float(), u.to(w.device).float()
    q = u[None] if u.ndim == 1 else u  # [k, d_model]
    if kind == "rows":
        new = wf - scale * ((wf @ q.T) @ q)
    elif preserve_norms:
        n, m = row_rescale(wf, q, scale)
        unit = wf / n[:, None]
        new = (unit - scale * (q.T @ (q @ unit))) * (n / m)[:, None]
    else:
        new = wf - scale * (q.T @ (q @ wf))
    return new.to(w.dtype)


@torch.no_grad()
def orthogonalize_(cm: ChatModel, direction: torch.Tensor | dict[str, torch.Tensor],
                   scales: dict[str, float] | None = None, preserve_norms: bool = False) -> list[str]:
    """Edit ``cm.model`` in place; returns the names of the edited parameters. ``scales``:
    the share removed per hook site (a weight profile), default 1 everywhere. ``direction``:
    one for every writer, or a direction per hook site (a site not named is left alone).
    ``preserve_norms``: the linear writers keep their row norms (see the module's text)."""
    if cm.dispatched:
        raise UserError("this model is placed with a device map or quantized; its weights are not all in memory to "
                        "edit: use export_orthogonalized (suffix-analysis orthogonalize), which edits the checkpoint")
    units = _units(cm, direction)
    names, share = writers(cm), _scale_of(cm, scales)
    _untie_unembedding(cm)
    for name, kind in names.items():
        if units[name] is not None:
            w = cm.model.get_parameter(name)
            w.copy_(edited(w, kind, units[name], share[name], preserve_norms))
    return [n for n in names if units[n] is not None]


def _is_orthogonalized(folder: Path) -> bool:
    """Whether ``folder`` is an orthogonalized model this suite exported (so a rerun may replace it)."""
    try:
        return json.loads((folder / MARKER_FILE).read_text()).get("orthogonalized") is True
    except (OSError, ValueError, AttributeError):
        return False


def _marker(cm: ChatModel, n_edited: int, provenance: dict) -> str:
    marker = {"orthogonalized": True, "edited_parameters": n_edited, **provenance}
    if cm.preset:
        marker["preset"] = cm.preset.name
    return json.dumps(marker, indent=1)


def export_orthogonalized(cm: ChatModel, direction: torch.Tensor | dict[str, torch.Tensor], out: str | Path,
                          provenance: dict,
                          scales: dict[str, float] | None = None, preserve_norms: bool = False) -> Path:
    """Orthogonalize ``cm`` and save an ordinary ``transformers`` folder at ``out``.

    A model in memory on one device is edited in place and saved. A dispatched model
    (device map, offload, quantized weights) is exported from its checkpoint instead, one
    safetensors shard at a time (:func:`export_from_checkpoint`): it is never whole on one
    device, and a quantized load still gives full-precision weights.
    Written to a temporary sibling and renamed, so ``out`` is complete or absent.
    """
    if cm.dispatched:
        return export_from_checkpoint(cm, direction, out, provenance, scales, preserve_norms)
    names = orthogonalize_(cm, direction, scales, preserve_norms)
    with atomic_folder(out, _is_orthogonalized, "an orthogonalized model folder") as tmp:
        cm.model.save_pretrained(tmp)
        cm.tokenizer.save_pretrained(tmp)
        (tmp / MARKER_FILE).write_text(_marker(cm, len(names), provenance))
    return Path(out).expanduser().resolve()


def _checkpoint_folder(cm: ChatModel) -> Path:
    if cm.location is None:
        raise UserError("this model was built in memory, not loaded from a checkpoint; load it without a device map "
                        "to orthogonalize it")
    folder = Path(cm.location)
    if not folder.is_dir():  # a hub id: the snapshot from_pretrained downloaded
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(cm.location, allow_patterns=["*.json", "*.safetensors"]))
    if not any(folder.glob("*.safetensors")):
        raise UserError(f"{folder} has no safetensors weights to edit; convert the checkpoint to safetensors first")
    return folder


@torch.no_grad()
def export_from_checkpoint(cm: ChatModel, direction: torch.Tensor | dict[str, torch.Tensor], out: str | Path,
                           provenance: dict,
                           scales: dict[str, float] | None = None, preserve_norms: bool = False) -> Path:
    """Orthogonalize the checkpoint ``cm`` was loaded from into ``out``, shard by shard.

    Peak memory is one shard. The result equals :func:`orthogonalize_` on the whole model
    followed by ``save_pretrained`` (same tensors, same names, an untied unembedding).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    units = _units(cm, direction)
    names, share = writers(cm), _scale_of(cm, scales)
    folder = _checkpoint_folder(cm)
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else None
    if index is not None:  # only the shards the index names (a folder may hold other safetensors files)
        shards = [folder / name for name in sorted(set(index["weight_map"].values()))]
    else:
        shards = [folder / "model.safetensors"] if (folder / "model.safetensors").is_file() else sorted(
            folder.glob("*.safetensors"))
    source_cfg = folder / "config.json"
    if source_cfg.is_file() and "quantization_config" in json.loads(source_cfg.read_text()):
        raise UserError(f"the checkpoint in {folder} is stored quantized; orthogonalize its full-precision original")
    text_cfg = cm.model.config.get_text_config()
    tied = bool(getattr(text_cfg, "tie_word_embeddings", False) or getattr(cm.model.config, "tie_word_embeddings", False))
    head_name = f"{cm.arch.lm_head}.weight"
    seen: set[str] = set()
    with atomic_folder(out, _is_orthogonalized, "an orthogonalized model folder") as tmp:
        for shard in shards:
            with safe_open(str(shard), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                metadata = f.metadata() or {"format": "pt"}
            for k in list(tensors):
                if k in names:
                    if not tensors[k].is_floating_point():
                        raise UserError(f"{k} is stored as {tensors[k].dtype} in {shard.name}, not as floats; "
                                        "orthogonalize the full-precision checkpoint")
                    has_head = head_name in (index["weight_map"] if index is not None else tensors)
                    if tied and k == f"{cm.arch.embed}.weight" and not has_head:
                        tensors[head_name] = tensors[k].clone()  # untied: the unembedding keeps the original
                        if index is not None:
                            index["weight_map"][head_name] = shard.name
                            size = index.get("metadata", {}).get("total_size")
                            if isinstance(size, int):
                                index["metadata"]["total_size"] = size + tensors[k].numel() * tensors[k].element_size()
                    if units[k] is not None:
                        tensors[k] = edited(tensors[k], names[k], units[k], share[k], preserve_norms)
                    seen.add(k)
            save_file(tensors, str(tmp / shard.name), metadata=metadata)
            del tensors
        missing = sorted(set(names) - seen)
        if missing:
            raise UserError(f"the checkpoint in {folder} names its tensors differently from the model ({missing[0]} "
                            "not found); load the model on one device to orthogonalize it")
        if index is not None:
            (tmp / index_file.name).write_text(json.dumps(index, indent=2))
        config = copy.deepcopy(cm.model.config)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        if tied:
            _untie_config(config)
        config.save_pretrained(tmp)
        if getattr(cm.model, "generation_config", None) is not None:
            cm.model.generation_config.save_pretrained(tmp)
        cm.tokenizer.save_pretrained(tmp)
        (tmp / MARKER_FILE).write_text(_marker(cm, sum(u is not None for u in units.values()), provenance))
    return Path(out).expanduser().resolve()
