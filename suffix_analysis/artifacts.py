"""Atomic artifact writes: a reader never sees a half-written file."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError


def ensure_dir(path: str | Path) -> Path:
    p = Path(path).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {p}: {e.strerror}") from None
    if not os.access(p, os.W_OK):
        raise UserError(f"output folder {p} is not writable")
    return p


def write_text_atomic(path: str | Path, text: str) -> Path:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, obj) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def refuse_foreign(final: Path, ours: Callable[[Path], bool], what: str) -> None:
    """Refuse to replace ``final`` unless it is absent, an empty folder, or ``ours`` says the
    suite wrote it (an artifact of the same kind)."""
    if not final.exists() or is_empty_dir(final) or ours(final):
        return
    raise UserError(f"{final} exists and is not {what} written by suffix-analysis; choose another --out, or move "
                    "it away yourself to write there (the suite never replaces what it did not make)")


@contextmanager
def atomic_folder(final: str | Path, ours: Callable[[Path], bool], what: str) -> Iterator[Path]:
    """Yield a temporary sibling of ``final`` to write a folder into; on success it replaces
    ``final`` in one rename, on error it is removed. ``final`` is whole or absent, never half.

    An existing ``final`` is replaced only if ``ours(final)`` says it is ``what`` the suite
    wrote (or it is empty); anything else is refused before a byte is written.
    """
    final = Path(final).expanduser().resolve()
    refuse_foreign(final, ours, what)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    except OSError as e:
        raise UserError(f"cannot write to {final.parent}: {e.strerror}") from None
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
