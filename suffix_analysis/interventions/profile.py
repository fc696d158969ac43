"""A per-layer weight profile for directional ablation: how much of the direction each
residual writer loses.

Full orthogonalization (the paper) removes the direction from every writer. A profile
removes the share ``w`` of it, per writer: the embeddings (``blocks.0.hook_resid_pre``), and
each layer's attention and MLP outputs (``blocks.{l}.hook_attn_out``, ``blocks.{l}.hook_mlp_out``)::

    x <- x - w (x . r^) r^                   (a subspace Q [k, d_model]: x - w Q^T Q x)

Attention and MLP each get a tent over the layers, the family heretic searches (p-e-w/heretic,
its "abliteration weight kernel"): ``max_weight`` at layer ``peak``, falling linearly to
``min_weight`` at ``distance`` layers away, 0 beyond. The embeddings get their own share
``embed``. The family holds the paper's edit (every share 1: :meth:`WeightProfile.full`),
so a search over it can start from there. The same shares drive the hooks that simulate
the edit (:func:`profile_hooks`, for a search: no weights copied) and the weight edit itself
(``orthogonalize.export_orthogonalized(..., scales=profile.sites(n_layers))``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import UserError
from ..models.hooks import HookList
from ..models.loading import ChatModel
from .directional import check_direction, check_subspace
from .orthogonalize import edited, row_rescale, writer_sites


@dataclass(frozen=True)
class Tent:
    """One component's weights over the layers: ``max_weight`` at ``peak`` (a fractional
    layer), linear to ``min_weight`` at ``distance`` layers away, 0 beyond."""

    max_weight: float = 1.0
    peak: float = 0.0
    min_weight: float = 1.0
    distance: float = 1e9

    def weights(self, n_layers: int) -> list[float]:
        """The share of each layer ``[n_layers]``."""
        if self.distance <= 0:
            raise UserError(f"a weight profile's distance must be above 0, got {self.distance}")
        out = []
        for l in range(n_layers):
            d = abs(l - self.peak)
            slope = (self.min_weight - self.max_weight) / self.distance
            out.append(0.0 if d > self.distance else self.max_weight + slope * d)
        return out


@dataclass(frozen=True)
class WeightProfile:
    """The share of the direction removed at every residual writer."""

    attn: Tent = Tent()
    mlp: Tent = Tent()
    embed: float = 1.0

    @classmethod
    def full(cls) -> WeightProfile:
        """The paper's orthogonalization: every share 1."""
        return cls()

    def sites(self, n_layers: int) -> dict[str, float]:
        """``{hook site: share}`` for every residual writer (the map ``orthogonalize`` takes)."""
        out = {"blocks.0.hook_resid_pre": self.embed}
        for l, (a, m) in enumerate(zip(self.attn.weights(n_layers), self.mlp.weights(n_layers))):
            out[f"blocks.{l}.hook_attn_out"] = a
            out[f"blocks.{l}.hook_mlp_out"] = m
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def _unit(cm: ChatModel, direction: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows ``[k, d_model]`` of a direction ``[d_model]`` or a subspace ``[k, d_model]``."""
    if direction.ndim == 2:
        return check_subspace(cm, direction).to(cm.device, cm.dtype)
    d = check_direction(cm, direction)
    if d.norm() == 0:
        raise UserError("the direction is the zero vector; there is nothing to ablate")
    return (d / d.norm())[None]


def per_layer_sites(layer_dirs: torch.Tensor) -> dict[str, torch.Tensor]:
    """heretic's "per layer" scope as a direction per hook site: each layer's writers remove
    the difference in means at that layer's output (``blocks.{l+1}.hook_resid_pre``; the last
    layer's own), the embeddings the one layer 0's writers remove (at an EOI position the
    embeddings' own difference in means is 0: the same token in every prompt). ``layer_dirs``
    ``[n_layers, d_model]``: one position's candidates."""
    n = layer_dirs.shape[0]
    out = {"blocks.0.hook_resid_pre": layer_dirs[min(1, n - 1)]}
    for l in range(n):
        out[f"blocks.{l}.hook_attn_out"] = out[f"blocks.{l}.hook_mlp_out"] = layer_dirs[min(l + 1, n - 1)]
    return out


def _linear_writers(cm: ChatModel) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """``{hook site: (weight [d_model, d_in], bias [d_model] or None)}`` of each layer's linear
    writers (attention and MLP outputs)."""
    params = writer_sites(cm)
    out = {}
    for name, (kind, site) in params.items():
        if kind == "out":
            bias = name.removesuffix(".weight") + ".bias"
            out[site] = (cm.model.get_parameter(name), cm.model.get_parameter(bias) if bias in params else None)
    return out


def profile_hooks(cm: ChatModel, direction: torch.Tensor | dict[str, torch.Tensor], profile: WeightProfile,
                  preserve_norms: bool = False) -> HookList:
    """Hooks that remove ``profile``'s share of ``direction`` (``[d_model]``, a subspace
    ``[k, d_model]``, or a map of hook site to direction, :func:`per_layer_sites`) at each
    residual writer: what the weight edit with the same profile does, without touching the
    weights. Writers with share 0 (or no direction) get no hook. ``preserve_norms``: the
    norm-preserving edit of the linear writers (``orthogonalize.row_rescale``); its hook
    rescales each residual dimension of the writer's output, so it needs the writer's weights."""
    if isinstance(direction, dict):
        units = {site: _unit(cm, d) for site, d in direction.items()}
    else:
        one = _unit(cm, direction)
        units = dict.fromkeys(profile.sites(cm.n_layers), one)
    linear = _linear_writers(cm) if preserve_norms else {}

    def remove(share: float, q: torch.Tensor):
        def hook(x: torch.Tensor, hook) -> torch.Tensor:
            qq = q.to(x.device, x.dtype)
            return x - share * ((x @ qq.T) @ qq)

        return hook

    def rescale(share: float, q: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        q32 = q.float().to(weight.device)
        n, m = row_rescale(weight.detach(), q32, share)
        ratio32 = n / m
        edited_bias = None if bias is None else edited(bias.detach(), "rows", q32, share).float()

        def hook(x: torch.Tensor, hook) -> torch.Tensor:
            qq, nn, ratio = q32.to(x.device, x.dtype), n.to(x.device, x.dtype), ratio32.to(x.device, x.dtype)
            z = (x if bias is None else x - bias.to(x.dtype)) / nn  # the output of the unit rows
            out = (z - share * ((z @ qq.T) @ qq)) * ratio
            return out if edited_bias is None else out + edited_bias.to(x.device, x.dtype)

        return hook

    hooks = []
    for site, s in profile.sites(cm.n_layers).items():
        if s == 0 or units.get(site) is None:
            continue
        hooks.append((site, rescale(s, units[site], *linear[site]) if site in linear else remove(s, units[site])))
    return hooks
