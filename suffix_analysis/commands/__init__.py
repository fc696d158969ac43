"""The command layer: each command is a function from a typed config to a typed result.

    refusal          RefusalCommand        -> run_refusal            -> RefusalOutcome
    direction        DirectionCommand      -> run_direction_command  -> DirectionOutcome
    attack NAME      AttackCommand         -> run_attack             -> AttackOutcome
    ...

Every result has ``summary()``, what ``--json`` prints. The registry here (:func:`get_command`)
names each command's settings flat (the field names of its config and of the dataclasses
nested in it, plus an attack's own config fields), builds the config from a flat dict with
the types checked, and runs it: sweeps use it instead of the command line. The command
modules are imported on first use (they load torch).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import types
import typing
import warnings
from dataclasses import MISSING, dataclass, field
from typing import Any, Callable

from ..config import typed_value
from ..errors import UserError

_SCALARS = (int, float, str, bool)


@dataclass(frozen=True)
class Setting:
    """One flat setting of a command."""

    name: str
    kind: Any  # the field's type
    default: Any  # MISSING where the field has none
    path: tuple[str, ...]  # where it sits in the config, e.g. ("model", "placement", "device_map")
    aliases: tuple[str, ...] = ()  # other spellings (a field's extra flags: steps for num_steps)


def _plain(kind) -> bool:
    """A type a TOML value gives: a scalar or a list, either optional."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return len(args) == 1 and _plain(args[0])
    return kind in _SCALARS or kind is list or typing.get_origin(kind) is list


def _scalar(kind):
    """``kind`` without its ``| None``."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return args[0] if len(args) == 1 else kind
    return kind


def _walk(cls, path: tuple[str, ...], skip: tuple[str, ...], out: dict[str, Setting]) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if not path and f.name in skip:
            continue
        if dataclasses.is_dataclass(kind):
            _walk(kind, (*path, f.name), skip, out)
            continue
        if not _plain(kind):  # objects and dicts are set in code, not by name
            continue
        if f.name in out:  # a flat name must say which field it sets
            raise UserError(f"{cls.__name__}.{f.name} has the name of another setting of the command "
                            f"({'.'.join(out[f.name].path)}); rename the field")
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else MISSING)
        aliases = tuple(a.lstrip("-").replace("-", "_") for a in f.metadata.get("flags", ()))
        out[f.name] = Setting(f.name, kind, default, (*path, f.name), aliases)


@dataclass(frozen=True)
class Command:
    """A command of the registry: its config class, its function and its flat settings."""

    name: str  # as typed after suffix-analysis, e.g. "attack gcg"
    config_class: type
    runner: Callable[[Any], Any]
    sweepable: bool = True  # writes a run folder (out) and has a summary: a sweep can run it
    fixed: dict = field(default_factory=dict)  # config fields the name sets (an attack's name)
    plugin: type | None = None  # an attack's config class: its fields go to the config's ``settings``

    @functools.cached_property
    def settings(self) -> dict[str, Setting]:
        """Every flat setting by name."""
        out: dict[str, Setting] = {}
        _walk(self.config_class, (), tuple(self.fixed), out)
        if self.plugin is not None:
            _walk(self.plugin, ("settings",), (), out)
        return out

    @functools.cached_property
    def _aliases(self) -> dict[str, str]:
        return {a: s.name for s in self.settings.values() for a in s.aliases}

    def key(self, name: str, where: str = "settings", exclude: tuple[str, ...] = ()) -> str:
        """The setting ``name`` names (spelled with - or _, or an alias), or a one-line error
        naming the nearest known one."""
        dest = name.replace("-", "_")
        dest = self._aliases.get(dest, dest)
        if dest not in self.settings or dest in exclude:
            near = difflib.get_close_matches(dest, [d for d in self.settings if d not in exclude], n=1)
            raise UserError(f"[{where}] unknown key '{name}' for this command"
                            + (f"; did you mean '{near[0].replace('_', '-')}'?" if near else ""))
        return dest

    def value(self, name: str, value, where: str = "settings") -> object:
        """``value`` for setting ``name`` (its canonical name), checked against the setting's type."""
        kind = _scalar(self.settings[name].kind)
        label = f"[{where}] {name.replace('_', '-')}"
        if value is None or isinstance(value, dict):
            raise UserError(f"{label}: expected one value, got {value!r}")
        if kind is list or typing.get_origin(kind) is list:
            if not isinstance(value, list):
                raise UserError(f"{label} must be a list, got {type(value).__name__} {value!r}")
            return value
        return typed_value(label, value, kind)

    def build(self, values: dict, where: str = "settings"):
        """The command's config from flat ``values`` (``{setting name: value}``), types checked;
        settings not given keep their defaults (an attack's: its profile's)."""
        given = {}
        for name, v in values.items():
            key = self.key(name, where)
            given[key] = self.value(key, v, where)

        def make(cls, path: tuple[str, ...]):
            kw = {}
            for f in dataclasses.fields(cls):
                kind = typing.get_type_hints(cls)[f.name]
                if not path and f.name in self.fixed:
                    kw[f.name] = self.fixed[f.name]
                elif dataclasses.is_dataclass(kind):
                    kw[f.name] = make(kind, (*path, f.name))
                elif f.name in given and self.settings[f.name].path == (*path, f.name):
                    kw[f.name] = given[f.name]
                elif f.default is MISSING and f.default_factory is MISSING:
                    raise UserError(f"[{where}] the {self.name} command needs {f.name.replace('_', '-')}")
            return cls(**kw)

        config = make(self.config_class, ())
        if self.plugin is not None:
            config.settings = {k: v for k, v in given.items() if self.settings[k].path[0] == "settings"}
        return config

    def run(self, config):
        """Run the command; its result (with ``summary()``)."""
        return self.runner(config)


@functools.cache
def _fixed_commands() -> dict[str, Command]:
    from .attribute import AttributeCommand, run_attribute
    from .direction import DirectionCommand, run_direction_command
    from .edit import EditCommand, run_edit_command
    from .evaluate import EvaluateCommand, run_evaluate
    from .organism import (
        OrganismBuildCommand,
        OrganismCheckCommand,
        OrganismEvaluateCommand,
        run_organism_build,
        run_organism_check,
        run_organism_evaluate,
    )
    from .orthogonalize import OrthogonalizeCommand, run_orthogonalize
    from .rdo import RDOCommand, run_rdo_command
    from .refusal import RefusalCommand, run_refusal
    from .reproduce import ReproduceCommand, run_reproduce

    commands = [
        Command("refusal", RefusalCommand, run_refusal),
        Command("direction", DirectionCommand, run_direction_command),
        Command("rdo", RDOCommand, run_rdo_command),
        Command("edit", EditCommand, run_edit_command),
        Command("evaluate", EvaluateCommand, run_evaluate),
        Command("attribute", AttributeCommand, run_attribute),
        Command("reproduce", ReproduceCommand, run_reproduce),
        Command("organism evaluate", OrganismEvaluateCommand, run_organism_evaluate),
        # no JSON summary on the command line (orthogonalize, build) or no run folder (check)
        Command("orthogonalize", OrthogonalizeCommand, run_orthogonalize, sweepable=False),
        Command("organism build", OrganismBuildCommand, run_organism_build, sweepable=False),
        Command("organism check", OrganismCheckCommand, run_organism_check, sweepable=False),
    ]
    return {c.name: c for c in commands}


# Commands of the command line that are no command of this layer (they run no model config).
CLI_ONLY = ("figures", "presets", "sweep")


def command_names() -> list[str]:
    """The first words of every command (``attack`` for ``attack NAME``)."""
    return sorted({n.split()[0] for n in _fixed_commands()} | {"attack"} | set(CLI_ONLY))


@functools.cache
def _attack_command(name: str) -> Command:
    from ..attacks import get_attack
    from .attack import AttackCommand, run_attack

    cls = get_attack(name)
    return Command(f"attack {name}", AttackCommand, run_attack, fixed={"attack": name}, plugin=cls.config_class)


def get_command(name: str) -> Command:
    """The command ``name`` (``refusal``, ``attack gcg``, ``organism evaluate``...), or a
    one-line error naming the nearest one."""
    words = name.split()
    fixed = _fixed_commands()
    firsts = command_names()
    if not words or words[0] not in firsts:
        word = words[0] if words else ""
        near = difflib.get_close_matches(word, firsts, n=1)
        raise UserError(f"'{word}' is not a suffix-analysis command"
                        + (f" (did you mean '{near[0]}'?)" if near else f"; commands: {', '.join(firsts)}"))
    if words[0] == "attack":
        if len(words) != 2:
            raise UserError(f"command '{name}' needs one attack name, e.g. 'attack gcg'")
        return _attack_command(words[1])
    if " ".join(words) in fixed:
        return fixed[" ".join(words)]
    if words[0] in CLI_ONLY:
        raise UserError(f"'{words[0]}' runs no command config; it has no run folder and JSON summary")
    subs = sorted(n for n in fixed if n.split()[0] == words[0])
    raise UserError(f"command '{name}' needs a subcommand, e.g. '{subs[0]}'" if len(words) == 1 else
                    f"'{name}' is not a suffix-analysis command; {words[0]} has: {', '.join(subs)}")


def quiet_libraries() -> None:
    """Hide the libraries' own progress bars and warnings (ours stay)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


__all__ = ["Command", "Setting", "command_names", "get_command", "quiet_libraries"]
