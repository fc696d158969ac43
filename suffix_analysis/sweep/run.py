"""Schedule a sweep's jobs: Ray tasks when Ray is installed (a local cluster by default, any
cluster with ``address``), else one after another in this process; then one table of every
job's headline numbers and a figure per metric.

A rerun skips jobs whose ``result.json`` says ok for the same settings and runs the rest
(failed, interrupted or new). A job that fails does not stop the others.
"""

from __future__ import annotations

import importlib.util
import logging
import time

import pandas as pd

from ..artifacts import ensure_dir, write_json_atomic
from ..errors import UserError
from ..tables import write_table
from .jobs import FAILED, OK, finished, run_job
from .spec import SweepSpec

log = logging.getLogger(__name__)


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None


def _init_ray(address: str | None, workers: int | None, cpus: float):
    import ray

    if ray.is_initialized():
        return ray
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            n = workers or None
            ray.init(num_cpus=None if n is None else n * cpus, include_dashboard=False, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        raise UserError(f"cannot reach {where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return ray


def _ray_jobs(spec: SweepSpec, todo: list, address: str | None, workers: int | None) -> list[dict]:
    ray = _init_ray(address, workers, spec.settings.cpus)
    gpus, have = spec.settings.gpus, ray.cluster_resources()
    if gpus < 0:
        gpus = 1.0 if have.get("GPU", 0) > 0 else 0.0
    for what, need in (("GPU", gpus), ("CPU", spec.settings.cpus)):
        if need > have.get(what, 0):  # Ray would wait for it forever
            raise UserError(f"each job asks for {need:g} {what}(s) ([sweep] {what.lower()}s), but the Ray cluster has "
                            f"{have.get(what, 0):g}; ask for less or add nodes")
    task = ray.remote(run_job).options(num_cpus=spec.settings.cpus, num_gpus=gpus,
                                       max_retries=spec.settings.max_retries)
    root = str(spec.out.resolve())
    pending = {task.remote(job.to_dict(), root, spec.settings.cpus): job for job in todo}
    log.info("sweep: %d job(s) on Ray (%s), %g CPU and %g GPU each", len(todo),
             address or "local cluster", spec.settings.cpus, gpus)
    results = []
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        job = pending.pop(done[0])
        try:
            rec = ray.get(done[0])
        except Exception as e:  # noqa: BLE001 - the worker died past its retries
            rec = {"id": job.id, "status": FAILED, "seconds": None, "settings": job.settings, "values": job.values,
                   "numbers": {}, "error": f"Ray: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            write_json_atomic(ensure_dir(spec.out / "jobs" / job.id) / "result.json", rec)
        log.info("sweep: %s %s (%d left)", rec["id"], rec["status"], len(pending))
        results.append(rec)
    return results


def table(spec: SweepSpec, records: dict[str, dict]) -> pd.DataFrame:
    """One row per job in grid order: ``job, status, seconds``, the grid values, the numbers, ``error``."""
    rows = []
    for job in spec.jobs:
        rec = records.get(job.id, {})
        row = {"job": job.id, "status": rec.get("status", "missing"), "seconds": rec.get("seconds")}
        row.update({k: v if not isinstance(v, (list, dict)) else str(v) for k, v in job.values.items()})
        row.update({k if k not in row else f"result.{k}": v for k, v in rec.get("numbers", {}).items()})
        row["error"] = rec.get("error")
        rows.append(row)
    return pd.DataFrame(rows)


def run_sweep(spec: SweepSpec, address: str | None = None, workers: int | None = None, local: bool = False,
              figures: bool = True) -> pd.DataFrame:
    """Run every job of ``spec`` not finished yet; returns (and writes) the table.

    ``local``: run in this process even where Ray is installed. ``workers``: how many jobs at
    once on a local Ray cluster (default: as many as its CPUs allow).
    """
    out = ensure_dir(spec.out)
    write_json_atomic(out / "sweep.json", {"source": spec.source, "command": spec.settings.command,
                                           "settings": spec.settings.__dict__, "jobs": [j.to_dict() for j in spec.jobs]})
    records: dict[str, dict] = {}
    todo = []
    for job in spec.jobs:
        rec = finished(out / "jobs" / job.id, job.settings)
        if rec is not None:
            records[job.id] = rec
        else:
            todo.append(job)
    if len(todo) < len(spec.jobs):
        log.info("sweep: %d of %d job(s) already finished, skipped", len(spec.jobs) - len(todo), len(spec.jobs))
    t0 = time.perf_counter()
    if todo:
        use_ray = ray_available() and not local
        if address and not ray_available():
            raise UserError("--address needs Ray: pip install 'suffix-analysis[cluster]' (or pip install ray)")
        if use_ray:
            done = _ray_jobs(spec, todo, address, workers)
        else:
            log.info("sweep: %d job(s) one after another in this process (%s)", len(todo),
                     "--local" if local else "Ray is not installed: pip install 'suffix-analysis[cluster]' to run "
                     "them in parallel")
            done = []
            for i, job in enumerate(todo):
                rec = run_job(job.to_dict(), str(out.resolve()))
                log.info("sweep: %s %s (%d left)", rec["id"], rec["status"], len(todo) - i - 1)
                done.append(rec)
        records.update({r["id"]: r for r in done})
    df = table(spec, records)
    write_table(out, "results", df)
    n_ok = int((df["status"] == OK).sum())
    log.info("sweep: %d ok, %d failed, %.1f s; table %s", n_ok, len(df) - n_ok, time.perf_counter() - t0,
             out / "results.csv")
    if figures:
        from ..figures.sweep import draw_sweep

        draw_sweep(df, spec.grid_keys, out / "figures")
    return df


def sweep_lines(df: pd.DataFrame, grid_keys: list[str]) -> str:
    """The table at a glance: one line per job (status, seconds, grid values, error)."""
    lines = []
    for _, r in df.iterrows():
        values = " ".join(f"{k}={r[k]}" for k in grid_keys if k in r)
        secs = "" if pd.isna(r["seconds"]) else f"{r['seconds']:.1f} s"
        err = f"  {r['error']}" if isinstance(r.get("error"), str) and r["status"] != OK else ""
        lines.append(f"{r['status']:<7} {secs:>9}  {values}{err}")
    return "\n".join(lines)
