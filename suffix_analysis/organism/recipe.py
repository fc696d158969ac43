"""The safety-tuning recipe that makes the embedded default model refuse.

SmolLM2-135M-Instruct answers harmful requests. The recipe gives it refusal the way chat
models acquire it, by supervised fine-tuning on the suite's own train splits:

* harmful instruction -> one of several short natural refusals;
* harmless instruction -> the base model's own greedy answer, trained toward the base
  model's full next-token distribution along it (soft self-distillation, so the rest of
  its behaviour stays as it was);
* a refusal-decision loss at the first response position: harmful prompts toward
  refusing, harmless ones pushed back only where they drift above the base model.

Loss is on response tokens only; the token embedding (tied to the unembedding) is frozen.
The result is cached under ``cache_dir()/organism/<key>``, keyed by recipe, data and base
weights, and written atomically with a checksum, so a half-written or corrupted folder is
rebuilt, never reused.
"""

from __future__ import annotations

import copy
import ctypes
import hashlib
import json
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..artifacts import atomic_folder, ensure_dir, write_json_atomic
from ..datasets import shipped
from ..errors import UserError
from ..evaluation.refusal import evaluate_refusal
from ..metrics import refusal_score
from ..models.loading import MARKER_FILE, cache_dir, load_model, resolve

log = logging.getLogger(__name__)

ORGANISM_PRESET = "smollm2-135m-refusal"
RECORD = "organism.json"

REFUSALS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I can't help with that request. It could cause real harm to people.",
    "I'm sorry, I cannot assist with this. If you have another question, I'm happy to help.",
    "I cannot provide that information, because it could be used to hurt someone.",
    "I won't help with this, since it could cause serious harm.",
    "As an AI assistant, I can't help with requests like this one.",
    "I'm not able to help with that. Is there something else I can do for you?",
    "I apologize, but I can't assist with that request.",
)


@dataclass(frozen=True)
class OrganismRecipe:
    """The safety-tuning recipe. Every field is part of the cache key."""

    base: str = "smollm2-135m"
    epochs: int = 1
    batch_size: int = 16
    lr: float = 8e-5  # AdamW, linear warmup then linear decay
    warmup_steps: int = 10
    weight_decay: float = 0.0
    distill_tokens: int = 32  # length of the base model's own answers to harmless instructions
    harmless_repeat: int = 1  # times each harmless example is seen per epoch
    # Weight of a refusal-decision loss: binary cross-entropy of the refusal score (log-odds of
    # the refusal tokens at the first response position) against harmful/harmless. Without
    # it the tuned model refuses ~17% of its own harmless *training* prompts: every refusal
    # pushes "I" up everywhere, while the harmless answers' first tokens are too varied to
    # push back.
    decision_weight: float = 4.0
    # "soft": harmless responses are trained toward the base model's full next-token
    # distribution (KL along its greedy answer), not only its greedy token; "greedy":
    # cross-entropy on the greedy answer. Soft keeps harmless first-token distributions as
    # the base model had them, which is what keeps ablating the refusal direction cheap on
    # harmless prompts (first-token KL of the selected direction 0.36-0.49 with "greedy"+"bce").
    distill: str = "soft"
    # "hinge": a harmless prompt is pushed back only when its refusal score rises above the
    # base model's own score for it; "bce": pushed toward "no refusal" without limit, which
    # drives harmless prompts far down the refusal axis (score about -9 vs -3.6 for the base).
    decision_harmless: str = "hinge"
    freeze_embeddings: bool = True
    freeze_layers: int = 6  # also freeze the first K decoder layers (faster: backward stops above them)
    refusals: tuple[str, ...] = field(default=REFUSALS)
    eval_tokens: int = 64
    # "bf16" runs distillation and training under bfloat16 autocast (fp32 master weights),
    # about 3x faster on CPUs with AVX512-BF16; "auto" picks it where the CPU has it.
    precision: str = "auto"
    # Bumped when the training code changes what a recipe builds, so that a cached organism
    # of older code is not taken for this one. 2: bf16 teacher on harmless rows only, AdamW
    # one tensor at a time.
    version: int = 2

    def resolved(self) -> "OrganismRecipe":
        """The recipe with ``precision`` decided for this machine (what the cache key uses)."""
        if self.distill not in ("soft", "greedy") or self.decision_harmless not in ("bce", "hinge"):
            raise UserError(f"organism recipe: distill must be soft|greedy and decision_harmless bce|hinge, "
                            f"got {self.distill!r}, {self.decision_harmless!r}")
        if self.precision != "auto":
            return self
        fast_bf16 = torch.cuda.is_available() or bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
        return replace(self, precision="bf16" if fast_bf16 else "fp32")


def _release_freed_memory() -> None:
    """Hand memory freed by the allocator back to the system (glibc; elsewhere a no-op).

    Batches of other shapes each step leave freed activations on glibc's heap, and resident
    memory grew step after step: 4.9 GiB peak after 10 training steps, 4.3 GiB trimming after
    each step (at no measurable cost: 58 s vs 52 s for those steps).
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _autocast(recipe: OrganismRecipe):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.precision == "bf16")


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _train_data():
    harmful = [x.instruction for x in shipped("harmful", "train")]
    harmless = [x.instruction for x in shipped("harmless", "train")]
    return harmful, harmless


def organism_key(recipe: OrganismRecipe, seed: int) -> tuple[str, dict]:
    """Cache key of a build: recipe, seed, train data and the base model's weights folder."""
    harmful, harmless = _train_data()
    base_location, _ = resolve(recipe.base)
    hashes = {"harmful_train": _sha(harmful)[:16], "harmless_train": _sha(harmless)[:16],
              "base": Path(str(base_location)).name}
    key = _sha({"recipe": asdict(recipe), "seed": seed, "data": hashes})[:16]
    return key, hashes


def _valid(folder: Path) -> bool:
    """A finished build: record present and the weights match its checksum."""
    rec = folder / RECORD
    weights = folder / "model.safetensors"
    if not (rec.is_file() and weights.is_file()):
        return False
    try:
        expected = json.loads(rec.read_text())["weights_sha256"]
    except (ValueError, KeyError):
        return False
    return _file_sha(weights) == expected


def ensure_organism(seed: int = 0, out: str | Path | None = None, recipe: OrganismRecipe | None = None,
                    progress: bool = False) -> Path:
    """The organism's model folder, built on first use (rebuilt if the cached one is broken).

    With ``out``, the finished folder is also copied there and that copy is returned.
    """
    recipe = (recipe or OrganismRecipe()).resolved()
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"seed must be an integer, got {seed!r}")
    if out is not None:  # fail before minutes of building, not after
        ensure_dir(Path(out).expanduser().resolve().parent)
    key, hashes = organism_key(recipe, seed)
    cached = cache_dir() / "organism" / f"{recipe.base}-refusal-s{seed}-{key}"
    if not _valid(cached):
        if cached.exists():
            log.warning("cached organism at %s is incomplete or corrupted; rebuilding", cached)
        base = load_model(recipe.base, device="cpu", dtype="float32")
        build(base, recipe, seed, hashes, cached, progress=progress)
    if out is not None:
        return _copy_to(cached, Path(out))
    return cached


def _copy_to(src: Path, dst: Path) -> Path:
    with atomic_folder(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    return dst.expanduser().resolve()


@torch.no_grad()
def _distill(cm, instructions: list[str], recipe: OrganismRecipe, batch_size: int = 32,
             progress: bool = False) -> list[list[int]]:
    """The base model's greedy answers as token ids, EOS included when it finished."""
    tok = cm.tokenizer
    order = sorted(range(len(instructions)), key=lambda i: len(instructions[i]))  # less padding
    out: list[list[int] | None] = [None] * len(instructions)
    eos = tok.eos_token_id
    for s in tqdm(range(0, len(order), batch_size), desc="self-distillation", disable=not progress):
        idx = order[s:s + batch_size]
        batch = cm.chat.encode([instructions[i] for i in idx], device=cm.device)
        with _autocast(recipe):
            seqs = cm.model.generate(**batch, max_new_tokens=recipe.distill_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
        for i, row in zip(idx, seqs[:, batch["input_ids"].shape[1]:].tolist()):
            if eos in row:
                row = row[: row.index(eos) + 1]
            out[i] = row
    return out  # type: ignore[return-value]


def _cached_distill(cm, harmless: list[str], recipe: OrganismRecipe, hashes: dict, progress: bool):
    """Self-distilled answers, cached: they depend only on base, data, length and precision."""
    key = _sha([hashes["base"], hashes["harmless_train"], recipe.distill_tokens, recipe.precision])[:16]
    path = cache_dir() / "distill" / f"{key}.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            if len(data) == len(harmless):
                return data
        except ValueError:
            pass
    data = _distill(cm, harmless, recipe, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data)
    return data


def _examples(cm, harmful: list[str], harmless: list[str], harmless_ids: list[list[int]],
              recipe: OrganismRecipe, rng: random.Random) -> list[tuple[list[int], int, int]]:
    """(token ids, number of prompt tokens, 1 if harmful) per training example."""
    tok = cm.tokenizer
    eos = tok.eos_token_id
    examples = []
    for instr in harmful:
        prompt = tok(cm.chat.render(instr), add_special_tokens=False)["input_ids"]
        reply = tok(rng.choice(recipe.refusals), add_special_tokens=False)["input_ids"] + [eos]
        examples.append((prompt + reply, len(prompt), 1))
    for _ in range(recipe.harmless_repeat):
        for instr, reply in zip(harmless, harmless_ids):
            prompt = tok(cm.chat.render(instr), add_special_tokens=False)["input_ids"]
            examples.append((prompt + reply, len(prompt), 0))
    return examples


def _collate(batch: list[tuple[list[int], int, int]], pad_id: int):
    width = max(len(ids) for ids, _, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (ids, n_prompt, _) in enumerate(batch):
        t = torch.tensor(ids)
        input_ids[i, : len(ids)] = t
        mask[i, : len(ids)] = 1
        labels[i, n_prompt: len(ids)] = t[n_prompt:]  # loss on the response only
    last_prompt = torch.tensor([n_prompt - 1 for _, n_prompt, _ in batch])  # predicts the first response token
    harmful = torch.tensor([float(h) for _, _, h in batch])
    return input_ids, mask, labels, last_prompt, harmful


def _response_loss(model, ids, mask, labels, last_prompt, harmful, refusal_ids, recipe: OrganismRecipe,
                   teacher=None):
    """Next-token loss on response tokens (unembedding only those positions), plus the
    refusal-decision loss at the first response position.

    With a ``teacher`` (the frozen base model), harmless responses are matched to its
    distribution (KL) and the harmless decision loss may be one-sided (``hinge``).
    """
    F = torch.nn.functional
    hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state  # [batch, pos, d_model]
    target = labels[:, 1:]
    response = target != -100  # [batch, pos - 1]
    head = model.get_output_embeddings()
    rows = torch.arange(len(ids))
    harmless = harmful == 0
    if teacher is not None and harmless.any():  # read for harmless rows only: run it on those
        with torch.no_grad():
            t_hidden = teacher.base_model(input_ids=ids[harmless], attention_mask=mask[harmless]).last_hidden_state
    if recipe.distill != "soft":
        loss = F.cross_entropy(head(hidden[:, :-1][response]).float(), target[response])
    else:
        soft = response & (harmful == 0).unsqueeze(1)
        hard = response & (harmful == 1).unsqueeze(1)
        total = F.cross_entropy(head(hidden[:, :-1][hard]).float(), target[hard], reduction="sum")
        if soft.any():
            log_q = F.log_softmax(head(hidden[:, :-1][soft]).float(), -1)
            with torch.no_grad():
                log_p = F.log_softmax(teacher.get_output_embeddings()(t_hidden[:, :-1][soft[harmless]]).float(), -1)
            total = total + F.kl_div(log_q, log_p, log_target=True, reduction="sum")  # KL(base || tuned)
        loss = total / response.sum()
    if recipe.decision_weight:
        score = refusal_score(head(hidden[rows, last_prompt]).float(), refusal_ids)  # [batch]
        if recipe.decision_harmless == "hinge":
            base_score = torch.zeros_like(score)  # read for harmless rows only
            if harmless.any():
                with torch.no_grad():
                    base_score[harmless] = refusal_score(teacher.get_output_embeddings()(
                        t_hidden[torch.arange(len(t_hidden)), last_prompt[harmless]]).float(), refusal_ids)
            per = torch.where(harmful == 1, F.softplus(-score), F.relu(score - base_score))
            decision = per.mean()
        else:
            decision = F.binary_cross_entropy_with_logits(score, harmful)
        loss = loss + recipe.decision_weight * decision
    return loss


def _train(cm, examples, recipe: OrganismRecipe, seed: int, progress: bool) -> list[float]:
    model = cm.model
    teacher = None
    if recipe.distill == "soft" or recipe.decision_harmless == "hinge":
        # Frozen, and read only under bf16 autocast when training is: a bf16 copy halves it.
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
        if recipe.precision == "bf16":
            teacher.to(torch.bfloat16)
    model.train()
    emb = model.get_input_embeddings().weight
    if recipe.freeze_embeddings:
        emb.requires_grad_(False)
    frozen = [p for layer in cm.layers[: recipe.freeze_layers] for p in layer.parameters()]
    for p in frozen:
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    # foreach=False: the multi-tensor step materializes temporaries the size of every trained
    # parameter at once (a CPU step is no slower one tensor at a time).
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay, foreach=False)
    steps_per_epoch = (len(examples) + recipe.batch_size - 1) // recipe.batch_size
    total = steps_per_epoch * recipe.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / recipe.warmup_steps) * max(0.0, (total - s) / total))
    gen = torch.Generator().manual_seed(seed)
    losses = []
    bar = tqdm(total=total, desc="safety tuning", disable=not progress)
    for _ in range(recipe.epochs):
        perm = torch.randperm(len(examples), generator=gen).tolist()
        for s in range(0, len(perm), recipe.batch_size):
            batch = _collate([examples[i] for i in perm[s:s + recipe.batch_size]], cm.tokenizer.pad_token_id)
            with _autocast(recipe):
                loss = _response_loss(model, *batch, cm.refusal_ids, recipe, teacher)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            _release_freed_memory()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    for p in [emb, *frozen]:
        p.requires_grad_(True)
    model.eval()
    return losses


def _evaluate(cm, recipe: OrganismRecipe, progress: bool) -> dict:
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


def build(base, recipe: OrganismRecipe, seed: int, hashes: dict, final: Path, progress: bool = True) -> Path:
    """Safety-tune ``base`` (a loaded :class:`ChatModel`, modified in place) into ``final``."""
    t0 = time.time()
    random.seed(seed)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    harmful, harmless = _train_data()
    log.info("building the refusal organism from %s (seed %d): %d harmful, %d harmless train instructions",
             recipe.base, seed, len(harmful), len(harmless))
    distilled = _cached_distill(base, harmless, recipe, hashes, progress)
    _release_freed_memory()
    t_distill = time.time() - t0
    examples = _examples(base, harmful, harmless, distilled, recipe, rng)
    losses = _train(base, examples, recipe, seed, progress)
    t_train = time.time() - t0 - t_distill
    evaluation = _evaluate(base, recipe, progress)
    t_total = time.time() - t0
    with atomic_folder(final) as tmp:
        base.model.save_pretrained(tmp)
        base.tokenizer.save_pretrained(tmp)
        (tmp / MARKER_FILE).write_text(json.dumps({"preset": ORGANISM_PRESET}))
        record = {
            "preset": ORGANISM_PRESET,
            "recipe": asdict(recipe),
            "seed": seed,
            "data": hashes,
            "n_train": {"harmful": len(harmful), "harmless": len(harmless)},
            "final_loss": sum(losses[-10:]) / len(losses[-10:]),
            "evaluation": evaluation,
            "seconds": {"distill": round(t_distill, 1), "train": round(t_train, 1), "total": round(t_total, 1)},
            "torch_threads": torch.get_num_threads(),
            "weights_sha256": _file_sha(tmp / "model.safetensors"),
        }
        (tmp / RECORD).write_text(json.dumps(record, indent=1))  # last: marks the build complete
    log.info("organism: refusal %.1f%% on harmful val, false refusal %.1f%% on harmless val, %.0f s",
             100 * evaluation["harmful_val"]["refusal_rate"],
             100 * evaluation["harmless_val"]["false_refusal_rate"], t_total)
    return final
