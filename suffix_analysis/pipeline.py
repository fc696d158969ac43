"""The refusal-direction pipeline as resumable stages writing into a run folder.

    RUN/run.json                the model (name, fingerprint, shape), data and config
    RUN/filter.json             train and val prompts kept by refusal score (optional stage)
    RUN/candidates.safetensors  difference-in-means candidates [n_positions, n_layers, d_model]
    RUN/candidates.csv          bypass, induce, KL and the filter that removed it, per candidate
    RUN/direction.safetensors   the selected direction [d_model]
    RUN/direction.json          its position, layer, scores, model and data fingerprint

A stage whose artifact exists is skipped; a run folder made from another model or with
other data or settings is refused rather than mixed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .artifacts import ensure_dir, write_json_atomic, write_text_atomic
from .errors import UserError
from .models.loading import ChatModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DirectionConfig:
    harmful_train: str = "harmful:train"
    harmless_train: str = "harmless:train"
    harmful_val: str = "harmful:val"
    harmless_val: str = "harmless:val"
    n_train: int = 128  # per set, as in the paper
    n_val: int = 32
    filter_train: bool = True  # keep harmful with refusal score > 0, harmless with < 0
    # The same for the val prompts that score candidates, as the paper's pipeline does: a
    # harmless prompt the model already refuses would count ablation's (intended) flip of its
    # first token as KL damage.
    filter_val: bool = True
    seed: int = 0
    prune_layer_fraction: float = 0.2
    kl_threshold: float = 0.1
    induce_threshold: float = 0.0
    batch_size: int = 32


def _sample(items: list[str], n: int, seed: int) -> list[str]:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items[:n]


def _data_hash(*sets: list[str]) -> str:
    return hashlib.sha256(json.dumps(sets).encode()).hexdigest()[:16]


def _save_tensor(path: Path, name: str, t: torch.Tensor, meta: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({name: t.contiguous().cpu()}, str(tmp), metadata={k: str(v) for k, v in meta.items()})
    tmp.replace(path)


def _write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(path, buf.getvalue())


# Selection thresholds only decide the last, cheap stage: a rerun may change them.
_SELECTION_ONLY = ("prune_layer_fraction", "kl_threshold", "induce_threshold", "batch_size")


def _stage_settings(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _SELECTION_ONLY}


def check_run_model(run: Path, cm: ChatModel) -> dict:
    """The run's record, if it was made from ``cm``; a clear error if from another model."""
    rec_path = run / "run.json"
    if not rec_path.is_file():
        raise UserError(f"{run} is not a direction run folder (no run.json); make one with "
                        "`suffix-analysis direction --model M --out RUN`")
    rec = json.loads(rec_path.read_text())
    if rec["fingerprint"] != cm.fingerprint():
        raise UserError(f"run folder {run} was made from model '{rec['model']}' (fingerprint {rec['fingerprint']}), "
                        f"not from '{cm.name}' (fingerprint {cm.fingerprint()}); use that model or another --out")
    return rec


def load_direction(run: str | Path, cm: ChatModel) -> tuple[torch.Tensor, dict]:
    """The selected direction ``[d_model]`` of a run and its record, checked against ``cm``."""
    run = Path(run).expanduser()
    if not (run / "direction.safetensors").is_file():
        raise UserError(f"no direction.safetensors in {run}; run `suffix-analysis direction --out {run}` first")
    check_run_model(run, cm)
    info = json.loads((run / "direction.json").read_text())
    direction = load_file(str(run / "direction.safetensors"))["direction"]
    if direction.shape != (cm.d_model,):
        raise UserError(f"direction in {run} has width {tuple(direction.shape)}, the model {cm.d_model}")
    return direction, info


def run_direction(cm: ChatModel, out: str | Path, cfg: DirectionConfig = DirectionConfig(),
                  data_dir: str | None = None, progress: bool = True) -> dict:
    """Extract, score and select the refusal direction of ``cm`` into the run folder ``out``."""
    from .datasets import load_instructions
    from .directions.extract import diff_in_means
    from .directions.select import SelectionConfig, score_candidates, scores_table, select_direction
    from .evaluation.refusal import refusal_score
    from .models.forward import run_batches

    run = ensure_dir(out)
    sets = {k: [x.instruction for x in load_instructions(getattr(cfg, k), data_dir)]
            for k in ("harmful_train", "harmless_train", "harmful_val", "harmless_val")}
    harmful_train = _sample(sets["harmful_train"], cfg.n_train, cfg.seed)
    harmless_train = _sample(sets["harmless_train"], cfg.n_train, cfg.seed)
    harmful_val = _sample(sets["harmful_val"], cfg.n_val, cfg.seed)
    harmless_val = _sample(sets["harmless_val"], cfg.n_val, cfg.seed)
    overlap = set(harmful_val) & set(harmful_train) | set(harmless_val) & set(harmless_train)
    if overlap:
        raise UserError(f"{len(overlap)} val instructions are also train instructions; use disjoint splits")
    record = {
        "model": cm.name,
        "fingerprint": cm.fingerprint(),
        "n_layers": cm.n_layers,
        "d_model": cm.d_model,
        "eoi_positions": cm.chat.eoi_positions,
        "data": _data_hash(harmful_train, harmless_train, harmful_val, harmless_val),
        "config": asdict(cfg),
    }
    rec_path = run / "run.json"
    if rec_path.is_file():
        old = json.loads(rec_path.read_text())
        check_run_model(run, cm)
        if old.get("data") != record["data"] or _stage_settings(old.get("config", {})) != _stage_settings(record["config"]):
            raise UserError(f"run folder {run} was made with other data or settings; use another --out")
    write_json_atomic(rec_path, record)  # the selection thresholds of the latest run

    # Stage 1: keep train (and val) prompts the model treats as the paper expects.
    filt_path = run / "filter.json"
    if (cfg.filter_train or cfg.filter_val) and not filt_path.is_file():
        def kept(harmful: list[str], harmless: list[str], what: str) -> tuple[list[str], list[str]]:
            with torch.no_grad():
                sh = refusal_score(run_batches(cm, cm.chat.tokenize(harmful), cfg.batch_size), cm.refusal_ids)
                sn = refusal_score(run_batches(cm, cm.chat.tokenize(harmless), cfg.batch_size), cm.refusal_ids)
            h = [p for p, s in zip(harmful, sh.tolist()) if s > 0]
            n = [p for p, s in zip(harmless, sn.tolist()) if s < 0]
            if not h or not n:
                raise UserError(f"filtering {what} prompts by refusal score left {len(h)} harmful and {len(n)} "
                                f"harmless; does the model refuse at all? (--no-filter-{what})")
            return h, n

        record_kept = {}
        if cfg.filter_train:
            record_kept["harmful"], record_kept["harmless"] = kept(harmful_train, harmless_train, "train")
        if cfg.filter_val:
            record_kept["harmful_val"], record_kept["harmless_val"] = kept(harmful_val, harmless_val, "val")
        write_json_atomic(filt_path, record_kept)
    if cfg.filter_train or cfg.filter_val:
        record_kept = json.loads(filt_path.read_text())
        if cfg.filter_train:
            harmful_train, harmless_train = record_kept["harmful"], record_kept["harmless"]
        if cfg.filter_val:
            harmful_val, harmless_val = record_kept["harmful_val"], record_kept["harmless_val"]
        log.info("prompts after filtering: train %d harmful, %d harmless; val %d harmful, %d harmless",
                 len(harmful_train), len(harmless_train), len(harmful_val), len(harmless_val))

    # Stage 2: difference-in-means candidates.
    cand_path = run / "candidates.safetensors"
    if not cand_path.is_file():
        cands = diff_in_means(cm, harmful_train, harmless_train, batch_size=cfg.batch_size, progress=progress)
        _save_tensor(cand_path, "candidates", cands.float(), {"fingerprint": record["fingerprint"]})
    cands = load_file(str(cand_path))["candidates"]

    # Stage 3: score every candidate.
    csv_path = run / "candidates.csv"
    sel_cfg = SelectionConfig(cfg.prune_layer_fraction, cfg.kl_threshold, cfg.induce_threshold, cfg.batch_size)
    if not csv_path.is_file():
        scores = score_candidates(cm, cands, harmful_val, harmless_val, batch_size=cfg.batch_size, progress=progress)
        try:
            select_direction(scores, cm.n_layers, sel_cfg)  # fills filtered_by
        finally:
            _write_csv(csv_path, scores_table(scores))
    from .directions.select import CandidateScore

    with open(csv_path, newline="") as f:
        scores = [CandidateScore(int(r["position"]), int(r["layer"]), float(r["bypass"]), float(r["induce"]),
                                 float(r["kl"]), float(r["norm"])) for r in csv.DictReader(f)]

    # Stage 4: select.
    best = select_direction(scores, cm.n_layers, sel_cfg)
    pi = cm.chat.eoi_positions[-cands.shape[0]:].index(best.position)
    direction = cands[pi, best.layer]
    info = {**asdict(best), "model": cm.name, "fingerprint": record["fingerprint"], "data": record["data"],
            "norm": direction.norm().item()}
    info.pop("filtered_by")
    _save_tensor(run / "direction.safetensors", "direction", direction, {"position": best.position,
                                                                         "layer": best.layer,
                                                                         "fingerprint": record["fingerprint"]})
    write_json_atomic(run / "direction.json", info)
    return info
