"""One job: one suffix-analysis command, run in the calling process, into its own folder.

    jobs/<id>/job.json     what runs (written first)
    jobs/<id>/run/         the command's own run folder (--out)
    jobs/<id>/stdout.txt   what it printed; its last line is the command's --json summary
    jobs/<id>/job.log      its log and errors
    jobs/<id>/result.json  status, seconds, headline numbers, error (written last: a job is
                           finished exactly when this file says "ok")
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
import traceback
from pathlib import Path

from ..artifacts import write_json_atomic

OK, FAILED = "ok", "failed"


def finished(folder: Path, argv: list[str]) -> dict | None:
    """The result of an earlier run of this job with these flags that succeeded, else None."""
    f = folder / "result.json"
    if not f.is_file():
        return None
    try:
        rec = json.loads(f.read_text())
    except json.JSONDecodeError:
        return None
    return rec if rec.get("status") == OK and rec.get("argv") == argv else None


@contextlib.contextmanager
def _captured(log_file: Path):
    """stdout into a buffer; stderr and every log record into ``log_file``."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    out = io.StringIO()
    with open(log_file, "w") as log:
        handler = logging.StreamHandler(log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        root.handlers = [handler]  # logging.basicConfig in the command then adds nothing
        root.setLevel(logging.INFO)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(log):
                yield out
        finally:
            root.handlers, _ = saved
            root.setLevel(saved[1])


def _headline(stdout: str) -> dict:
    """The command's --json summary (its last line), flattened to scalars (``a.b`` for nested)."""
    lines = [l for l in stdout.splitlines() if l.strip()]
    try:
        rec = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        return {}
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
    from ..cli import main

    folder = Path(root) / "jobs" / job["id"]
    folder.mkdir(parents=True, exist_ok=True)
    argv = [*job["command"], *job["argv"], "--out", str(folder / "run"), "--json"]
    write_json_atomic(folder / "job.json", {**job, "full_argv": ["suffix-analysis", *argv], "host": os.uname().nodename})
    if threads:
        import torch

        torch.set_num_threads(max(1, int(threads)))
    t0 = time.perf_counter()
    error = None
    before = os.getcwd()
    with _captured(folder / "job.log") as out:
        try:
            if job.get("cwd") and Path(job["cwd"]).is_dir():  # relative paths mean what they meant to the sweep
                os.chdir(job["cwd"])
            code = main(argv)
        except SystemExit as e:  # argparse rejected a flag
            code = 0 if e.code is None else e.code if isinstance(e.code, int) else 2
        except Exception as e:  # noqa: BLE001 - a job's crash is recorded, the sweep goes on
            traceback.print_exc()
            code, error = 1, f"{type(e).__name__}: {e}"
        finally:
            os.chdir(before)
    stdout = out.getvalue()
    (folder / "stdout.txt").write_text(stdout)
    if code and error is None:
        lines = [l for l in (folder / "job.log").read_text().splitlines() if l.strip()]
        error = next((l for l in reversed(lines) if l.startswith("suffix-analysis: error:")),
                     next((l for l in reversed(lines) if "error" in l.lower()), lines[-1] if lines else f"exit code {code}"))
    rec = {"id": job["id"], "status": OK if code == 0 else FAILED, "exit_code": code,
           "seconds": round(time.perf_counter() - t0, 3), "argv": job["argv"], "values": job["values"],
           "numbers": _headline(stdout) if code == 0 else {}, "error": error, "host": os.uname().nodename}
    write_json_atomic(folder / "result.json", rec)
    return rec
