"""A run folder: its record, its stages, what a rerun may change, and refusing what is not ours.

Every command that writes a folder of results (``direction``, ``attribute``, ``reproduce``,
``attack --out``) keeps ``RUN/run.json``::

    {"kind": "direction", "suite": "0.1.0", "model": ..., "fingerprint": ..., <inputs>, "config": {...}}

:func:`open_run` creates the folder (absent or empty) or reopens it when it is a run of the
same kind, made from the same model, inputs and settings; the settings a rerun may change
(``free``: speed and selection knobs) are updated. Anything else is refused with one line
that says what differs and what to do, and nothing in the folder is touched. A stage is a
name, a function and its outputs (:class:`Stage`), listed explicitly by each run; a stage
whose outputs exist is done.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .artifacts import ensure_dir, is_empty_dir, write_json_atomic
from .errors import UserError

RUN_FILE = "run.json"
# Keys of a record that describe the last execution, not the run's identity.
VOLATILE = ("suite", "stages", "finished")


def digest(obj: Any) -> str:
    """The short hash every record uses for data and settings: SHA-256 of canonical JSON, 16 hex digits."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _a(kind: str) -> str:
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def read_json(path: str | Path, remedy: str) -> Any:
    """A JSON artifact, or one line naming the file and ``remedy`` if it is missing or corrupt."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing; {remedy}") from None
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        why = e.strerror if isinstance(e, OSError) else "not valid JSON (truncated or edited?)"
        raise UserError(f"{path} is unreadable: {why}; {remedy}") from None


def run_kind(path: str | Path) -> str | None:
    """The kind of run ``path`` holds (``None``: no readable run record)."""
    try:
        rec = json.loads((Path(path) / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return rec.get("kind") if isinstance(rec, dict) else None


def _differences(old: dict, new: dict, free: Iterable[str]) -> list[str]:
    """The keys of ``new`` (the run's identity) whose values ``old`` does not share."""
    free = set(free)
    out = []
    for key in sorted(new):
        if key in VOLATILE or key in ("kind", "fingerprint"):  # the model is checked on its own
            continue
        a, b = old.get(key), new[key]
        if key == "config" and isinstance(a, dict) and isinstance(b, dict):
            out += [f"config.{k}" for k in sorted(set(a) | set(b)) if k not in free and a.get(k) != b.get(k)]
        elif json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            out.append(key)
    return out


def open_run(out: str | Path, kind: str, record: dict, *, free: Sequence[str] = (),
             same_model: Callable[[dict], str | None] | None = None,
             explain: Callable[[dict, list[str]], str | None] | None = None, redo_hint: str = "") -> dict:
    """Create the run folder ``out`` with ``record``, or reopen it; returns the folder's record
    (with this run's ``free`` settings).

    ``record`` is the run's identity: the model (``model``, ``fingerprint``), the inputs and
    ``config`` (the settings); ``free`` names the ``config`` keys a rerun may change. Keys the
    folder's record has beyond these are kept and not compared. ``same_model(old)``
    returns why the folder's model is not this one (``None``: it is), for a message that
    names both; ``explain(old, changed)`` may word what differs (``changed``: the record keys,
    ``config.<key>`` for settings). A folder of another kind, a non-empty folder without a
    run, or a run made from other inputs is refused; nothing is written then.
    """
    out = Path(out).expanduser()
    path = out / RUN_FILE
    record = {"kind": kind, "suite": __version__, **record}
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; choose another --out")
    if not path.is_file():
        if out.is_dir() and not is_empty_dir(out):
            raise UserError(f"{out} is not empty and holds no {kind} run (no {RUN_FILE}); choose a new or empty "
                            "--out (the suite never writes into a folder it did not make)")
        ensure_dir(out)
        write_json_atomic(path, record)
        return record
    old = read_json(path, f"choose another --out, or remove {out} yourself to start the run again")
    if not isinstance(old, dict):
        raise UserError(f"{path} is not a run record; choose another --out")
    if old.get("kind", kind) != kind:  # records of suite versions before 'kind' have none
        raise UserError(f"{out} is {_a(old['kind'])} run, not {_a(kind)} run; choose another --out")
    why = same_model(old) if same_model else None
    if why is None and None not in (old.get("fingerprint"), record.get("fingerprint")) and \
            old["fingerprint"] != record["fingerprint"]:
        why = f"{out} was made from other weights (fingerprint {old.get('fingerprint')})"
    if why:
        raise UserError(f"{why}; use that model or another --out")
    changed = _differences(old, record, free)
    if changed:
        what = (explain(old, changed) if explain else None) or f"with other inputs or settings ({', '.join(changed)})"
        hint = f" ({redo_hint})" if redo_hint else ""
        raise UserError(f"{out} is {_a(kind)} run made {what}; choose another --out{hint}")
    merged = {**old, **{k: v for k, v in record.items() if k not in ("stages",)}}
    if "stages" in old:
        merged["stages"] = old["stages"]
    return merged  # written by the caller when a stage runs (update_run): a rerun that skips all touches nothing


def update_run(out: str | Path, record: dict) -> None:
    """Rewrite the run's record (stage times, a fingerprint learned late)."""
    write_json_atomic(Path(out) / RUN_FILE, record)


@dataclass(frozen=True)
class Stage:
    """One step of a run: ``run(ctx)`` writes ``outputs`` (file names in the run folder, or
    what ``exists`` recognizes); it is done when they all exist."""

    name: str
    run: Callable[[Any], Any]
    outputs: tuple[str, ...]
    exists: Callable[[Path, str], bool] | None = None

    def done(self, out: Path) -> bool:
        check = self.exists or (lambda folder, name: (folder / name).is_file())
        return all(check(out, o) for o in self.outputs)
