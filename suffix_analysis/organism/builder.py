"""``organism build``: train the recipe into a delta file, evaluate it, record what made it."""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..datasets import shipped
from ..errors import UserError
from ..evaluation.refusal import evaluate_refusal
from ..models.delta import LowRankDelta, file_sha256, load_delta, merge_delta, save_delta, state_sha256
from ..models.loading import ChatModel, load_model
from .recipe import ORGANISM_PRESET, SETTLE_FIELDS, OrganismRecipe
from .training import _cached_distill, _release_freed_memory, _sha, _train, train_data

log = logging.getLogger(__name__)


def _evaluate(cm: ChatModel, recipe: OrganismRecipe, progress: bool) -> dict:
    harmful = [x.instruction for x in shipped("harmful", "val")]
    harmless = [x.instruction for x in shipped("harmless", "val")]
    r_h = evaluate_refusal(cm, harmful, max_new_tokens=recipe.eval_tokens, batch_size=32, progress=progress)
    r_n = evaluate_refusal(cm, harmless, max_new_tokens=recipe.eval_tokens, batch_size=32, progress=progress)
    return {
        "judge": r_h.judge,
        "max_new_tokens": recipe.eval_tokens,
        "harmful_val": {"n": r_h.n, "refusal_rate": r_h.refusal_rate, "refusal_score": r_h.refusal_score},
        "harmless_val": {"n": r_n.n, "false_refusal_rate": r_n.refusal_rate, "refusal_score": r_n.refusal_score},
    }


def _start_factors(start: str | Path, recipe: OrganismRecipe, seed: int) -> dict:
    """The epochs' delta to settle from: made by this recipe's epochs, seed and base."""
    delta = load_delta(start)
    rec = delta.record()
    theirs = {k: v for k, v in (rec.get("recipe") or {}).items() if k not in SETTLE_FIELDS}
    ours = {k: v for k, v in json.loads(json.dumps(asdict(recipe))).items() if k not in SETTLE_FIELDS}
    if theirs != ours or rec.get("seed") != seed:
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise UserError(f"--start {start}: that delta was not made by this recipe's epochs (differs in "
                        f"{', '.join(diff) or 'seed'}); build without --start, or with its settings")
    if rec.get("stage", "epochs") != "epochs":
        raise UserError(f"--start {start}: that delta is already settled; start from the epochs' delta")
    return delta.factors


def build(out: str | Path, recipe: OrganismRecipe | None = None, seed: int = 0, progress: bool = True,
          evaluate: bool = True, start: str | Path | None = None) -> LowRankDelta:
    """Train the organism's delta from the recipe and write it to ``out`` (a ``.safetensors`` file).

    The delta records the recipe, seed, data hashes, the base's and the merged weights'
    SHA-256, timings and (with ``evaluate``) refusal on the shipped val splits, measured on
    the merged model as it will load (bfloat16 factors). ``start``: a delta of this recipe's
    epochs (``--settle-steps 0``), from which only the settle stage runs.
    """
    recipe = recipe or OrganismRecipe()
    recipe.validate()
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"seed must be an integer, got {seed!r}")
    out = Path(out).expanduser()
    if out.suffix != ".safetensors":
        raise UserError(f"the organism's delta is a .safetensors file; got --out {out}")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; the organism's delta is a .safetensors file")
    if out.exists():
        try:
            load_delta(out)
        except UserError:
            raise UserError(f"{out} exists and is not an organism delta written by suffix-analysis; choose another "
                            "--out, or move it away yourself to write there") from None
    start_factors = _start_factors(start, recipe, seed) if start is not None else None
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    random.seed(seed)
    torch.manual_seed(seed)
    cm = load_model(recipe.base, device="cpu", dtype="float32")
    from safetensors.torch import load_file

    base_state = load_file(str(Path(cm.location) / "model.safetensors"))  # the folder load_model resolved
    base_sha = state_sha256(base_state)
    data = train_data()
    log.info("building the refusal organism from %s (seed %d, %s): %d harmful, %d harmless, %d passage train "
             "instructions", recipe.base, seed, recipe.precision, len(data["harmful"]), len(data["harmless"]),
             len(data["passages"]))
    answers = {k: _cached_distill(cm, data[k], recipe, base_sha, progress) for k in ("harmless", "harmless_contextual")}
    _release_freed_memory()
    t_distill = time.time() - t0
    factors, losses = _train(cm, data, answers, recipe, seed, progress, start_factors)
    t_train = time.time() - t0 - t_distill
    merged = merge_delta(base_state, LowRankDelta(factors, {}), progress=progress)  # base_state is not read again
    cm.model.load_state_dict(merged, strict=False)
    meta = {
        "base": recipe.base,
        "base_sha256": base_sha,
        "merged_sha256": state_sha256(merged),
        "preset": ORGANISM_PRESET,
        "recipe": asdict(recipe),
        "seed": seed,
        "stage": "settled" if recipe.settle_steps else "epochs",
        "started_from": None if start is None else file_sha256(Path(start)),
        "data": {k: _sha(v)[:16] for k, v in data.items()},
        "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    if evaluate:
        meta["evaluation"] = _evaluate(cm, recipe, progress)
        ev = meta["evaluation"]
        log.info("organism: refusal %.1f%% on harmful val, false refusal %.1f%% on harmless val",
                 100 * ev["harmful_val"]["refusal_rate"], 100 * ev["harmless_val"]["false_refusal_rate"])
    meta["seconds"] = {"distill": round(t_distill, 1), "train": round(t_train, 1),
                       "total": round(time.time() - t0, 1)}
    save_delta(out, factors, meta)
    return load_delta(out)
