"""The attack interface.

An attack is a class with a config dataclass and a ``run`` method that returns an
:class:`AttackResult`. Attacks register by name, in this package with
:func:`register_attack` and from other packages through the entry point group
``suffix_analysis.attacks`` (``name = "package.module:AttackClass"``), so that
``suffix-analysis attack NAME`` finds them. The built-in attacks (gcg, random, nanogcg)
are entry points of this package's own ``pyproject.toml``, like any plugin.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import ClassVar

from ..config import setting
from ..errors import UserError
from ..models.loading import ChatModel

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "suffix_analysis.attacks"


@dataclass
class AttackConfig:
    """Settings every attack understands. Subclasses add their own fields."""

    suffix_len: int = setting(20, "tokens in the adversarial suffix")
    num_steps: int = setting(250, "optimization steps", flags=("--steps",), cpu=60)
    seed: int = setting(0, "random seed")

    def validate(self) -> None:
        if self.suffix_len < 1:
            raise UserError(f"suffix length must be at least 1, got {self.suffix_len}")
        if self.num_steps < 1:
            raise UserError(f"number of steps must be at least 1, got {self.num_steps}")


@dataclass
class AttackResult:
    """What an attack found, step by step."""

    suffix: str  # the best suffix, as text
    suffix_ids: list[int]
    losses: list[float] = field(default_factory=list)  # best loss after each step
    suffixes: list[str] = field(default_factory=list)  # best suffix after each step
    step_seconds: list[float] = field(default_factory=list)
    success: bool = False  # the attack's own success criterion (e.g. every target generated exactly)
    attack: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Attack:
    """Base class. Subclasses set ``name`` and ``config_class`` and implement ``run``.

    ``run`` gets the model, the instructions the suffix must work on (one for a
    per-prompt attack, several for a universal suffix), a target response per
    instruction, and a run folder for checkpoints (``None``: no checkpoints).
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[AttackConfig]] = AttackConfig
    # An attack that takes ``direction=(vector, layer)`` (``--direction RUN``) sets this; the
    # objective terms that cannot run without one are named in ``direction_terms``.
    uses_direction: ClassVar[bool] = False
    direction_terms: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: AttackConfig | None = None):
        self.config = config or self.config_class()
        self.config.validate()

    @classmethod
    def references(cls, config: AttackConfig, cm: ChatModel, direction, layer: int, data_dir: str | None = None
                   ) -> dict:
        """Keyword arguments of the constructor that the objective measures against besides the
        direction (computed on ``cm``); none by default."""
        return {}

    def run(self, cm: ChatModel, instructions: list[str], targets: list[str],
            out: Path | None = None, resume: bool = False) -> AttackResult:
        raise NotImplementedError


_REGISTRY: dict[str, type[Attack]] = {}


def register_attack(cls: type[Attack]) -> type[Attack]:
    """Class decorator: make ``cls`` available as ``suffix-analysis attack <cls.name>``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a name")
    _REGISTRY[cls.name] = cls
    return cls


def list_attacks() -> dict[str, type[Attack] | str]:
    """Registered attacks: classes registered in this process, and entry points (the
    built-in ones among them) by their target, unloaded."""
    found: dict[str, type[Attack] | str] = dict(_REGISTRY)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep.value)
    return found


def get_attack(name: str) -> type[Attack]:
    """The attack class called ``name``: registered in this process, or an entry point (loaded now)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            try:
                cls = ep.load()
            except Exception as e:  # a plugin's own import error, reported as the plugin's
                raise UserError(f"attack '{name}' ({ep.value}) failed to load: {type(e).__name__}: {e}") from None
            if not (isinstance(cls, type) and issubclass(cls, Attack)):
                raise UserError(f"entry point '{name}' ({ep.value}) is not an Attack subclass")
            return cls
    known = sorted(list_attacks())
    hint = "" if "gcg" in known else " (the built-in attacks are entry points: reinstall with pip install -e .)"
    raise UserError(f"unknown attack '{name}'; known: {', '.join(known) or 'none'}{hint}")
