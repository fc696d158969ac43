"""The direction run: the paper's pipeline as resumable stages writing into a run folder.

    RUN/run.json                the model (name, fingerprint, shape), data and config
    RUN/filter.json             train and val prompts kept by refusal score (stage 1, optional)
    RUN/candidates.safetensors  difference-in-means candidates [n_positions, n_layers, d_model] (stage 2)
    RUN/candidates.csv          bypass, induce, KL and the filter that removed it, per candidate (stage 3)
    RUN/direction.safetensors   the selected direction [d_model] (stage 4)
    RUN/direction.json          its position, layer, scores, model and data fingerprint

A stage whose artifact exists is skipped; a run folder made from another model or with
other data or settings is refused rather than mixed.
"""

from __future__ import annotations

import csv
import io
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..artifacts import write_json_atomic, write_text_atomic
from ..config import setting
from ..datasets import load_instructions
from ..errors import UserError
from ..metrics import refusal_score
from ..models.forward import run_batches
from ..models.loading import ChatModel, fingerprint_mismatch
from ..runs import RUN_FILE, digest, read_json, update_run
from ..runs import open_run as open_run_folder
from .extract import diff_in_means
from .select import CandidateScore, SelectionConfig, score_candidates, scores_table, select_direction

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DirectionConfig:
    """What a direction run uses and how it selects; defaults follow the paper."""

    harmful_train: str = setting("harmful:train", "harmful instructions the means are taken over")
    harmless_train: str = setting("harmless:train", "harmless instructions the means are taken over")
    harmful_val: str = setting("harmful:val", "harmful instructions that score the candidates")
    harmless_val: str = setting("harmless:val", "harmless instructions that score the candidates")
    n_train: int = setting(128, "instructions per train set (a seeded sample), as in the paper")
    n_val: int = setting(32, "instructions per val set")
    filter_train: bool = setting(True, "keep harmful train prompts with refusal score > 0, harmless with < 0")
    # The same for the val prompts that score candidates, as the paper's pipeline does: a
    # harmless prompt the model already refuses would count ablation's (intended) flip of its
    # first token as KL damage.
    filter_val: bool = setting(True, "filter the val prompts the same way (as the paper's pipeline)")
    seed: int = setting(0, "seed of the train/val samples")
    prune_layer_fraction: float = setting(0.2, "drop candidates in this last share of layers",
                                          flags=("--prune-layers",))
    kl_threshold: float = setting(0.1, "drop candidates whose first-token KL on harmless val exceeds this")
    induce_threshold: float = setting(0.0, "drop candidates whose induce score is below this")
    batch_size: int = setting(32, "prompts per forward pass")
    # Scoring is one ablated and one added pass per candidate: on a CPU, fewer positions
    # is the cheap way to a direction (the paper scores every EOI position).
    last_positions: int = setting(0, "candidates at the last N EOI positions only (0: every EOI position, as in "
                                     "the paper)")

    def validate(self) -> None:
        if self.n_train < 1 or self.n_val < 1 or self.batch_size < 1:
            raise UserError("n_train, n_val and batch_size must be at least 1")
        if self.last_positions < 0:
            raise UserError(f"last_positions must be 0 (all) or a number of EOI positions, got {self.last_positions}")
        if not 0 <= self.prune_layer_fraction < 1:
            raise UserError(f"prune_layer_fraction must be in [0, 1), got {self.prune_layer_fraction}")


@dataclass
class PromptSets:
    harmful_train: list[str]
    harmless_train: list[str]
    harmful_val: list[str]
    harmless_val: list[str]


def _sample(items: list[str], n: int, seed: int) -> list[str]:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items[:n]


def _save_tensor(path: Path, name: str, t: torch.Tensor, meta: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({name: t.contiguous().cpu()}, str(tmp), metadata={k: str(v) for k, v in meta.items()})
    tmp.replace(path)


def _write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    if not (path.is_file() and path.read_bytes() == buf.getvalue().encode()):  # bytes: csv ends lines in \r\n
        write_text_atomic(path, buf.getvalue())


# Run kinds whose folder holds a direction (direction.safetensors, direction.json) any
# command can load: the paper's selection and refusal direction optimization (rdo.py).
DIRECTION_KINDS = ("direction", "rdo")

# Selection thresholds only decide the last, cheap stage: a rerun may change them.
_SELECTION_ONLY = ("prune_layer_fraction", "kl_threshold", "induce_threshold", "batch_size")


def check_run_model(run: Path, cm: ChatModel, allow_other_model: bool = False) -> dict:
    """The run's record, if it was made from ``cm``'s weights; a clear error if from other
    weights, unless ``allow_other_model`` (applying one model's direction to another, e.g. a
    base and its chat model, on purpose). ``other_model`` in the returned record says which."""
    rec_path = run / RUN_FILE
    if not rec_path.is_file():
        raise UserError(f"{run} is not a direction run folder (no run.json); make one with "
                        "`suffix-analysis direction --model M --out RUN`")
    rec = read_json(rec_path, f"make the run again with `suffix-analysis direction --out {run}` in a new folder")
    if not isinstance(rec, dict) or rec.get("kind", "direction") not in DIRECTION_KINDS:
        raise UserError(f"{run} is not a direction run folder; give the --out of `suffix-analysis direction` "
                        "(or of `suffix-analysis rdo`)")
    why = fingerprint_mismatch(rec.get("fingerprint"), cm, f"run folder {run} (model '{rec.get('model')}')")
    if why and not allow_other_model:
        raise UserError(f"{why}; use that model, another --out, or --allow-other-model to apply it to this "
                        "model on purpose")
    return {**rec, "other_model": why is not None}


def _load_tensor(path: Path, name: str, remedy: str) -> torch.Tensor:
    try:
        return load_file(str(path))[name]
    except FileNotFoundError:
        raise UserError(f"{path} is missing; {remedy}") from None
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise UserError(f"{path} is not a readable safetensors file with '{name}' ({type(e).__name__}); "
                        f"{remedy}") from None


def load_direction(run: str | Path, cm: ChatModel, allow_other_model: bool = False) -> tuple[torch.Tensor, dict]:
    """The selected direction ``[d_model]`` of a run and its record, checked against ``cm``.

    The record says where the direction came from: ``run``, and ``other_model`` (true when
    it was made from other weights than ``cm``'s and ``allow_other_model`` let it through).
    """
    run = Path(run).expanduser()
    if not (run / "direction.safetensors").is_file():
        raise UserError(f"no direction.safetensors in {run}; run `suffix-analysis direction --out {run}` first")
    rec = check_run_model(run, cm, allow_other_model)
    remedy = f"select it again with `suffix-analysis direction --out {run}` (the earlier stages are kept)"
    info = read_json(run / "direction.json", remedy)
    direction = _load_tensor(run / "direction.safetensors", "direction", remedy)
    if direction.shape != (cm.d_model,):
        raise UserError(f"direction in {run} has width {tuple(direction.shape)}, the model {cm.d_model}")
    info["run"] = str(run)
    info["other_model"] = rec["other_model"]
    if info["other_model"]:
        log.warning("applying the direction of %s (made from '%s') to '%s', as asked", run, rec["model"], cm.name)
    return direction, info


def load_layer_directions(run: str | Path, cm: ChatModel) -> torch.Tensor | None:
    """The difference-in-means candidates of a direction run at its selected position, one per
    layer: ``[n_layers, d_model]`` (the selected direction is row ``layer``); ``None`` for a run
    without candidates (an RDO run)."""
    run = Path(run).expanduser()
    path = run / "candidates.safetensors"
    rec = read_json(run / RUN_FILE, f"make the direction run again with `suffix-analysis direction --out {run}`")
    if rec.get("kind", "direction") != "direction" or not path.is_file():
        return None
    info = read_json(run / "direction.json", f"select it again with `suffix-analysis direction --out {run}`")
    cands = _load_tensor(path, "candidates", f"remove it to extract again (`suffix-analysis direction --out {run}`)")
    if cands.ndim != 3 or cands.shape[1:] != (cm.n_layers, cm.d_model):
        raise UserError(f"{path} has shape {tuple(cands.shape)}, not [positions, {cm.n_layers}, {cm.d_model}] for "
                        f"this model; extract it again in a new run folder")
    return cands[cm.chat.eoi_positions[-cands.shape[0]:].index(info["position"])]


# --- the stages ---------------------------------------------------------------------------------

def sample_prompts(cfg: DirectionConfig, data_dir: str | None) -> PromptSets:
    """The seeded train and val samples; train and val must not share an instruction."""
    sets = {k: [x.instruction for x in load_instructions(getattr(cfg, k), data_dir)]
            for k in ("harmful_train", "harmless_train", "harmful_val", "harmless_val")}
    out = PromptSets(*(_sample(sets[k], cfg.n_train if k.endswith("train") else cfg.n_val, cfg.seed)
                       for k in ("harmful_train", "harmless_train", "harmful_val", "harmless_val")))
    overlap = set(out.harmful_val) & set(out.harmful_train) | set(out.harmless_val) & set(out.harmless_train)
    if overlap:
        raise UserError(f"{len(overlap)} val instructions are also train instructions; use disjoint splits")
    return out


def open_run(cm: ChatModel, out: str | Path, cfg: DirectionConfig, prompts: PromptSets) -> tuple[Path, dict]:
    """The run folder and its record; refuses a folder made from another model or with
    other data or settings (selection thresholds may change)."""
    record = {
        "model": cm.name,
        "fingerprint": cm.fingerprint(),
        "n_layers": cm.n_layers,
        "d_model": cm.d_model,
        "eoi_positions": cm.chat.eoi_positions,
        "data": digest([prompts.harmful_train, prompts.harmless_train, prompts.harmful_val, prompts.harmless_val]),
        "config": asdict(cfg),
    }
    run = Path(out).expanduser()
    record = open_run_folder(run, "direction", record, free=_SELECTION_ONLY, same_model=lambda old: fingerprint_mismatch(
        old.get("fingerprint"), cm, f"run folder {run} (model '{old.get('model')}')"))
    update_run(run, record)  # the selection thresholds of the latest run
    return run, record


def filter_prompts(cm: ChatModel, run: Path, cfg: DirectionConfig, prompts: PromptSets) -> PromptSets:
    """Stage 1: keep harmful prompts the model refuses (refusal score > 0) and harmless
    ones it does not (< 0), for train and/or val as configured."""
    if not (cfg.filter_train or cfg.filter_val):
        return prompts
    path = run / "filter.json"
    if not path.is_file():
        def kept(harmful: list[str], harmless: list[str], what: str) -> tuple[list[str], list[str]]:
            with torch.no_grad():
                sh = refusal_score(run_batches(cm, cm.chat.tokenize(harmful), cfg.batch_size), cm.refusal_ids)
                sn = refusal_score(run_batches(cm, cm.chat.tokenize(harmless), cfg.batch_size), cm.refusal_ids)
            h = [p for p, s in zip(harmful, sh.tolist()) if s > 0]
            n = [p for p, s in zip(harmless, sn.tolist()) if s < 0]
            if not h or not n:
                raise UserError(f"filtering {what} prompts by refusal score left {len(h)} harmful and {len(n)} "
                                f"harmless; does the model refuse at all? Study a model that refuses (e.g. the refusal "
                                f"organism, smollm2-135m-refusal) or pass --no-filter-{what}")
            return h, n

        record = {}
        if cfg.filter_train:
            record["harmful"], record["harmless"] = kept(prompts.harmful_train, prompts.harmless_train, "train")
        if cfg.filter_val:
            record["harmful_val"], record["harmless_val"] = kept(prompts.harmful_val, prompts.harmless_val, "val")
        write_json_atomic(path, record)
    record = read_json(path, f"remove it to filter again (`suffix-analysis direction --out {run}`)")
    out = PromptSets(**asdict(prompts))
    if cfg.filter_train:
        out.harmful_train, out.harmless_train = record["harmful"], record["harmless"]
    if cfg.filter_val:
        out.harmful_val, out.harmless_val = record["harmful_val"], record["harmless_val"]
    log.info("prompts after filtering: train %d harmful, %d harmless; val %d harmful, %d harmless",
             len(out.harmful_train), len(out.harmless_train), len(out.harmful_val), len(out.harmless_val))
    return out


def extract_candidates(cm: ChatModel, run: Path, cfg: DirectionConfig, prompts: PromptSets, fingerprint: str,
                       progress: bool) -> torch.Tensor:
    """Stage 2: difference-in-means candidates ``[n_positions, n_layers, d_model]``."""
    path = run / "candidates.safetensors"
    if not path.is_file():
        positions = cm.chat.eoi_positions[-cfg.last_positions:] if cfg.last_positions else None
        cands = diff_in_means(cm, prompts.harmful_train, prompts.harmless_train, positions=positions,
                              batch_size=cfg.batch_size, progress=progress)
        _save_tensor(path, "candidates", cands.float(), {"fingerprint": fingerprint})
    return _load_tensor(path, "candidates", f"remove it to extract again (`suffix-analysis direction --out {run}`)")


def score_all(cm: ChatModel, run: Path, cfg: DirectionConfig, prompts: PromptSets, cands: torch.Tensor,
              progress: bool) -> list[CandidateScore]:
    """Stage 3: bypass, induce and KL of every candidate -> ``candidates.csv``."""
    path = run / "candidates.csv"
    if not path.is_file():
        scores = score_candidates(cm, cands, prompts.harmful_val, prompts.harmless_val, batch_size=cfg.batch_size,
                                  progress=progress, cfg=selection_config(cfg))
        _write_csv(path, scores_table(scores))  # filtered_by is filled by selection (stage 4)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return [CandidateScore(int(r["position"]), int(r["layer"]), float(r["bypass"]), float(r["induce"]),
                                   float(r["kl"]), float(r["norm"])) for r in csv.DictReader(f)]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{path} is not a candidates table this suite wrote (truncated or edited?); remove it to "
                        f"score again (`suffix-analysis direction --out {run}`)") from None


def selection_config(cfg: DirectionConfig) -> SelectionConfig:
    return SelectionConfig(cfg.prune_layer_fraction, cfg.kl_threshold, cfg.induce_threshold, cfg.batch_size)


def select_and_save(cm: ChatModel, run: Path, cfg: DirectionConfig, cands: torch.Tensor,
                    scores: list[CandidateScore], record: dict) -> dict:
    """Stage 4: the filters and the lowest bypass score -> ``direction.safetensors``, ``direction.json``;
    ``candidates.csv`` is rewritten with the filter that removed each candidate under these thresholds."""
    try:
        best = select_direction(scores, cm.n_layers, selection_config(cfg))
    finally:  # the table names this selection's survivors (also when none survives)
        _write_csv(run / "candidates.csv", scores_table(scores))
    pi = cm.chat.eoi_positions[-cands.shape[0]:].index(best.position)
    direction = cands[pi, best.layer]
    info = {**asdict(best), "model": cm.name, "fingerprint": record["fingerprint"], "data": record["data"],
            "norm": direction.norm().item()}
    info.pop("filtered_by")
    _save_tensor(run / "direction.safetensors", "direction", direction,
                 {"position": best.position, "layer": best.layer, "fingerprint": record["fingerprint"]})
    write_json_atomic(run / "direction.json", info)
    return info


def run_direction(cm: ChatModel, out: str | Path, cfg: DirectionConfig = DirectionConfig(),
                  data_dir: str | None = None, progress: bool = True) -> dict:
    """Extract, score and select the refusal direction of ``cm`` into the run folder ``out``."""
    cfg.validate()
    prompts = sample_prompts(cfg, data_dir)
    run, record = open_run(cm, out, cfg, prompts)
    prompts = filter_prompts(cm, run, cfg, prompts)
    cands = extract_candidates(cm, run, cfg, prompts, record["fingerprint"], progress)
    scores = score_all(cm, run, cfg, prompts, cands, progress)
    return select_and_save(cm, run, cfg, cands, scores, record)


def run_prompts(cm: ChatModel, run: str | Path, data_dir: str | None = None) -> PromptSets:
    """The filtered train and val prompts of the direction run ``run``, or of the direction
    run an RDO run started from (its ``direction_run``); the run's model is checked by
    whoever loaded its direction."""
    run = Path(run).expanduser()
    remedy = f"make the direction run again with `suffix-analysis direction --out {run}`"
    rec = read_json(run / RUN_FILE, remedy)
    if rec.get("kind", "direction") == "rdo" and rec.get("direction_run"):
        run = Path(rec["direction_run"]).expanduser()
        rec = read_json(run / RUN_FILE, remedy)
    if rec.get("kind", "direction") != "direction":
        raise UserError(f"{run} is {rec.get('kind')!r} run, not a direction run; its prompts are unknown")
    cfg = DirectionConfig(**{k: v for k, v in rec.get("config", {}).items() if k in DirectionConfig.__dataclass_fields__})
    return filter_prompts(cm, run, cfg, sample_prompts(cfg, data_dir))
