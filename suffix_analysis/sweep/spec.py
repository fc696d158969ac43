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

Keys are the command's own settings (:func:`suffix_analysis.commands.get_command`: the
fields of its config, as its flags name them, ``search-width`` or ``search_width``); an
unknown key names the nearest one, and values are checked against the settings' types.
Each job is the command's config built from ``[settings]`` and its grid values, with
``out = JOB/run`` and no progress bars, run in-process (see ``jobs``).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..commands import Command, get_command
from ..config import read_toml, setting, toml_value
from ..errors import UserError

# The sweep gives every job these (out: its own run folder; no progress bars in its log).
SET_BY_SWEEP = ("out", "json", "quiet", "progress")


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
    command: str  # e.g. "attack gcg"
    settings: dict  # the command's flat settings ([settings] and this job's grid values; without out)
    values: dict  # grid key -> this job's value
    cwd: str = ""  # where relative paths in the settings are read from (the sweep's own working directory)

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


def sweep_command(name: str) -> Command:
    """The command ``name`` of the registry, if a sweep can run it."""
    try:
        command = get_command(name)
    except UserError as e:
        raise UserError(f"[sweep] command: {e}") from None
    if not command.sweepable:
        raise UserError(f"[sweep] command '{name}' has no --out and --json; a sweep runs commands that "
                        "write a run folder and print a JSON summary")
    return command


def _key(name: str, command: Command, section: str) -> str:
    """The setting ``name`` names (any of its spellings, with - or _)."""
    if name.replace("_", "-") in ("q", *(k.replace("_", "-") for k in SET_BY_SWEEP)):
        flag = "quiet" if name == "q" else name
        raise UserError(f"[{section}] {name}: the sweep sets --{flag} for every job; remove it")
    return command.key(name, section, exclude=SET_BY_SWEEP)


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
    """Read a sweep file into its jobs, every key and value checked against the command's settings."""
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
    command = sweep_command(settings.command)
    name = " ".join(settings.command.split())

    fixed: dict = {}
    given: dict[str, str] = {}
    for key, value in data.get("settings", {}).items():
        dest = _key(key, command, "settings")
        given[dest] = key
        if isinstance(value, list):
            raise UserError(f"[settings] {key}: one value per setting; put the list under [grid] to sweep it")
        fixed[dest] = command.value(dest, value, "settings")
    grid = data.get("grid", {})
    axes = []
    for key, values in grid.items():
        dest = _key(key, command, "grid")
        if dest in given:
            raise UserError(f"{given[dest]} is under both [settings] and [grid]; keep it in one of them")
        values = values if isinstance(values, list) else [values]
        if not values:
            raise UserError(f"[grid] {key} is an empty list: the grid has no job")
        axes.append((dest, [command.value(dest, v, "grid") for v in values]))
    if not axes:
        raise UserError(f"{path}: [grid] is empty; give at least one key with a list of values (e.g. seed = [0, 1])")
    jobs, seen = [], set()
    varying = [d for d, v in axes if len(v) > 1]
    for combo in itertools.product(*[v for _, v in axes]):
        values = dict(zip([d for d, _ in axes], combo))
        job_settings = {**fixed, **values}
        command.build({**job_settings, "out": "."})  # every setting the command needs is there
        digest = hashlib.sha256(json.dumps([name, job_settings], sort_keys=True).encode()).hexdigest()[:8]
        label = "_".join(f"{d}={_slug(values[d])}" for d in varying) or "job"
        job_id = f"{label}-{digest}"
        if job_id in seen:
            raise UserError(f"[grid] gives the same job twice ({job_id}); remove the repeated value")
        seen.add(job_id)
        jobs.append(Job(id=job_id, command=name, settings=job_settings, values=values, cwd=str(Path.cwd())))
    return SweepSpec(settings=settings, jobs=jobs, grid_keys=[d for d, _ in axes], source=str(path))
