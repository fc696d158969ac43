"""The sweep file: which command, fixed flags, and a grid of flag values.

    [sweep]
    command = "attack gcg"      # any command with --out and --json
    out = "runs/sweep"          # on storage every worker sees
    gpus = 1                    # per job (0: CPU only; fractions share a GPU)
    cpus = 1                    # per job

    [settings]                  # flags every job gets
    steps = 50
    n-prompts = 5

    [grid]                      # one job per combination of these flags' values
    model = ["smollm2-135m-refusal", "qwen-1.8b"]
    seed = [0, 1, 2]
    instructions = ["harmful:train"]

Keys are the command's own flags (``search-width`` or ``search_width``); an unknown key
names the nearest one. Each job's flags are exactly what ``suffix-analysis COMMAND``
would be given by hand, plus ``--out JOB/run --json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..config import read_toml, setting, toml_value
from ..errors import UserError

SET_BY_SWEEP = ("out", "json", "quiet")  # the sweep gives every job these


@dataclass(frozen=True)
class SweepSettings:
    """The ``[sweep]`` section."""

    command: str = setting("", help="the suffix-analysis command each job runs, e.g. 'attack gcg' or 'reproduce'")
    out: str = setting("runs/sweep", help="the sweep's folder (shared storage on a cluster): jobs/, results.csv, figures/")
    gpus: float = setting(-1.0, help="GPUs per job; -1: one if the Ray cluster has GPUs, else none")
    cpus: float = setting(1.0, help="CPU cores per job (also its torch threads)")
    max_retries: int = setting(1, help="Ray re-runs a job whose worker died (not one whose command failed) this often")


@dataclass
class Job:
    """One command of the sweep."""

    id: str  # folder name under jobs/
    command: list[str]  # e.g. ["attack", "gcg"]
    argv: list[str]  # the flags (without --out/--json)
    values: dict  # grid key -> this job's value
    cwd: str = ""  # where relative paths in the flags are read from (the sweep's own working directory)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SweepSpec:
    settings: SweepSettings
    jobs: list[Job] = field(default_factory=list)
    grid_keys: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def out(self) -> Path:
        return Path(self.settings.out).expanduser()


def _subparser(parser: argparse.ArgumentParser, words: list[str]) -> argparse.ArgumentParser:
    for word in words:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            known = sorted(subs[0].choices) if subs else []
            near = difflib.get_close_matches(word, known, n=1)
            raise UserError(f"[sweep] command: '{word}' is not a suffix-analysis command"
                            + (f" (did you mean '{near[0]}'?)" if near else f"; commands: {', '.join(known)}"))
        parser = subs[0].choices[word]
    if any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):
        raise UserError(f"[sweep] command '{' '.join(words)}' needs a subcommand, e.g. 'attack gcg'")
    return parser


def command_flags(words: list[str]) -> dict[str, argparse.Action]:
    """The flags of ``suffix-analysis WORDS...`` by their dest (``search_width``)."""
    from ..cli import build_parser

    parser = _subparser(build_parser(words), words)
    flags = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    if "out" not in flags or "json" not in flags:
        raise UserError(f"[sweep] command '{' '.join(words)}' has no --out and --json; a sweep runs commands that "
                        "write a run folder and print a JSON summary")
    return flags


def _key(name: str, flags: dict, section: str) -> str:
    """The dest of the flag ``name`` (any of its spellings, with - or _)."""
    dest = name.replace("-", "_")
    spellings = {o.lstrip("-").replace("-", "_"): d for d, a in flags.items() for o in a.option_strings}
    dest = spellings.get(dest, dest)
    if dest in SET_BY_SWEEP:
        raise UserError(f"[{section}] {name}: the sweep sets --{name} for every job; remove it")
    if dest not in flags:
        near = difflib.get_close_matches(dest, [d for d in flags if d not in SET_BY_SWEEP], n=1)
        raise UserError(f"[{section}] unknown key '{name}' for this command"
                        + (f"; did you mean '{near[0].replace('_', '-')}'?" if near else ""))
    return dest


def _flag_args(action: argparse.Action, value, where: str) -> list[str]:
    """The command-line words that give ``action`` the TOML ``value``."""
    flag = next((s for s in action.option_strings if s.startswith("--")), action.option_strings[0])
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return [flag] if value else ["--no-" + flag[2:]]
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        on = isinstance(action, argparse._StoreTrueAction)
        return [flag] if value == on else []
    if isinstance(value, (dict, list)) or value is None:
        raise UserError(f"{where}: expected one value, got {value!r}")
    return [flag, str(value).lower() if isinstance(value, bool) else str(value)]


FILE_TYPES = (".txt", ".json", ".jsonl", ".csv", ".toml", ".gguf", ".safetensors")


def _slug(value) -> str:
    """A short readable name: a file's stem, a hub id's name (``Qwen/Qwen2.5-7B`` -> ``Qwen2.5-7B``)."""
    text = str(value)
    if text.lower().endswith(FILE_TYPES):
        text = Path(text).stem
    elif "/" in text:
        text = text.rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", text)[:40]


def load_sweep(path: str | Path, out: str | None = None) -> SweepSpec:
    """Read a sweep file into its jobs, every key and value checked against the command's flags."""
    path = Path(path)
    data = read_toml(path, "sweep file")
    unknown = set(data) - {"sweep", "settings", "grid"}
    if unknown:
        name = sorted(unknown)[0]
        near = difflib.get_close_matches(name, ["sweep", "settings", "grid"], n=1)
        raise UserError(f"{path}: unknown section [{name}]" + (f"; did you mean [{near[0]}]?" if near else
                                                                ": use [sweep], [settings] and [grid]"))
    head = dict(data.get("sweep", {}))
    fields = {f.name: f for f in dataclasses.fields(SweepSettings)}
    for k in head:
        if k not in fields:
            near = difflib.get_close_matches(k, list(fields), n=1)
            raise UserError(f"{path}: [sweep] unknown key '{k}'" + (f"; did you mean '{near[0]}'?" if near else ""))
    if out:
        head["out"] = out
    settings = SweepSettings(**{k: toml_value("sweep", k, v, SweepSettings) for k, v in head.items()})
    if not settings.command:
        raise UserError(f"{path}: [sweep] needs command = \"...\", e.g. \"attack gcg\"")
    if settings.cpus <= 0:
        raise UserError(f"{path}: [sweep] cpus must be positive, got {settings.cpus}")
    words = settings.command.split()
    flags = command_flags(words)

    fixed: list[str] = ["--quiet"] if "quiet" in flags else []  # progress bars would fill the job's log
    given: dict[str, str] = {}
    for name, value in data.get("settings", {}).items():
        dest = _key(name, flags, "settings")
        given[dest] = name
        if isinstance(value, list):
            raise UserError(f"[settings] {name}: one value per setting; put the list under [grid] to sweep it")
        fixed += _flag_args(flags[dest], value, f"[settings] {name}")
    grid = data.get("grid", {})
    axes = []
    for name, values in grid.items():
        dest = _key(name, flags, "grid")
        if dest in given:
            raise UserError(f"{given[dest]} is under both [settings] and [grid]; keep it in one of them")
        values = values if isinstance(values, list) else [values]
        if not values:
            raise UserError(f"[grid] {name} is an empty list: the grid has no job")
        axes.append((dest, values))
    if not axes:
        raise UserError(f"{path}: [grid] is empty; give at least one key with a list of values (e.g. seed = [0, 1])")
    jobs, seen = [], set()
    varying = [d for d, v in axes if len(v) > 1]
    for combo in itertools.product(*[v for _, v in axes]):
        values = dict(zip([d for d, _ in axes], combo))
        argv = list(fixed)
        for dest, value in values.items():
            argv += _flag_args(flags[dest], value, f"[grid] {dest}")
        digest = hashlib.sha256(json.dumps([words, argv]).encode()).hexdigest()[:8]
        name = "_".join(f"{d}={_slug(values[d])}" for d in varying) or "job"
        job_id = f"{name}-{digest}"
        if job_id in seen:
            raise UserError(f"[grid] gives the same job twice ({job_id}); remove the repeated value")
        seen.add(job_id)
        jobs.append(Job(id=job_id, command=words, argv=argv, values={d: values[d] for d, _ in axes},
                        cwd=str(Path.cwd())))
    return SweepSpec(settings=settings, jobs=jobs, grid_keys=[d for d, _ in axes], source=str(path))
