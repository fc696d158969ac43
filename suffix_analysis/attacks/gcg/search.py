"""The GCG loop: gradient, sampling, filtering, scoring, and the state a checkpoint keeps."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ...artifacts import write_json_atomic
from ...errors import UserError
from ...models.forward import PrefixCache
from ...models.loading import ChatModel, fingerprint_mismatch
from ...models.placement import materialized
from ...runs import digest
from ...tables import atomic_path
from ..base import Attack, AttackResult
from ..tokens import allowed_token_mask, sample_candidates, suffix_text, survives_retokenization
from .config import FLOOR_INSTRUCTIONS, FLOOR_PROMPTS, HARMFULNESS_INSTRUCTIONS, SPEED_ONLY, GCGConfig
from .objective import GCGObjective, Harmfulness, Prompt
from .probe import ProbeSampler
from .scoring import CandidateScorer

log = logging.getLogger(__name__)
MOMENTUM_FILE = "checkpoint_momentum.safetensors"


@dataclass
class Entry:
    """A suffix and its loss."""

    loss: float
    ids: list[int]


@dataclass
class SearchState:
    """Everything a run needs to continue where it stopped (saved in ``checkpoint.json``)."""

    step: int = 0
    buffer: list[Entry] = field(default_factory=list)  # best first; plain GCG keeps one
    best: Entry = field(default_factory=lambda: Entry(float("inf"), []))  # lowest loss ever seen
    losses: list[float] = field(default_factory=list)  # buffer's best loss after each step
    suffixes: list[str] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    n_active: int = 1  # prompts optimized on so far (universal suffixes add them one by one)
    momentum: Tensor | None = None  # running one-hot gradient [suffix_len, vocab] (GCGConfig.momentum)

    @classmethod
    def from_dict(cls, d: dict) -> "SearchState":
        return cls(step=d["step"], buffer=[Entry(**b) for b in d["buffer"]], best=Entry(**d["best"]),
                   losses=d["losses"], suffixes=d["suffixes"], step_seconds=d["step_seconds"], n_active=d["n_active"])

    def to_dict(self) -> dict:
        """What ``checkpoint.json`` keeps (the momentum goes to a safetensors file beside it)."""
        d = asdict(replace(self, momentum=None))  # no deep copy of the tensor
        del d["momentum"]
        return d


def harmless_floor(cm: ChatModel, direction: Tensor, layer: int, data_dir: str | None = None) -> Tensor:
    """The direction term's floor (``GCGConfig.direction_floor``): the mean projection of
    ``FLOOR_PROMPTS`` harmless instructions of ``FLOOR_INSTRUCTIONS`` at each EOI position, ``[n_eoi]``."""
    from ...datasets import load_instructions
    from ...directions.extract import mean_projection

    harmless = [x.instruction for x in load_instructions(FLOOR_INSTRUCTIONS, data_dir)][:FLOOR_PROMPTS]
    floor = mean_projection(cm, harmless, direction, layer)
    log.info("direction term floored at the harmless mean projection (%s, %d prompts): %s", FLOOR_INSTRUCTIONS,
             len(harmless), " ".join(f"{v:.1f}" for v in floor.tolist()))
    return floor


def harmfulness_reference(cm: ChatModel, layer: int, data_dir: str | None = None) -> Harmfulness:
    """The harmfulness term's reference (``GCGConfig.harmfulness_keep``): ``FLOOR_PROMPTS``
    harmful and harmless instructions of ``HARMFULNESS_INSTRUCTIONS``, no suffix, read at
    ``blocks.{layer}.hook_resid_pre`` of the user's message's last token."""
    from ...datasets import load_instructions
    from ...directions.extract import mean_resid_pre

    pos = [-(cm.chat.n_eoi + 1)]  # the token before the EOI tokens
    means = [mean_resid_pre(cm, [x.instruction for x in load_instructions(spec, data_dir)][:FLOOR_PROMPTS], pos)
             [0, layer].float() for spec in HARMFULNESS_INSTRUCTIONS]
    diff = means[0] - means[1]
    unit = diff / diff.norm()
    ref = Harmfulness(unit, float(means[0] @ unit), float(means[1] @ unit))
    log.info("harmfulness term: layer %d, harmful %.1f, harmless %.1f (%s, %d prompts each)", layer, ref.harmful,
             ref.harmless, " vs ".join(HARMFULNESS_INSTRUCTIONS), FLOOR_PROMPTS)
    return ref


def objective_references(cfg: GCGConfig, cm: ChatModel, direction: Tensor, layer: int,
                         data_dir: str | None = None) -> dict:
    """What ``cfg``'s objective terms measure against besides the direction, as keyword
    arguments of :class:`GCG`: the direction term's harmless floor, the harmfulness term's
    reference (each only where its term is on)."""
    out = {}
    if "direction" in cfg.terms and cfg.direction_floor:
        out["direction_floor"] = harmless_floor(cm, direction, layer, data_dir)
    if "harmfulness" in cfg.terms:
        out["harmfulness"] = harmfulness_reference(cm, layer, data_dir)
    return out


def _search_settings(cfg: GCGConfig) -> dict:
    """The settings a checkpoint must share to resume: all but ``SPEED_ONLY``."""
    return {k: v for k, v in asdict(cfg).items() if k not in SPEED_ONLY}


class GCG(Attack):
    """Greedy Coordinate Gradient: a suffix for one prompt, or one universal suffix for several.

    See ``attacks/gcg/__init__.py`` for the algorithm and what makes it fast.
    """

    name = "gcg"
    config_class = GCGConfig
    uses_direction = True
    direction_terms = ("direction", "harmfulness")

    @classmethod
    def references(cls, config: GCGConfig, cm: ChatModel, direction: Tensor, layer: int,
                   data_dir: str | None = None) -> dict:
        return objective_references(config, cm, direction, layer, data_dir)

    def __init__(self, config: GCGConfig | None = None, direction: tuple[Tensor, int] | None = None,
                 direction_floor: Tensor | None = None, harmfulness: Harmfulness | None = None):
        super().__init__(config)
        self.direction = direction  # (vector [d_model], layer) for the direction objective
        self.direction_floor = direction_floor  # [n_eoi] (see GCGConfig.direction_floor)
        self.harmfulness = harmfulness  # the harmfulness term's reference, at the direction's layer

    # -- setup ----------------------------------------------------------------------------------
    def _prompts(self, cm: ChatModel, instructions: list[str], targets: list[str]) -> list[Prompt]:
        tok = cm.tokenizer
        if len(targets) != len(instructions):
            raise UserError(f"{len(instructions)} instructions but {len(targets)} targets")
        out = []
        for instr, target in zip(instructions, targets):
            if "target" in self.config.terms and not target.strip():
                raise UserError(f"empty target for instruction {instr!r}")
            before = tok(cm.chat.prefix + instr.strip(), add_special_tokens=False)["input_ids"]
            tgt = tok(target, add_special_tokens=False)["input_ids"] if target else []
            out.append(Prompt(instr.strip(), before, list(cm.chat.eoi_ids), tgt))
        return out

    def _init_ids(self, cm: ChatModel) -> list[int]:
        cfg = self.config
        tok = cm.tokenizer
        one = tok(" " + cfg.init, add_special_tokens=False)["input_ids"]
        if len(one) == 1:
            return one * cfg.suffix_len
        ids = tok(" " + " ".join([cfg.init] * cfg.suffix_len), add_special_tokens=False)["input_ids"]
        if len(ids) < cfg.suffix_len:
            raise UserError(f"initial suffix {cfg.init!r} is {len(ids)} tokens, shorter than --suffix-len "
                            f"{cfg.suffix_len}")
        return ids[: cfg.suffix_len]

    def _objective(self, cm: ChatModel) -> GCGObjective:
        cfg = self.config
        return GCGObjective(cm, cfg, self.direction, cfg.suffix_len, self.direction_floor if cfg.direction_floor else None,
                            self.harmfulness)

    @torch.no_grad()
    def loss_of(self, cm: ChatModel, instructions: list[str], targets: list[str], suffix_ids: list[int]) -> float:
        """This attack's objective, summed over every prompt, for one suffix (token ids): the
        level a control suffix (e.g. a random one of the same length) sits at."""
        if len(suffix_ids) != self.config.suffix_len:
            raise UserError(f"suffix has {len(suffix_ids)} tokens, the attack's suffix_len is {self.config.suffix_len}")
        prompts = self._prompts(cm, instructions, targets)
        for p in prompts:
            p.cache = PrefixCache(cm, p.before)
        return self._total(self._objective(cm), prompts, torch.tensor(suffix_ids)[None])[0].item()

    # -- the loop -----------------------------------------------------------------------------------
    def run(self, cm: ChatModel, instructions: list[str], targets: list[str], out: Path | None = None,
            resume: bool = False) -> AttackResult:
        impl = getattr(cm.model.config, "_attn_implementation", None)
        try:
            return self._search(cm, instructions, targets, out, resume)
        finally:  # the attention objective needs eager attention for its own passes, not for good
            if impl is not None and cm.model.config._attn_implementation != impl:
                cm.model.set_attn_implementation(impl)

    def _search(self, cm: ChatModel, instructions: list[str], targets: list[str], out: Path | None,
                resume: bool) -> AttackResult:
        cfg = self.config
        prompts = self._prompts(cm, instructions, targets)
        objective = self._objective(cm)
        scorer = CandidateScorer(objective, cfg)
        embed = cm.model.get_input_embeddings()
        allowed = allowed_token_mask(cm.tokenizer, embed.weight.shape[0], cfg.allow_non_ascii,
                                     cfg.words_only).to(cm.device)
        for p in prompts:
            p.cache = PrefixCache(cm, p.before)
        probe = ProbeSampler(cm, cfg, objective, prompts) if cfg.draft else None
        gen = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        meta = {"fingerprint": cm.fingerprint(), "config": _search_settings(cfg),
                "data": digest([instructions, targets])}
        ckpt = out / "checkpoint.json" if out else None
        if resume:
            state = self._load_checkpoint(cm, ckpt, meta, gen)
        else:
            state = SearchState(n_active=1 if cfg.progressive else len(prompts))
            ids = torch.tensor(self._init_ids(cm))
            with torch.no_grad():
                loss = self._total(objective, prompts[:state.n_active], ids[None])[0].item()
            state.buffer = [Entry(loss, ids.tolist())]
            state.best = Entry(loss, ids.tolist())
        success = False
        # A bar with an ETA while INFO is on (`-q` turns the attack's logger to WARNING).
        bar = tqdm(total=cfg.num_steps, initial=state.step, desc="GCG", unit="step",
                   disable=not log.isEnabledFor(logging.INFO))
        try:
            while state.step < cfg.num_steps:
                success = self._step(cm, objective, scorer, prompts, state, allowed, embed, gen, probe)
                bar.update(1)
                bar.set_postfix(loss=f"{state.buffer[0].loss:.3f}", prompts=f"{state.n_active}/{len(prompts)}")
                if ckpt and cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                    self._save_checkpoint(ckpt, meta, state, gen)
                if success and cfg.early_stop and state.n_active == len(prompts):
                    log.info("every target is the greedy continuation: stopping early")
                    break
                if cfg.time_limit and sum(state.step_seconds) >= cfg.time_limit:
                    log.info("time limit of %.0f s reached after %d steps", cfg.time_limit, state.step)
                    break
        except KeyboardInterrupt:
            if ckpt:
                self._save_checkpoint(ckpt, meta, state, gen)
                log.warning("interrupted at step %d; checkpoint saved, continue with --resume", state.step)
            raise
        finally:
            bar.close()
        if ckpt:
            self._save_checkpoint(ckpt, meta, state, gen)
        best_ids = state.buffer[0].ids if success else state.best.ids
        return AttackResult(
            suffix=suffix_text(cm, best_ids),
            suffix_ids=best_ids,
            losses=state.losses,
            suffixes=state.suffixes,
            step_seconds=state.step_seconds,
            success=bool(success and state.n_active == len(prompts)),
            attack=self.name,
            extra={"objective": cfg.objective, "prompts_used": state.n_active, "steps": state.step,
                   **({"probe_agreement": probe.agreement, "model_scored": probe.model_scored} if probe else {})},
        )

    def _step(self, cm: ChatModel, objective: GCGObjective, scorer: CandidateScorer, prompts: list[Prompt],
              state: SearchState, allowed: Tensor, embed, gen: torch.Generator,
              probe: ProbeSampler | None = None) -> bool:
        """One GCG step; returns whether the buffer's best suffix now works on every active prompt."""
        cfg = self.config
        t0 = time.perf_counter()
        active = prompts[: state.n_active]
        ids = torch.tensor(state.buffer[0].ids)
        grad, fulls = self._grad(cm, objective, active, ids, embed)
        if cfg.momentum:
            grad = grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            if state.momentum is not None:
                grad = cfg.momentum * state.momentum.to(grad.device) + (1 - cfg.momentum) * grad
            state.momentum = grad.clone()
        grad[:, ~allowed] = float("inf")
        cands = torch.unique(sample_candidates(ids, grad, cfg.search_width, cfg.topk, cfg.n_replace_at(state.step),
                                               gen), dim=0)
        if cfg.filter_retokenization:
            survives = survives_retokenization(cm, [p.instruction for p in active], cands)
            if survives.any():
                cands = cands[survives]
            else:
                log.warning("step %d: no candidate survives retokenization; keeping them all", state.step)
        with torch.no_grad():
            if probe is not None:
                losses, match = probe.score(scorer, active, cands, ids, fulls, state.step)
            else:
                losses, match = scorer.score(active, cands, ids, fulls)
        i = int(losses.argmin())
        if cfg.prefer_match and match is not None and match.any():
            i = int(torch.where(match, losses, torch.inf).argmin())
        self._update_buffer(state, Entry(float(losses[i]), cands[i].tolist()))
        if match is not None and state.buffer[0].ids == cands[i].tolist():
            success = bool(match[i])  # known from scoring: no extra forward pass
        else:
            with torch.no_grad():
                success = self._succeeds(objective, active, torch.tensor(state.buffer[0].ids))
        if success and state.n_active < len(prompts):
            state.n_active += 1
            log.info("step %d: suffix works on %d prompt(s); adding prompt %d", state.step, state.n_active - 1,
                     state.n_active)
            with torch.no_grad():  # the buffer's losses were for fewer prompts
                state.buffer = sorted((Entry(self._total(objective, prompts[: state.n_active],
                                                         torch.tensor(e.ids)[None])[0].item(), e.ids)
                                       for e in state.buffer), key=lambda e: e.loss)
                state.best = state.buffer[0]
            success = False
        state.step += 1
        dt = time.perf_counter() - t0
        state.losses.append(state.buffer[0].loss)
        state.suffixes.append(cm.tokenizer.decode(state.buffer[0].ids))
        state.step_seconds.append(dt)
        log.debug("step %4d  loss %.4f  %.2f s  prompts %d  %r", state.step, state.buffer[0].loss, dt,
                 state.n_active, state.suffixes[-1])
        return success

    def _total(self, objective: GCGObjective, prompts: list[Prompt], cands: Tensor) -> Tensor:
        return sum(objective.loss(p, cands)[0] for p in prompts)

    def _grad(self, cm, objective, prompts, ids, embed) -> tuple[Tensor, list[PrefixCache | None]]:
        """Gradient of the summed loss w.r.t. the one-hot suffix ``[suffix_len, vocab]``, and per
        prompt the cache of the prompt and current suffix that the pass computed on the way
        (the candidates continue from it), or None."""
        with materialized(embed):  # an offloaded embedding's weights are on meta outside a forward pass
            w = embed.weight
            one_hot = torch.zeros(ids.shape[0], w.shape[0], device=w.device, dtype=w.dtype)
            one_hot[torch.arange(ids.shape[0]), ids.to(w.device)] = 1
            one_hot.requires_grad_(True)
            emb = (one_hot @ w)[None].to(cm.device)
        caches: list = []
        logits: list = []
        loss = sum(objective.loss(p, suffix_embeds=emb, kv_out=caches, logits_out=logits)[0].sum() for p in prompts)
        (g,) = torch.autograd.grad(loss, one_hot)
        for p, lg in zip(prompts, logits):
            if lg is not None:
                objective.narrow(p, lg[0])
        fulls = [None if c is None else PrefixCache.from_cache(cm, c, p.cache.length + len(ids))
                 for p, c in zip(prompts, caches)]
        return g.float(), fulls

    def _succeeds(self, objective: GCGObjective, prompts: list[Prompt], ids: Tensor) -> bool:
        """With a target: every target is the greedy continuation. Without: no response
        starts more likely with a refusal token than without (refusal score < 0)."""
        if "target" in objective.terms:
            return all(bool(objective.loss(p, ids[None], with_match=True)[1][0]) for p in prompts)
        return all(float(objective.refusal_score(p, ids[None])[0]) < 0 for p in prompts)

    def _update_buffer(self, state: SearchState, entry: Entry) -> None:
        """Plain GCG (buffer 0) always moves to the step's best candidate; a buffer keeps the
        best N suffixes seen and grows from its best. ``best`` is the lowest loss ever seen."""
        buf = state.buffer
        if self.config.buffer_size == 0:
            buf[:] = [entry]
        elif len(buf) < self.config.buffer_size:
            buf.append(entry)
        elif entry.loss < buf[-1].loss:
            buf[-1] = entry
        buf.sort(key=lambda e: e.loss)
        if entry.loss < state.best.loss:
            state.best = entry

    # -- checkpoints --------------------------------------------------------------------------------
    def _save_checkpoint(self, path: Path, meta: dict, state: SearchState, gen: torch.Generator) -> None:
        if state.momentum is not None:
            from safetensors.torch import save_file

            with atomic_path(path.with_name(MOMENTUM_FILE)) as tmp:
                save_file({"momentum": state.momentum.float().cpu().contiguous()}, str(tmp))
        write_json_atomic(path, {**meta, "state": state.to_dict(), "rng": gen.get_state().tolist()})

    def _load_checkpoint(self, cm: ChatModel, path: Path | None, meta: dict, gen: torch.Generator) -> SearchState:
        if path is None or not path.is_file():
            raise UserError(f"nothing to resume: no checkpoint at {path}")
        try:
            ck = json.loads(path.read_text())
        except ValueError:
            raise UserError(f"checkpoint {path} is corrupted; remove it and start again") from None
        if "state" not in ck:
            raise UserError(f"checkpoint {path} was written by an older suffix-analysis; start the run again")
        why = fingerprint_mismatch(ck.get("fingerprint"), cm, f"checkpoint {path}")
        if why:
            raise UserError(f"{why}; resume with the model it was made with")
        # a setting added since the checkpoint was written counts at its default
        stored = {**_search_settings(GCGConfig()), **(ck.get("config") or {})}
        if stored != meta["config"] or ck.get("data") != meta["data"]:
            raise UserError(f"checkpoint {path} was made with another config or other instructions/targets; "
                            "resume with the same settings (only --steps and speed settings such as "
                            "--prune-after or --batch-size may change)")
        gen.set_state(torch.tensor(ck["rng"], dtype=torch.uint8))
        state = SearchState.from_dict(ck["state"])
        if self.config.momentum and state.step:
            state.momentum = _read_momentum(path.with_name(MOMENTUM_FILE))
        return state


def _read_momentum(path: Path) -> Tensor:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)["momentum"]
    except (OSError, SafetensorError, KeyError):
        raise UserError(f"{path} (the gradient momentum of the checkpoint) is missing or corrupted; "
                        "start the run again") from None
