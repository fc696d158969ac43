"""A ``reproduce`` run's folder as the figures read it: :class:`Tables` (its JSON records and
tables, the footer naming model, data and direction), and :func:`check_tables`, the check
that every finished stage's tables are there and all name the run's model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..errors import UserError
from ..tables import read_table, table_path


@dataclass
class Tables:
    """The run folder and what the figures read from it."""

    run: Path

    def json(self, rel: str) -> dict | list | None:
        path = self.run / rel
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            stage = f" --redo {rel.split('/')[0]}" if "/" in rel else ""
            raise UserError(f"{path} is not valid JSON (truncated or edited?); make it again with "
                            f"`suffix-analysis reproduce --out {self.run}{stage}`") from None

    def table(self, folder: str, name: str, columns=None) -> pd.DataFrame | None:
        where = self.run / folder
        return read_table(where, name, columns) if table_path(where, name) is not None else None

    def footer(self) -> str:
        meta = self.json("run.json") or {}
        d = self.json("direction/direction.json") or {}
        ev = meta.get("eval", {})
        direction = f"direction: layer {d['layer']}, EOI position {d['position']}" if d else "no direction"
        return (f"model {meta.get('model', '?')} | harmful eval {ev.get('harmful_eval', '?')} "
                f"(n={ev.get('n_harmful', '?')}) | {direction}")

    def kinds(self) -> dict[str, str]:
        """Attribution condition name -> kind (harmful, random, adversarial, harmless)."""
        c = self.json("attribution/conditions.json")
        return {x["name"]: x["kind"] for x in c["conditions"]} if c else {}


# What each finished stage must have written (a table by name, either format, or a file).
STAGE_TABLES = {
    "direction": ("candidates", "direction.json"),
    "evaluation": ("evaluation",),
    "attack": ("losses", "suffix.json", "random.json"),
    "transfer": ("transfer",),
    "attribution": ("cosine", "heads", "hijack", "hijack_dominance", "patching", "knockout", "top_heads.json",
                    "conditions.json"),
    "defence": ("defence", "defence.json"),
}
# Files that name the model they were made from.
MODEL_RECORDS = ("direction/direction.json", "attack/suffix.json", "attribution/run.json")


def check_tables(t: Tables) -> None:
    """A finished stage's tables are all there and every record names the run's model;
    otherwise a one-line error that says which file and how to fix it."""
    meta = t.json("run.json")
    for stage, names in STAGE_TABLES.items():
        if not (t.run / stage / "stage.json").is_file():
            continue
        for name in names:
            present = (t.run / stage / name).is_file() if "." in name else table_path(t.run / stage, name)
            if not present:
                shown = name if "." in name else f"{name}.csv"
                raise UserError(f"{t.run / stage / shown} is missing though the {stage} stage finished; rerun "
                                f"`suffix-analysis reproduce --out {t.run} --redo {stage}`")
    if meta is None:
        return
    for rel in MODEL_RECORDS:
        rec = t.json(rel)
        if rec and rec.get("model") not in (None, meta["model"]):
            raise UserError(f"{t.run / rel} is from model {rec['model']}, but {t.run} is a run of {meta['model']}; "
                            "draw figures from one run's own tables")
