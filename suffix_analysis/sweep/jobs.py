"""One job: one suffix-analysis command, run in the calling process, into its own folder.

The command's config is built from the job's flat settings through the command registry
(:func:`suffix_analysis.commands.get_command`) and its function called directly; the
headline numbers are its result's ``summary()`` (what ``--json`` prints), flattened.

    jobs/<id>/job.json     what runs (written first)
    jobs/<id>/run/         the command's own run folder (its out)
    jobs/<id>/job.log      its log, anything it printed, and errors
    jobs/<id>/result.json  status, seconds, headline numbers, error (written last: a job is
                           finished exactly when this file says "ok")
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import traceback
from pathlib import Path

from ..artifacts import write_json_atomic
from ..commands import get_command, quiet_libraries
from ..errors import UserError

OK, FAILED = "ok", "failed"


def finished(folder: Path, settings: dict) -> dict | None:
    """The result of an earlier run of this job with these settings that succeeded, else None."""
    f = folder / "result.json"
    if not f.is_file():
        return None
    try:
        rec = json.loads(f.read_text())
    except json.JSONDecodeError:
        return None
    return rec if rec.get("status") == OK and rec.get("settings") == settings else None


@contextlib.contextmanager
def _captured(log_file: Path):
    """stdout, stderr and every log record into ``log_file``."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    with open(log_file, "w") as log:
        handler = logging.StreamHandler(log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        root.handlers = [handler]  # logging.basicConfig in the command then adds nothing
        root.setLevel(logging.INFO)
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                yield
        finally:
            root.handlers, _ = saved
            root.setLevel(saved[1])


def _headline(summary) -> dict:
    """A command's summary (what ``--json`` prints) flattened to scalars (``a.b`` for nested,
    lists as JSON text)."""
    rec = json.loads(json.dumps(summary))  # the values --json would print (tuples as lists, keys as text)
    flat: dict = {}

    def walk(prefix: str, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        elif isinstance(value, list):
            flat[prefix[:-1]] = json.dumps(value)
        else:
            flat[prefix[:-1]] = value

    walk("", rec if isinstance(rec, dict) else {"value": rec})
    return flat


def run_job(job: dict, root: str, threads: int | None = None) -> dict:
    """Run ``job`` (a :class:`~suffix_analysis.sweep.spec.Job` as a dict) under ``root/jobs/``;
    returns its result record (also written to ``result.json``). Never raises for the
    command's own failure: the error is recorded."""
    folder = Path(root) / "jobs" / job["id"]
    folder.mkdir(parents=True, exist_ok=True)
    settings = {**job["settings"], "out": str(folder / "run"), "progress": False}
    write_json_atomic(folder / "job.json", {**job, "host": os.uname().nodename})
    if threads:
        import torch

        torch.set_num_threads(max(1, int(threads)))
    t0 = time.perf_counter()
    code, error, numbers = 0, None, {}
    before = os.getcwd()
    with _captured(folder / "job.log"):
        try:
            if job.get("cwd") and Path(job["cwd"]).is_dir():  # relative paths mean what they meant to the sweep
                os.chdir(job["cwd"])
            quiet_libraries()
            command = get_command(job["command"])
            numbers = _headline(command.run(command.build(settings)).summary())
        except UserError as e:  # the command refused its inputs, as the command line would
            error = f"suffix-analysis: error: {e}"
            logging.getLogger(__name__).error(error)
            code = 2
        except Exception as e:  # noqa: BLE001 - a job's crash is recorded, the sweep goes on
            traceback.print_exc()
            code, error = 1, f"{type(e).__name__}: {e}"
        finally:
            os.chdir(before)
    rec = {"id": job["id"], "status": OK if code == 0 else FAILED, "exit_code": code,
           "seconds": round(time.perf_counter() - t0, 3), "settings": job["settings"], "values": job["values"],
           "numbers": numbers, "error": error, "host": os.uname().nodename}
    write_json_atomic(folder / "result.json", rec)
    return rec
