"""The attribution run's settings: :class:`AttributionConfig`, and how many top heads the
summary reports (``SUMMARY_K``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import setting
from ..errors import UserError

SUMMARY_K = 8  # the summary's "top 8" heads, whatever top_k is


@dataclass(frozen=True)
class AttributionConfig:
    """What an attribution run measures and how much of it."""

    n_prompts: int = setting(0, "use the first N harmful and the first N harmless instructions (0: all)")
    n_random: int = setting(3, "random-suffix controls: seeded draws of ordinary ASCII word tokens, as many "
                               "tokens as the adversarial suffix")
    random_seed: int = setting(0, "seed of the random-suffix draws")
    top_k: int = setting(8, "top heads: the k largest mean projections at the last EOI position on harmful "
                            "prompts (knocked out together in stage 7)")
    # A head above the direction's layer writes after blocks.{layer}.hook_resid_pre is read:
    # patching it cannot restore the projection there (the paper's top heads sit below it).
    below_direction: bool = setting(True, "rank only heads in layers below the direction's layer, whose writes "
                                          "reach the residual it is read from (--no-below-direction: every layer)")
    patch_ks: str = setting("1,2,4,8,16", "numbers of top heads patched together, comma-separated (8 is "
                                          "always added: the summary reports it)")
    bands: int = setting(4, "width in layers of the band knockouts (0: none)")
    token_effects: bool = setting(True, "per-suffix-token effects (a gradient and two passes per suffix token "
                                        "and prompt)")
    max_new_tokens: int = setting(64, "tokens of each greedy answer judged under knockout (with a judge)")
    batch_size: int = setting(8, "prompts per forward pass")

    def ks(self) -> tuple[int, ...]:
        """``patch_ks`` as sorted distinct ints (a tuple or list is accepted too)."""
        raw = self.patch_ks
        items = raw.replace(",", " ").split() if isinstance(raw, str) else list(raw)
        try:
            ks = sorted({int(k) for k in items})
        except (TypeError, ValueError):
            raise UserError(f"patch_ks must be comma-separated head counts such as 1,2,4,8, got {raw!r}") from None
        if not ks or ks[0] < 1:
            raise UserError(f"patch_ks must be positive head counts such as 1,2,4,8, got {raw!r}")
        return tuple(ks)

    def validate(self) -> None:
        for name in ("n_prompts", "n_random", "bands"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be 0 or more, got {getattr(self, name)}")
        for name in ("top_k", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        self.ks()
