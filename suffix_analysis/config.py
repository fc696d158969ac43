"""Settings as dataclass fields: one place for a setting, its default and its help.

A config dataclass declares each field with :func:`setting`; :func:`add_arguments` turns
the fields into command-line flags (``--search-width``, booleans as ``--x/--no-x``) and
:func:`from_arguments` builds the config back from the parsed flags. Fields whose type has
no flag form (tuples, nested objects) are left to their defaults. :func:`read_toml` and
:func:`toml_value` read the same settings from a TOML file, checked against the field types.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import MISSING, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .errors import UserError

_SCALARS = (int, float, str, bool)
# Namespace names the command line itself uses: a config field may not take them.
RESERVED = ("command", "name", "func", "verbose", "organism_command", "profile")


def finite_float(text: str) -> float:
    """A float flag's type: a finite number, or argparse's one-line error."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return v


PROFILES = ("gpu", "cpu")


def setting(default=MISSING, help: str = "", *, flags: tuple[str, ...] = (), default_factory=MISSING,
            cli: bool = True, cpu=MISSING):
    """A dataclass field with its command-line help; ``flags`` are extra spellings
    (``--steps`` for ``num_steps``); ``cli=False`` keeps it off the command line.

    ``cpu``: the field's default in the CPU profile, where the paper's GPU size (``default``)
    would take hours (see :func:`profile_defaults`).
    """
    meta = {"help": help, "flags": tuple(flags), "cli": cli}
    if cpu is not MISSING:
        meta["cpu"] = cpu
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def read_toml(path: str | Path, what: str = "config file") -> dict:
    """The TOML file ``path`` as a dict, or a one-line error naming ``what`` is missing or malformed."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid TOML ({e})") from None


def toml_value(section: str, key: str, value, cls) -> object:
    """A TOML ``value`` for field ``key`` of config class ``cls``, checked against the field's
    type (ints are accepted for floats)."""
    return typed_value(f"[{section}] {key}", value, typing.get_type_hints(cls)[key])


def typed_value(where: str, value, kind) -> object:
    """``value`` checked against the type ``kind`` (a scalar; other types pass unchecked), or a
    one-line error that starts with ``where``; ints are accepted for floats."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is float and isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{where} must be finite, got {value}")
    if kind in _SCALARS and (type(value) is not kind):
        name = "a number" if kind is float else kind.__name__
        raise UserError(f"{where} must be {name}, got {type(value).__name__} {value!r}")
    return value


def flag_fields(cls) -> list[tuple[dataclasses.Field, type]]:
    """The fields of config class ``cls`` that have a command-line flag, with their types."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)
            if f.metadata.get("cli", True) and hints.get(f.name) in _SCALARS]


def profile_defaults(cls, profile: str) -> dict:
    """The defaults of config class ``cls`` that differ in ``profile`` ('gpu': the declared
    defaults; 'cpu': each field's ``cpu`` value)."""
    if profile not in PROFILES:
        raise UserError(f"unknown profile '{profile}'; use {', '.join(PROFILES)}")
    if profile == "gpu":
        return {}
    return {f.name: f.metadata["cpu"] for f in dataclasses.fields(cls) if "cpu" in f.metadata}


def for_profile(cls, profile: str, **given):
    """An instance of ``cls`` with ``profile``'s defaults, overridden by ``given``."""
    return cls(**{**profile_defaults(cls, profile), **given})


def flag_name(f: dataclasses.Field) -> str:
    return "--" + f.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls) -> None:
    """A flag per field of config class ``cls``, with the field's default and help."""
    taken = {a.dest for a in parser._actions} | set(RESERVED)
    for f, kind in flag_fields(cls):
        if f.name in taken:
            raise UserError(f"{cls.__name__}.{f.name} clashes with a setting of the command itself; rename the field")
        default = f.default if f.default is not MISSING else f.default_factory()
        if kind is bool:
            shown = f" (default: {'--' if default else '--no-'}{f.name.replace('_', '-')})"
        else:
            shown = "" if default in ("", None) else f" (default: {default})"
        if "cpu" in f.metadata:  # None on the command line: the profile decides
            shown = f" (default: {default}; CPU profile: {f.metadata['cpu']})"
            default = None
        kw: dict = dict(dest=f.name, default=default, help=(f.metadata.get("help", "") + shown).strip())
        if kind is bool:  # --x / --no-x
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = finite_float if kind is float else kind
            kw["metavar"] = f.name.upper()
        try:
            parser.add_argument(flag_name(f), *f.metadata.get("flags", ()), **kw)
        except argparse.ArgumentError as e:
            raise UserError(f"{cls.__name__}.{f.name}: {e}; rename the field") from None


def given_arguments(cls, args: argparse.Namespace) -> dict:
    """The fields of ``cls`` whose flags (made by :func:`add_arguments`) were given, by name."""
    return {f.name: getattr(args, f.name) for f, _ in flag_fields(cls) if getattr(args, f.name, None) is not None}


def from_arguments(cls, args: argparse.Namespace, profile: str = "gpu", **extra):
    """An instance of ``cls`` from the flags :func:`add_arguments` made (plus ``extra`` fields);
    a profiled setting not given on the command line takes ``profile``'s default."""
    return for_profile(cls, profile, **{**given_arguments(cls, args), **extra})
