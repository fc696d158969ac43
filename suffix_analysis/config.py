"""Settings as dataclass fields: one place for a setting, its default and its help.

A config dataclass declares each field with :func:`setting`; :func:`add_arguments` turns
the fields into command-line flags (``--search-width``, booleans as ``--x/--no-x``) and
:func:`from_arguments` builds the config back from the parsed flags. Fields whose type has
no flag form (tuples, nested objects) are left to their defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import MISSING, field

_SCALARS = (int, float, str, bool)


def setting(default=MISSING, help: str = "", *, flags: tuple[str, ...] = (), choices: tuple | None = None,
            default_factory=MISSING, cli: bool = True):
    """A dataclass field with its command-line help; ``flags`` are extra spellings
    (``--steps`` for ``num_steps``); ``cli=False`` keeps it off the command line."""
    meta = {"help": help, "flags": tuple(flags), "choices": choices, "cli": cli}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def flag_fields(cls) -> list[tuple[dataclasses.Field, type]]:
    """The fields of config class ``cls`` that have a command-line flag, with their types."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)
            if f.metadata.get("cli", True) and hints.get(f.name) in _SCALARS]


def flag_name(f: dataclasses.Field) -> str:
    return "--" + f.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls, skip: tuple[str, ...] = (),
                  defaults: dict | None = None) -> None:
    """A flag per field of ``cls`` (its default from the field, or ``defaults``), except ``skip``."""
    defaults = defaults or {}
    for f, kind in flag_fields(cls):
        if f.name in skip:
            continue
        default = defaults.get(f.name, f.default if f.default is not MISSING else f.default_factory())
        shown = "" if default in ("", None) else f" (default: {default})"
        kw: dict = dict(dest=f.name, default=default, help=(f.metadata.get("help", "") + shown).strip())
        if kind is bool:  # --x / --no-x; argparse states the default itself
            kw["action"] = argparse.BooleanOptionalAction
            kw["help"] = f.metadata.get("help", "")
        else:
            kw["type"] = kind
            kw["metavar"] = f.name.upper()
            if f.metadata.get("choices"):
                kw["choices"] = f.metadata["choices"]
        parser.add_argument(flag_name(f), *f.metadata.get("flags", ()), **kw)


def from_arguments(cls, args: argparse.Namespace, **extra):
    """An instance of ``cls`` from the flags :func:`add_arguments` made (plus ``extra`` fields)."""
    given = {f.name: getattr(args, f.name) for f, _ in flag_fields(cls) if hasattr(args, f.name)}
    return cls(**{**given, **extra})
