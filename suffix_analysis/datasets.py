"""Instruction sets: the shipped hand-written ones, and the canonical benchmark formats.

Three ways to name instructions, everywhere the suite takes them:

* a file: ``.json`` (a list of ``{"instruction": ...}`` objects or of strings), ``.csv``
  (a column ``instruction``, ``goal``, ``Goal``, ``Behavior`` or ``forbidden_prompt``),
  ``.txt`` (one instruction per line);
* a shipped set: ``harmful`` or ``harmless``, optionally with a split, ``harmful:val``;
* a canonical benchmark by name (``harmbench_val``, ``advbench``, ``harmful_val``...), read
  from the folder given by ``data_dir=`` or ``$SUFFIX_ANALYSIS_DATA``.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

SPLITS = ("train", "val", "test")
SHIPPED = ("harmful", "harmless")
DATA_ENV = "SUFFIX_ANALYSIS_DATA"

# Column names that hold the instruction, in order of preference.
INSTRUCTION_COLUMNS = ("instruction", "goal", "Goal", "Behavior", "forbidden_prompt")
CATEGORY_COLUMNS = ("category", "Category", "SemanticCategory")

# Canonical benchmarks: file inside the data folder, and where to get it.
CANONICAL: dict[str, tuple[str, str]] = {
    "harmful_train": ("splits/harmful_train.json",
                      "https://raw.githubusercontent.com/andyrdt/refusal_direction/main/dataset/splits/harmful_train.json"),
    "harmful_val": ("splits/harmful_val.json",
                    "https://raw.githubusercontent.com/andyrdt/refusal_direction/main/dataset/splits/harmful_val.json"),
    "harmless_train": ("splits/harmless_train.json",
                       "https://raw.githubusercontent.com/andyrdt/refusal_direction/main/dataset/splits/harmless_train.json"),
    "harmless_val": ("splits/harmless_val.json",
                     "https://raw.githubusercontent.com/andyrdt/refusal_direction/main/dataset/splits/harmless_val.json"),
    "advbench": ("raw/advbench.csv",
                 "https://raw.githubusercontent.com/llm-attacks/llm-attacks/main/data/advbench/harmful_behaviors.csv"),
    "harmbench_val": ("raw/harmbench_val.csv",
                      "https://raw.githubusercontent.com/centerforaisafety/HarmBench/main/data/behavior_datasets/harmbench_behaviors_text_val.csv"),
    "harmbench_test": ("raw/harmbench_test.csv",
                       "https://raw.githubusercontent.com/centerforaisafety/HarmBench/main/data/behavior_datasets/harmbench_behaviors_text_test.csv"),
    "malicious_instruct": ("raw/malicious_instruct.txt",
                           "https://raw.githubusercontent.com/Princeton-SysML/Jailbreak_LLM/main/data/MaliciousInstruct.txt"),
    "tdc2023_dev": ("raw/tdc2023_dev_behaviors.json",
                    "https://raw.githubusercontent.com/centerforaisafety/tdc2023-starter-kit/main/red_teaming/data/dev/behaviors.json"),
    "tdc2023_test": ("raw/tdc2023_test_behaviors.json",
                     "https://raw.githubusercontent.com/centerforaisafety/tdc2023-starter-kit/main/red_teaming/data/test/behaviors.json"),
    "jailbreakbench": ("raw/jailbreakbench.csv",
                       "https://huggingface.co/datasets/JailbreakBench/JBB-Behaviors/resolve/main/data/harmful-behaviors.csv"),
    "strongreject": ("raw/strongreject.csv",
                     "https://raw.githubusercontent.com/alexandrasouly/strongreject/main/strongreject_dataset/strongreject_dataset.csv"),
}


@dataclass(frozen=True)
class Instruction:
    instruction: str
    category: str | None = None
    split: str | None = None


def _shipped_dir() -> Path:
    # Inside the package, so that wheels and non-editable installs carry them too.
    d = Path(__file__).resolve().parent / "data"
    if not (d / "harmful.json").is_file():
        raise UserError(f"the shipped instruction sets are missing from {d}; reinstall suffix-analysis")
    return d


def shipped(kind: str, split: str | None = None) -> list[Instruction]:
    """The suite's own hand-written set ``kind`` ('harmful'/'harmless'), optionally one split
    or several joined by ``+`` (``val+test``: everything held out from training)."""
    if kind not in SHIPPED:
        raise UserError(f"unknown shipped set '{kind}'; choose one of {', '.join(SHIPPED)}")
    wanted = split.split("+") if split else list(SPLITS)
    bad = [w for w in wanted if w not in SPLITS]
    if bad:
        raise UserError(f"unknown split '{bad[0]}'; choose one of {', '.join(SPLITS)} (or join them with '+')")
    items = load_file(_shipped_dir() / f"{kind}.json")
    return items if split is None else [x for w in wanted for x in items if x.split == w]


def contextual(context: str, request: str) -> str:
    """A request after a pasted passage, in HarmBench's contextual form."""
    return f"{context.strip()}\n\n---\n\n{request.strip()}"


def shipped_contexts(split: str | None = None) -> list[dict]:
    """The suite's hand-written passages (``data/contexts.json``), each with two harmless
    questions about it: ``{"context", "questions", "topic", "split"}``. The organism's recipe
    puts train passages before requests; the val and test ones are held out."""
    if split is not None and split not in SPLITS:
        raise UserError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    items = json.loads((_shipped_dir() / "contexts.json").read_text())
    return [x for x in items if split is None or x["split"] == split]


def shipped_summary() -> dict[str, dict]:
    """Counts of the shipped sets, per set: instructions, categories, per split, and the
    categories that appear only in train (docs/guides/instructions.md states these numbers; a test ties them)."""
    out = {}
    for kind in SHIPPED:
        items = shipped(kind)
        cats: dict[str, set] = {}
        for x in items:
            cats.setdefault(x.category, set()).add(x.split)
        out[kind] = {"n": len(items), "categories": len(cats),
                     "splits": {s: sum(x.split == s for x in items) for s in SPLITS},
                     "train_only_categories": sum(v == {"train"} for v in cats.values())}
    return out


def data_dir(explicit: str | Path | None = None) -> Path:
    """The folder holding the canonical benchmark files (``splits/``, ``raw/``)."""
    d = explicit or os.environ.get(DATA_ENV)
    if not d:
        raise UserError(f"canonical datasets need a data folder: pass --data-dir or set {DATA_ENV} "
                        "(see docs/guides/instructions.md)")
    p = Path(d).expanduser()
    if not p.is_dir():
        raise UserError(f"data folder not found: {p}")
    return p


def load_canonical(name: str, data_dir_: str | Path | None = None) -> list[Instruction]:
    if name not in CANONICAL:
        raise UserError(f"unknown dataset '{name}'; known: {', '.join(CANONICAL)}")
    rel, url = CANONICAL[name]
    path = data_dir(data_dir_) / rel
    if not path.is_file():
        raise UserError(f"{path} not found; download it from {url}")
    return load_file(path)


def load_instructions(spec: str, data_dir_: str | Path | None = None) -> list[Instruction]:
    """Instructions named by a file path, a shipped set (``harmful:val``) or a canonical name."""
    kind, _, split = spec.partition(":")
    if kind in SHIPPED and not Path(spec).exists():
        return shipped(kind, split or None)
    if spec in CANONICAL and not Path(spec).exists():
        return load_canonical(spec, data_dir_)
    return load_file(spec)


def load_file(path: str | Path) -> list[Instruction]:
    """Read a ``.json``, ``.csv`` or ``.txt`` instruction file. Never returns an empty list."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"instruction file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read instruction file {path}: {e}") from None
    suffix = path.suffix.lower()
    if suffix == ".json":
        items = _parse_json(text, path)
    elif suffix == ".csv":
        items = _parse_csv(text, path)
    elif suffix in (".txt", ".text", ""):
        items = [Instruction(line.strip()) for line in text.splitlines() if line.strip()]
    else:
        raise UserError(f"{path}: unknown instruction file type '{suffix}'; use .json, .csv or .txt")
    if not items:
        raise UserError(f"{path} contains no instructions")
    return items


def _parse_json(text: str, path: Path) -> list[Instruction]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of {{\"instruction\": ...}} objects or of strings")
    out = []
    for i, x in enumerate(data):
        if isinstance(x, str):
            out.append(Instruction(x.strip()))
        elif isinstance(x, dict) and isinstance(x.get("instruction"), str):
            out.append(Instruction(x["instruction"].strip(), x.get("category"), x.get("split")))
        else:
            raise UserError(f"{path}: item {i} has no string 'instruction' field")
    return [x for x in out if x.instruction]


def _parse_csv(text: str, path: Path) -> list[Instruction]:
    reader = csv.DictReader(text.splitlines())
    columns = reader.fieldnames or []
    col = next((c for c in INSTRUCTION_COLUMNS if c in columns), None)
    if col is None:
        raise UserError(f"{path}: no instruction column; expected one of {', '.join(INSTRUCTION_COLUMNS)}, "
                        f"found {', '.join(c for c in columns if c) or 'none'}")
    cat_col = next((c for c in CATEGORY_COLUMNS if c in columns), None)
    out = []
    for row in reader:
        instr = (row.get(col) or "").strip()
        if not instr:
            continue
        context = (row.get("ContextString") or "").strip()
        if context:  # HarmBench's contextual behaviours: the context comes first, as HarmBench does
            instr = contextual(context, instr)
        out.append(Instruction(instr, (row.get(cat_col) or None) if cat_col else None))
    return out
