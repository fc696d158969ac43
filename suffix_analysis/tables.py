"""Tidy tables in a run folder, written atomically.

A table is ``NAME.csv``, or ``NAME.parquet`` when it has more than :data:`LARGE_ROWS` rows
and ``pyarrow`` is importable (a million-row CSV of floats is slow to write and to read
back). Either is written to a hidden temporary file beside it and renamed over it, so a
reader (or a rerun that skips stages whose table exists) never sees half a table.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

LARGE_ROWS = 500_000
FORMATS = ("parquet", "csv")


@functools.cache
def has_pyarrow() -> bool:
    return importlib.util.find_spec("pyarrow") is not None


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write into; renamed to ``path`` on success,
    removed on any error (``path`` is whole or as it was, never half-written)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def table_path(folder: Path, name: str) -> Path | None:
    """The table ``name`` in ``folder`` (either format), or None if it is not there."""
    for ext in FORMATS:
        path = Path(folder) / f"{name}.{ext}"
        if path.is_file():
            return path
    return None


def write_table(folder: Path, name: str, df: pd.DataFrame) -> Path:
    """Write ``df`` as ``folder/name.parquet`` (large, with pyarrow) or ``.csv``, atomically."""
    parquet = len(df) > LARGE_ROWS and has_pyarrow()
    path = Path(folder) / f"{name}.{'parquet' if parquet else 'csv'}"
    with atomic_path(path) as tmp:
        if parquet:
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False)
    # a table of the other format (written under another threshold) would shadow this one
    for ext in FORMATS:
        if ext != path.suffix[1:]:
            (Path(folder) / f"{name}.{ext}").unlink(missing_ok=True)
    return path


def read_table(folder: Path, name: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """The table ``name`` of ``folder`` (only ``columns``, if given)."""
    path = table_path(folder, name)
    if path is None:
        raise FileNotFoundError(f"no table {name} in {folder}")
    cols = list(columns) if columns is not None else None
    if path.suffix == ".parquet":
        return pd.read_parquet(path, columns=cols)
    return pd.read_csv(path, usecols=cols)
