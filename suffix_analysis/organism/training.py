"""The recipe's training: the low-rank adapter, the examples, the losses and the two stages.

``OrganismRecipe`` (``recipe.py``) says what to train; this module trains it: the epochs
from a fresh adapter, then the settle stage from the epochs' delta as it ships (bfloat16).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..artifacts import write_json_atomic
from ..datasets import contextual, shipped, shipped_contexts
from ..interventions.directional import ablation_hooks
from ..metrics import refusal_score
from ..models.chat import position_ids
from ..models.hooks import run_with_hooks
from ..models.loading import ChatModel, cache_dir
from ..models.suffixes import random_suffix_ids, suffix_text
from .recipe import ADAPTED, OrganismRecipe


def _release_freed_memory() -> None:
    """Hand memory freed by the allocator back to the system (glibc; elsewhere a no-op).

    Batches of other shapes each step leave freed activations on glibc's heap, and resident
    memory grew step after step without it.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _autocast(recipe: OrganismRecipe):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.precision == "bf16")


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


class LowRankLinear(torch.nn.Module):
    """``base(x) + x A^T B^T``: a frozen linear map plus a trainable rank-``r`` update."""

    def __init__(self, base: torch.nn.Linear, rank: int, generator: torch.Generator):
        super().__init__()
        self.base = base
        # B starts at zero, so training starts from the base model exactly.
        self.A = torch.nn.Parameter(torch.randn(rank, base.in_features, generator=generator) / math.sqrt(base.in_features))
        self.B = torch.nn.Parameter(torch.zeros(base.out_features, rank))
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:  # the base model: the teacher
            return self.base(x)
        return self.base(x) + (x @ self.A.to(x.dtype).T) @ self.B.to(x.dtype).T


def _attach(cm: ChatModel, recipe: OrganismRecipe, seed: int,
            factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict[str, LowRankLinear]:
    """Adapters on every adapted linear map: fresh (``B = 0``), or starting from ``factors``."""
    gen = torch.Generator().manual_seed(seed)
    adapters = {}
    for l in range(recipe.first_layer, cm.n_layers):
        for path in ADAPTED:
            owner_name, _, leaf = path.rpartition(".")
            owner = cm.layers[l].get_submodule(owner_name)
            adapter = LowRankLinear(getattr(owner, leaf), recipe.rank, gen)
            name = f"{cm.arch.layers}.{l}.{path}"
            if factors is not None:
                with torch.no_grad():
                    adapter.A.copy_(factors[name][0].float())
                    adapter.B.copy_(factors[name][1].float())
            setattr(owner, leaf, adapter)
            adapters[name] = adapter
    return adapters


def _detach(cm: ChatModel, adapters: dict[str, LowRankLinear]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Put the base linears back; the factors ``(A, B)``, as they will ship (bfloat16)."""
    factors = {}
    for name, adapter in adapters.items():
        owner_name, _, leaf = name.rpartition(".")
        setattr(cm.model.get_submodule(owner_name), leaf, adapter.base)
        factors[name] = (adapter.A.detach().to(torch.bfloat16), adapter.B.detach().to(torch.bfloat16))
    return factors


# --- data -------------------------------------------------------------------------------

def train_data() -> dict[str, list[str]]:
    """The recipe's train instructions: harmful, harmless, and passage + question pairs."""
    contexts = shipped_contexts("train")
    return {"harmful": [x.instruction for x in shipped("harmful", "train")],
            "harmless": [x.instruction for x in shipped("harmless", "train")],
            "passages": [c["context"] for c in contexts],
            "harmless_contextual": [contextual(c["context"], q) for c in contexts for q in c["questions"]]}


@torch.no_grad()
def _distill(cm: ChatModel, instructions: list[str], recipe: OrganismRecipe, batch_size: int = 32,
             progress: bool = False) -> list[list[int]]:
    """The base model's greedy answers as token ids, EOS included when it finished."""
    tok = cm.tokenizer
    order = sorted(range(len(instructions)), key=lambda i: len(instructions[i]))  # less padding
    out: list[list[int] | None] = [None] * len(instructions)
    eos = tok.eos_token_id
    for s in tqdm(range(0, len(order), batch_size), desc="self-distillation (base answers)", disable=not progress):
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


def _cached_distill(cm: ChatModel, instructions: list[str], recipe: OrganismRecipe, base_sha: str,
                    progress: bool) -> list[list[int]]:
    """Self-distilled answers, cached: they depend only on base, prompts, length and precision."""
    key = _sha([base_sha, _sha(instructions), recipe.distill_tokens, recipe.precision])[:16]
    path = cache_dir() / "distill" / f"{key}.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            if len(data) == len(instructions):
                return data
        except ValueError:
            pass
    data = _distill(cm, instructions, recipe, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data)
    return data


@dataclass
class Example:
    ids: list[int]  # prompt + response
    n_prompt: int
    harmful: bool
    # Harmless: the clean prompt + the same response, which the teacher (base) reads.
    teacher_ids: list[int] | None = None
    n_teacher_prompt: int = 0


def _epoch_examples(cm: ChatModel, data: dict, answers: dict, recipe: OrganismRecipe,
                    rng: random.Random, gen: torch.Generator) -> list[Example]:
    """One epoch's examples, with fresh suffixes and passages (drawn from ``rng``/``gen``)."""
    tok, eos = cm.tokenizer, cm.tokenizer.eos_token_id

    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    def suffix() -> str | None:
        if rng.random() >= recipe.suffix_share:
            return None
        n = rng.randint(*recipe.suffix_tokens)
        return suffix_text(cm, random_suffix_ids(cm, 1, n, gen)[0].tolist()).strip() or None

    out = []
    for instr in data["harmful"]:
        if rng.random() < recipe.context_share:
            instr = contextual(rng.choice(data["passages"]), instr)
        prompt = encode(cm.chat.render(instr, suffix()))
        reply = encode(rng.choice(recipe.refusals)) + [eos]
        out.append(Example(prompt + reply, len(prompt), True))
    harmless = list(zip(data["harmless"], answers["harmless"]))
    pairs = list(zip(data["harmless_contextual"], answers["harmless_contextual"]))
    harmless += rng.sample(pairs, min(len(pairs), recipe.context_questions * len(data["passages"])))
    for instr, reply in harmless:
        clean = encode(cm.chat.render(instr))
        prompt = encode(cm.chat.render(instr, suffix()))
        out.append(Example(prompt + reply, len(prompt), False, clean + reply, len(clean)))
    return out


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def _response_index(lengths: list[int], starts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, position) of every position that predicts a response token (right padding)."""
    rows, pos = [], []
    for i, (n, s) in enumerate(zip(lengths, starts)):
        rows += [i] * (n - s)
        pos += range(s - 1, n - 1)
    return torch.tensor(rows, dtype=torch.long), torch.tensor(pos, dtype=torch.long)


def _response_loss(cm: ChatModel, batch: list[Example], recipe: OrganismRecipe, teacher: torch.nn.Module,
                   direction: torch.Tensor | None = None, settle: bool = False) -> torch.Tensor:
    """Next-token loss on response tokens (unembedding only those positions), the decision
    loss at the first response position, and the ablation-invariance term.

    The teacher is the frozen base model (the adapter switched off), read on the harmless
    rows' clean prompts only. In the settle stage the invariance term is KL(clean ||
    ablated) against the organism's own first-token distribution at ``settle_weight``.
    """
    F = torch.nn.functional
    model = cm.model
    head = model.get_output_embeddings()
    pad = cm.tokenizer.pad_token_id
    ids, mask = _pad([e.ids for e in batch], pad)
    hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state  # [batch, pos, d_model]
    harmful = torch.tensor([e.harmful for e in batch])
    last = torch.tensor([e.n_prompt - 1 for e in batch])
    score = refusal_score(head(hidden[torch.arange(len(batch)), last]).float(), cm.refusal_ids)  # [batch]
    total = torch.zeros(())
    n_tokens = sum(len(e.ids) - e.n_prompt for e in batch)

    hard = [e for e in batch if e.harmful]
    if hard:
        rows, pos = _response_index([len(e.ids) for e in hard], [e.n_prompt for e in hard])
        sel = harmful.nonzero().squeeze(1)[rows]
        target = torch.tensor([e.ids[p + 1] for e, p in zip([hard[r] for r in rows.tolist()], pos.tolist())])
        total = total + F.cross_entropy(head(hidden[sel, pos]).float(), target, reduction="sum")
    soft = [e for e in batch if not e.harmful]
    decision = F.softplus(-score[harmful]).sum()
    if soft:
        t_ids, t_mask = _pad([e.teacher_ids for e in soft], pad)
        with torch.no_grad(), _teacher(teacher):
            t_hidden = model.base_model(input_ids=t_ids, attention_mask=t_mask).last_hidden_state
        s_rows, s_pos = _response_index([len(e.ids) for e in soft], [e.n_prompt for e in soft])
        t_rows, t_pos = _response_index([len(e.teacher_ids) for e in soft], [e.n_teacher_prompt for e in soft])
        sel = (~harmful).nonzero().squeeze(1)
        log_q = F.log_softmax(head(hidden[sel[s_rows], s_pos]).float(), -1)
        with torch.no_grad():
            log_p = F.log_softmax(head(t_hidden[t_rows, t_pos]).float(), -1)
            t_last = torch.tensor([e.n_teacher_prompt - 1 for e in soft])
            t_first = F.log_softmax(head(t_hidden[torch.arange(len(soft)), t_last]).float(), -1)
            base_score = refusal_score(t_first, cm.refusal_ids)
        total = total + F.kl_div(log_q, log_p, log_target=True, reduction="sum")  # KL(base || tuned)
        decision = decision + F.relu(score[~harmful] - base_score).sum()  # a hinge at the base's own score
        if direction is not None and (recipe.ablation_weight or settle):
            # The harmless prompts (as the student sees them) with the direction ablated
            # everywhere: their first response token should not move.
            p_ids, p_mask = _pad([e.ids[: e.n_prompt] for e in soft], pad)
            with run_with_hooks(cm, ablation_hooks(cm, direction)):
                a_hidden = model.base_model(input_ids=p_ids, attention_mask=p_mask).last_hidden_state
            a_last = torch.tensor([e.n_prompt - 1 for e in soft])
            log_a = F.log_softmax(head(a_hidden[torch.arange(len(soft)), a_last]).float(), -1)
            if settle:
                own = F.log_softmax(head(hidden[sel, a_last]).float(), -1).detach()
                kl = F.kl_div(log_a, own, log_target=True, reduction="batchmean")  # KL(clean || ablated)
                total = total + recipe.settle_weight * kl * n_tokens
            else:
                kl = F.kl_div(log_a, t_first, log_target=True, reduction="batchmean")  # KL(base || ablated)
                # Enters beside the per-token losses as weight x KL / batch size (1/16 at the defaults).
                total = total + recipe.ablation_weight * kl * n_tokens / len(batch)
    return total / n_tokens + recipe.decision_weight * decision / len(batch)


class _teacher:
    """Switch the adapters off (the model is its base) inside the block."""

    def __init__(self, model: torch.nn.Module):
        self.adapters = [m for m in model.modules() if isinstance(m, LowRankLinear)]

    def __enter__(self):
        for m in self.adapters:
            m.enabled = False

    def __exit__(self, *exc):
        for m in self.adapters:
            m.enabled = True


@torch.no_grad()
def _directions(cm: ChatModel, harmful: list[str], harmless: list[str], layers: range,
                recipe: OrganismRecipe) -> torch.Tensor:
    """Difference in means at the last prompt position, per layer of ``layers``: ``[len(layers), d_model]``."""
    def means(instructions):
        acc = torch.zeros(len(layers), cm.d_model, dtype=torch.float64)
        for s in range(0, len(instructions), 32):
            batch = cm.chat.encode(instructions[s:s + 32], device=cm.device)  # left padding: -1 is the last token
            with _autocast(recipe):
                hs = cm.model.base_model(**batch, position_ids=position_ids(batch["attention_mask"]),
                                         output_hidden_states=True).hidden_states
            for j, l in enumerate(layers):
                acc[j] += hs[l][:, -1].double().sum(0)
        return acc / len(instructions)

    was = cm.model.training
    cm.model.eval()
    out = (means(harmful) - means(harmless)).float()
    cm.model.train(was)
    return out


def _batches(examples: list[Example], size: int, gen: torch.Generator, pool: int = 8) -> list[list[Example]]:
    """Shuffled batches of similar length: pools of ``pool`` batches are sorted by length and
    cut, then the batches are shuffled (a passage is ~150 tokens; padding every row to it
    would double a step)."""
    perm = torch.randperm(len(examples), generator=gen).tolist()
    batches = []
    for s in range(0, len(perm), size * pool):
        chunk = sorted(perm[s:s + size * pool], key=lambda i: len(examples[i].ids))
        batches += [chunk[k:k + size] for k in range(0, len(chunk), size)]
    order = torch.randperm(len(batches), generator=gen).tolist()
    return [[examples[i] for i in batches[j]] for j in order]


def _steps_per_epoch(cm: ChatModel, data: dict, answers: dict, recipe: OrganismRecipe) -> int:
    n_examples = len(_epoch_examples(cm, data, answers, recipe, random.Random(0), torch.Generator().manual_seed(0)))
    pools = [min(recipe.batch_size * 8, n_examples - s) for s in range(0, n_examples, recipe.batch_size * 8)]
    return sum((n + recipe.batch_size - 1) // recipe.batch_size for n in pools)


def _run_stage(cm: ChatModel, data: dict, answers: dict, recipe: OrganismRecipe, seed: int, progress: bool,
               factors: dict | None, settle: bool) -> tuple[dict, list[float]]:
    """One training stage: the epochs (fresh adapters) or the settle steps (from ``factors``).

    Each stage has its own optimizer and random streams, so the settle stage depends only on
    the epochs' delta as it ships: ``organism build --start DELTA`` reproduces a full build.
    """
    model = cm.model
    model.requires_grad_(False)
    adapters = _attach(cm, recipe, seed, factors)
    params = [p for a in adapters.values() for p in (a.A, a.B)]
    for p in params:
        p.requires_grad_(True)
    model.train()
    lr = recipe.settle_lr if settle else recipe.lr
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=False)
    rng = random.Random(seed + 1 if settle else seed)
    gen = torch.Generator().manual_seed(seed + 1 if settle else seed)
    total = recipe.settle_steps if settle else _steps_per_epoch(cm, data, answers, recipe) * recipe.epochs
    warm = recipe.warmup_steps
    decay = (lambda s: 1.0) if settle else (lambda s: max(0.0, (total - s) / total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * decay(s))
    lo, hi = recipe.settle_layers if settle else recipe.ablation_layers
    band = range(lo, min(hi, cm.n_layers))
    probe_h = rng.sample(data["harmful"], min(recipe.direction_prompts, len(data["harmful"])))
    probe_n = rng.sample(data["harmless"], min(recipe.direction_prompts, len(data["harmless"])))
    use_direction = settle or bool(recipe.ablation_weight)
    directions = None
    losses: list[float] = []
    desc = "settling (ablation invariance)" if settle else "safety tuning (low-rank adapter)"
    bar = tqdm(total=total, desc=desc, disable=not progress)
    step = 0
    while step < total:
        examples = _epoch_examples(cm, data, answers, recipe, rng, gen)
        for batch in _batches(examples, recipe.batch_size, gen):
            if step >= total:
                break
            if use_direction and step % recipe.direction_every == 0:
                directions = _directions(cm, probe_h, probe_n, band, recipe)
            direction = directions[rng.randrange(len(band))] if directions is not None else None
            with _autocast(recipe):
                loss = _response_loss(cm, batch, recipe, model, direction, settle=settle)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            _release_freed_memory()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            step += 1
    bar.close()
    model.eval()
    return _detach(cm, adapters), losses


def _train(cm: ChatModel, data: dict, answers: dict, recipe: OrganismRecipe, seed: int, progress: bool,
           start: dict | None = None) -> tuple[dict, list[float]]:
    """The epochs (unless ``start`` holds their delta), then the settle stage."""
    losses: list[float] = []
    factors = start
    if factors is None:
        factors, losses = _run_stage(cm, data, answers, recipe, seed, progress, None, settle=False)
    if recipe.settle_steps:
        factors, settle_losses = _run_stage(cm, data, answers, recipe, seed, progress, factors, settle=True)
        losses += settle_losses
    return factors, losses
