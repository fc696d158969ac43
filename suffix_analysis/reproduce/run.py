"""``reproduce``: every stage in order, each cached in ``RUN/<stage>/`` and resumable.

A stage is done when its ``stage.json`` is there; it records the stage's inputs (the
settings that change what it computes, the keys of the stages it reads) and their hash, its
wall time and its headline numbers. A rerun skips a done stage whose inputs are the current
ones (a setting added to the suite since counts as unchanged at its default), resumes
an unfinished one (GCG from its checkpoint, a direction or attribution run from the
sub-steps it finished), and refuses one made with other settings: ``redo`` names the
stages to compute again (with every stage after them).

Outputs besides the stage folders: ``config.toml`` (every setting, resolved),
``run.json`` (model, fingerprint, evaluation sets), ``stages.json`` (wall times),
``summary.json`` (every stage's headline numbers), ``figures/`` and ``report.md``.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from ..artifacts import ensure_dir, write_json_atomic, write_text_atomic
from ..errors import UserError
from ..models.presets import PRESETS
from ..runs import open_run
from .config import ReproduceConfig, to_toml
from .report import HEADLINES, write_report
from .stages import STAGE_NAMES, STAGES, Context, stage_record

log = logging.getLogger(__name__)


def is_organism(model: str) -> bool:
    p = PRESETS.get(model)
    return bool(p and p.source.startswith("organism:"))


def _skipped(name: str, ctx: Context) -> str | None:
    """Why stage ``name`` does not run for this model and config (None: it runs)."""
    if name == "organism" and not is_organism(ctx.model):
        return f"{ctx.model} is not the organism preset"
    if name == "attribution" and not ctx.config.attribution.enabled:
        return "[attribution] enabled = false"
    if name == "defence" and not ctx.config.defence.enabled:
        return "[defence] enabled = false"
    return None


def _open(out: Path, model: str) -> dict:
    """The reproduce run in ``out`` (new, or of ``model``); stages check their own inputs."""
    def same_model(old: dict) -> str | None:
        return None if old.get("model") == model else f"{out} is a reproduce run of {old.get('model')}, not {model}"

    return open_run(out, "reproduce", {"model": model}, same_model=same_model)


def _clear(out: Path, redo: Sequence[str]) -> None:
    bad = [r for r in redo if r not in STAGE_NAMES]
    if bad:
        raise UserError(f"unknown stage '{bad[0]}' to redo; stages are {', '.join(STAGE_NAMES)}")
    if not redo:
        return
    first = min(STAGE_NAMES.index(r) for r in redo)
    for name in STAGE_NAMES[first:]:
        if (out / name).exists():
            log.info("redo: removing %s", out / name)
            shutil.rmtree(out / name)


def reproduce(model: str, out: str | Path, config: ReproduceConfig, device: str = "auto", dtype: str = "auto",
              data_dir: str | None = None, progress: bool = True, redo: Sequence[str] = (), cm=None,
              figures: bool = True, placement=None) -> dict:
    """Run (or resume) every stage of ``config`` on ``model`` into ``out``; returns the summary.

    ``cm``: an already loaded :class:`~suffix_analysis.models.loading.ChatModel` for ``model``
    (tests pass a tiny random one). ``placement``: a device map etc. for loading it
    (:class:`~suffix_analysis.models.placement.Placement`). ``redo``: stages to compute again, with those after them.
    """
    config.validate()
    out = Path(out).expanduser()
    old = _open(out, model)  # before --redo removes anything: only a reproduce run's own stage folders go
    _clear(out, redo)
    ctx = Context(out=out, config=config, model=model, device=device, dtype=dtype, placement=placement,
                  data_dir=data_dir, progress=progress, cm=cm)
    sets = ctx.eval_sets()  # bad data fails before any model loads
    write_text_atomic(out / "config.toml", to_toml(config))
    meta = {"kind": old["kind"], "suite": old["suite"], "model": model, "profile": config.profile,
            "eval": {"harmful_eval": config.run.harmful_eval, "harmless_eval": config.run.harmless_eval,
                     "n_harmful": len(sets["harmful"]), "n_harmless": len(sets["harmless"]),
                     "harmful_removed": sets["harmful_removed"], "harmless_removed": sets["harmless_removed"],
                     "hash": sets["hash"]}}
    write_json_atomic(out / "eval_sets.json", {"harmful": sets["harmful"], "harmless": sets["harmless"]})
    meta["fingerprint"] = old.get("fingerprint")
    write_json_atomic(out / "run.json", meta)

    times, summaries = {}, {}
    runnable = [s for s in STAGES if _skipped(s.name, ctx) is None]
    for stage in STAGES:
        why = _skipped(stage.name, ctx)
        if why:
            log.info("stage %s: skipped (%s)", stage.name, why)
            times[stage.name] = {"status": "skipped", "why": why}
            continue
        n = runnable.index(stage) + 1
        folder = out / stage.name
        key = stage.key(ctx)
        rec = stage_record(folder)
        if rec is not None and stage.matches(rec, ctx):
            ctx.keys[stage.name] = rec["key"]  # the later stages were keyed on the recorded one
            log.info("stage %d/%d %s: done before (%.0f s), skipped", n, len(runnable), stage.name, rec["seconds"])
            times[stage.name] = {"status": "cached", "seconds": rec["seconds"]}
            summaries[stage.name] = rec["summary"]
            continue
        if rec is not None:
            raise UserError(f"{folder} was made with other settings or inputs; rerun with --redo {stage.name} "
                            "(it and every stage after it are computed again) or choose another --out")
        ctx.keys[stage.name] = key
        log.info("stage %d/%d %s", n, len(runnable), stage.name)
        ensure_dir(folder)
        t0 = time.perf_counter()
        summary = stage.fn(ctx, folder)
        seconds = round(time.perf_counter() - t0, 2)
        if meta["fingerprint"] is None and ctx.cm is not None:
            meta["fingerprint"] = ctx.cm.fingerprint()
            write_json_atomic(out / "run.json", meta)
        elif ctx.cm is not None and meta["fingerprint"] != ctx.cm.fingerprint():
            raise UserError(f"{out} was made from other weights of {model}; choose another --out")
        write_json_atomic(folder / "stage.json", {"key": key, "inputs": stage.inputs(ctx), "seconds": seconds,
                                                  "summary": summary,
                                                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        times[stage.name] = {"status": "ran", "seconds": seconds}
        summaries[stage.name] = summary
        log.info("stage %s: %.1f s", stage.name, seconds)

    summary = {"model": model, "fingerprint": meta["fingerprint"], "profile": config.profile,
               "n_eval_harmful": len(sets["harmful"]), "n_eval_harmless": len(sets["harmless"])}
    for name in STAGE_NAMES:
        summary.update(summaries.get(name, {}))
    write_json_atomic(out / "stages.json", times)
    write_json_atomic(out / "summary.json", summary)
    if figures:
        from ..figures import draw_all

        draw_all(out)
    write_report(out, summary, times, config)
    return summary




def summary_lines(summary: dict, times: dict) -> str:
    """The one-screen table at the end of ``reproduce``."""
    def f(v):
        return "n/a" if v is None else f"{v:.1%}" if isinstance(v, float) else str(v)

    lines = [f"model {summary['model']}  (profile {summary['profile']}, {summary['n_eval_harmful']} harmful / "
             f"{summary['n_eval_harmless']} harmless held-out instructions)"]
    if "layer" in summary:
        lines.append(f"direction: layer {summary['layer']}, EOI position {summary['position']}, "
                     f"KL {summary['kl']:.3f}")
    lines += [f"  {label:38s} {f(summary.get(key))}" for key, label in HEADLINES]
    att = summary.get("attribution")
    if att:
        cos = att.get("cosine", {})
        lines.append(f"  {'cosine at the direction layer':38s} harmful {cos.get('harmful', 0):.3f}  "
                     f"+random {cos.get('random', 0):.3f}  +adversarial {cos.get('adversarial', 0):.3f}  "
                     f"harmless {cos.get('harmless', 0):.3f}")
    lines.append("stage seconds: " + "  ".join(
        f"{k} {v['seconds']:.0f}" + (" (cached)" if v["status"] == "cached" else "")
        for k, v in times.items() if "seconds" in v))
    return "\n".join(lines)
