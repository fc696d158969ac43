"""The attribution run: every measurement of this package, in order, as resumable stages.

    OUT/run.json                   model fingerprint, direction (layer, position, hash), suffix, data,
                                   config, and the seconds each stage took
    OUT/conditions.json            the prompts: harmful, harmful + random suffix (n_random draws),
                                   harmful + adversarial suffix, harmless                      (stage 1)
    OUT/cosine.csv                 cosine with the direction, hook_resid_pre/post, every layer and EOI
                                   position, per prompt and condition                          (stage 2)
    OUT/harmfulness.csv            projection on the harmfulness direction (harmful - harmless means) at
                                   the last token of the user's message, every layer          (stage 2b)
    OUT/heads.csv, top_heads.json  direct attribution per head (and bias, MLP, embedding, and the measured
                                   residual stream), EOI positions; the head ranking           (stage 3)
    OUT/hijack.csv                 attention mass, share, head dominance, projection per region, head,
                                   layer and EOI position; hijack_dominance.csv per layer       (stage 4)
    OUT/suffix_tokens.csv          per adversarial-suffix token: replace, block, gradient x input;
                                   suffix_token_agreement.csv, their rank agreement            (stage 5)
    OUT/patching.csv               top-k heads patched harmful <-> adversarial: share restored (stage 6)
    OUT/knockout.csv               refusal score with EOI -> suffix attention knocked out: all layers,
                                   top heads, each band of layers                               (stage 7)
    OUT/knockout_completions.json  with a judge: greedy answers, harmful, adversarial, and adversarial
                                   under the all-layer knockout, each judged                   (stage 7b)
    OUT/summary.json               the headline numbers (:func:`summary_table` prints them)    (stage 8)

Tables are tidy (one row per prompt x layer x head x ... x condition), CSV or, when large
and pyarrow is there, Parquet (``tables.py``), each written atomically. A stage whose
outputs exist is skipped, so an interrupted run resumes where it stopped; a folder made from
another model, direction, suffix, data or config is refused (use another ``--out``).

This module runs the stages in order (:data:`STAGES`, :func:`run_attribution`); the settings
are in ``config``, the inputs check and ``run.json`` in ``record``, the stages in ``stages``
and ``summary.json`` in ``summary``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from ..artifacts import write_json_atomic
from ..models.loading import ChatModel
from ..runs import Stage
from ..tables import table_path
from .config import AttributionConfig
from .record import (
    Judge,
    _check_inputs,
    _load_conditions,
    _read,
    _Run,
    data_hash,
    direction_hash,
    open_run,
    recorded_config,
)
from .stages import (
    knockout_restoration,
    stage_conditions,
    stage_cosine,
    stage_generation,
    stage_harmfulness,
    stage_heads,
    stage_hijack,
    stage_knockout,
    stage_patching,
    stage_suffix_tokens,
)
from .summary import build_summary, summary_table
from .writers import n_heads

# What other modules import from here (the rest lives in config, record, stages, summary).
__all__ = ["STAGES", "AttributionConfig", "Judge", "build_summary", "knockout_restoration", "run_attribution",
           "summary_table"]

log = logging.getLogger(__name__)


def _exists(out: Path, output: str) -> bool:
    """An output: a file by its name (``.json``) or a table by its name (CSV or parquet)."""
    return (out / output).is_file() if output.endswith(".json") else table_path(out, output) is not None


# In order; outputs are tables by name, other files with their extension.
STAGES: tuple[Stage, ...] = (
    Stage("conditions", stage_conditions, ("conditions.json",), _exists),
    Stage("cosine", stage_cosine, ("cosine",), _exists),
    Stage("harmfulness", stage_harmfulness, ("harmfulness",), _exists),
    Stage("heads", stage_heads, ("heads", "top_heads.json"), _exists),
    Stage("hijack", stage_hijack, ("hijack", "hijack_dominance"), _exists),
    Stage("suffix_tokens", stage_suffix_tokens, ("suffix_tokens", "suffix_token_agreement", "suffix_attention"), _exists),
    Stage("patching", stage_patching, ("patching",), _exists),
    Stage("knockout", stage_knockout, ("knockout",), _exists),
    Stage("generation", stage_generation, ("knockout_completions.json",), _exists),
)


# --- the run ----------------------------------------------------------------------------------------

def run_attribution(
    cm: ChatModel,
    direction: Tensor,
    layer: int,
    position: int,
    harmful: Sequence[str],
    harmless: Sequence[str],
    suffix: str,
    out: str | Path,
    config: AttributionConfig = AttributionConfig(),  # noqa: B008 (frozen: a shared default is safe)
    judge: Judge | None = None,
    progress: bool = True,
) -> dict:
    """Every attribution stage for ``direction`` ``[d_model]`` (read at
    ``blocks.{layer}.hook_resid_pre``, EOI ``position``) and the adversarial ``suffix``, into the
    run folder ``out``; returns the summary (also ``out/summary.json``).

    ``judge(instructions, completions) -> [refused]`` decides the generated-answer refusal
    rate under knockout; without one that part is skipped and the summary says so. Inputs
    are checked before anything is written; stages whose outputs exist are skipped.
    """
    out = Path(out).expanduser()
    harmful, harmless = _check_inputs(cm, direction, layer, position, harmful, harmless, suffix, config)
    direction = direction.detach()
    record = {
        "model": cm.name, "fingerprint": cm.fingerprint(), "n_layers": cm.n_layers, "d_model": cm.d_model,
        "n_heads": n_heads(cm), "eoi_positions": cm.chat.eoi_positions,
        "direction": {"layer": int(layer), "position": int(position), "hash": direction_hash(direction)},
        "suffix": suffix, "data": data_hash(harmful, harmless), "n_harmful": len(harmful),
        "n_harmless": len(harmless), "config": recorded_config(config), "stages": {},
    }
    record = open_run(cm, out, record)
    run = _Run(cm, direction, int(layer), int(position), harmful, harmless, suffix, out, config, judge, progress,
               record)
    ran = False
    for stage in STAGES:
        name = stage.name
        if name == "suffix_tokens" and not config.token_effects:
            log.info("stage %s: off (token_effects)", name)
            continue
        if name == "generation" and judge is None:
            if not stage.done(out):
                log.info("stage %s: no judge given, answers under knockout not generated", name)
            continue
        if stage.done(out):
            log.info("stage %s: done before, skipped", name)
        else:
            t0 = time.perf_counter()
            stage.run(run)
            record.setdefault("stages", {})[name] = round(time.perf_counter() - t0, 3)
            write_json_atomic(out / "run.json", record)
            log.info("stage %s: %.1f s", name, record["stages"][name])
            ran = True
        if name == "conditions":
            run.conditions = _load_conditions(out)
    summary_path = out / "summary.json"
    if ran or not summary_path.is_file():
        summary = build_summary(out, record)
        write_json_atomic(summary_path, summary)
        return summary
    log.info("stage summary: done before, skipped")
    return _read(out, "summary.json")
