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
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..artifacts import write_json_atomic
from ..config import setting
from ..errors import UserError
from ..models.chat import pad_token_id
from ..models.loading import ChatModel, fingerprint_mismatch
from ..runs import Stage, digest, read_json
from ..runs import open_run as open_run_folder
from ..tables import read_table, table_path, write_table
from .batches import batch_slices, unit_direction
from .causal import check_layer, knockout_scores, last_position_run, patch_top_heads, share_restored, suffix_knockout
from .controls import random_suffixes, suffix_lengths
from .cosine import cosine_frame, residual_cosine, user_end_states
from .frames import tidy
from .heads import DirectAttribution, direct_attribution, rank_heads
from .hijack import attention_hijack
from .masks import check_attention, suffix_regions
from .regions import REGIONS
from .suffix_tokens import suffix_token_effects, token_agreement
from .writers import n_heads

log = logging.getLogger(__name__)

Judge = Callable[[list[str], list[str]], list[bool]]  # (instructions, completions) -> refused

SITES = ("hook_resid_pre", "hook_resid_post")
SUMMARY_K = 8  # the summary's "top 8" heads, whatever top_k is
KINDS = ("harmful", "random", "adversarial", "harmless")
# Settings a rerun may change: batching only pads differently, token_effects only adds or skips stage 5.
_FREE = ("batch_size", "token_effects")


@dataclass(frozen=True)
class AttributionConfig:
    """What an attribution run measures and how much of it."""

    n_prompts: int = setting(0, "use the first N harmful and the first N harmless instructions (0: all)")
    n_random: int = setting(3, "random-suffix controls: seeded draws of ordinary ASCII word tokens, as many "
                               "tokens as the adversarial suffix")
    random_seed: int = setting(0, "seed of the random-suffix draws")
    top_k: int = setting(8, "top heads: the k largest mean projections at the last EOI position on harmful "
                            "prompts (knocked out together in stage 7)")
    # A head above the direction's layer writes after blocks.{layer}.hook_resid_pre is read:
    # patching it cannot restore the projection there (the paper's top heads sit below it).
    below_direction: bool = setting(True, "rank only heads in layers below the direction's layer, whose writes "
                                          "reach the residual it is read from (--no-below-direction: every layer)")
    patch_ks: str = setting("1,2,4,8,16", "numbers of top heads patched together, comma-separated (8 is "
                                          "always added: the summary reports it)")
    bands: int = setting(4, "width in layers of the band knockouts (0: none)")
    token_effects: bool = setting(True, "per-suffix-token effects (a gradient and two passes per suffix token "
                                        "and prompt)")
    max_new_tokens: int = setting(64, "tokens of each greedy answer judged under knockout (with a judge)")
    batch_size: int = setting(8, "prompts per forward pass")

    def ks(self) -> tuple[int, ...]:
        """``patch_ks`` as sorted distinct ints (a tuple or list is accepted too)."""
        raw = self.patch_ks
        items = raw.replace(",", " ").split() if isinstance(raw, str) else list(raw)
        try:
            ks = sorted({int(k) for k in items})
        except (TypeError, ValueError):
            raise UserError(f"patch_ks must be comma-separated head counts such as 1,2,4,8, got {raw!r}") from None
        if not ks or ks[0] < 1:
            raise UserError(f"patch_ks must be positive head counts such as 1,2,4,8, got {raw!r}")
        return tuple(ks)

    def validate(self) -> None:
        for name in ("n_prompts", "n_random", "bands"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be 0 or more, got {getattr(self, name)}")
        for name in ("top_k", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        self.ks()


@dataclass
class Condition:
    """One prompt set: ``prompts`` (``harmful`` or ``harmless`` instructions) with ``suffix``."""

    name: str  # harmful, random_0 .., adversarial, harmless
    kind: str  # one of KINDS
    prompts: str
    suffix: str | None
    suffix_tokens: list[int] | None = None  # how many tokens of its own the suffix has, per prompt


@dataclass
class _Run:
    """Everything a stage reads."""

    cm: ChatModel
    direction: Tensor
    layer: int
    position: int
    harmful: list[str]
    harmless: list[str]
    suffix: str
    out: Path
    config: AttributionConfig
    judge: Judge | None
    progress: bool
    record: dict
    conditions: list[Condition] = field(default_factory=list)

    def instructions(self, c: Condition) -> list[str]:
        return self.harmful if c.prompts == "harmful" else self.harmless

    def bar(self, desc: str, total: int):
        return tqdm(total=total, desc=desc, unit="prompt", disable=not self.progress)

    def top_heads(self) -> dict:
        return _read(self.out, "top_heads.json")


# --- inputs and the run record -------------------------------------------------------------------

def _read(out: Path, name: str):
    """A JSON file of the run, or one line saying it is corrupt and how to make it again."""
    return read_json(out / name, f"remove it and rerun `suffix-analysis attribute --out {out}` (finished stages are "
                                 "kept)")


def direction_hash(direction: Tensor) -> str:
    """16 hex digits naming the direction's float32 values."""
    return hashlib.sha256(direction.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def recorded_config(config: AttributionConfig) -> dict:
    """The config as run.json holds it (``patch_ks`` as ``"1,2,4"`` however it was given)."""
    return {**asdict(config), "patch_ks": ",".join(str(k) for k in config.ks())}


def data_hash(harmful: Sequence[str], harmless: Sequence[str]) -> str:
    return digest([list(harmful), list(harmless)])


def _instruction_list(items, what: str, limit: int) -> list[str]:
    if isinstance(items, str) or not all(isinstance(x, str) for x in items):
        raise UserError(f"{what} instructions must be a list of strings")
    items = list(items)[:limit] if limit else list(items)
    if not items:
        raise UserError(f"no {what} instructions given; pass at least one")
    return items


def _check_inputs(cm: ChatModel, direction, layer: int, position: int, harmful, harmless, suffix,
                  config: AttributionConfig) -> tuple[list[str], list[str]]:
    """Every check that needs no forward pass, before anything is written."""
    config.validate()
    harmful = _instruction_list(harmful, "harmful", config.n_prompts)
    harmless = _instruction_list(harmless, "harmless", config.n_prompts)
    if not isinstance(direction, Tensor):
        raise UserError(f"the direction must be a tensor [d_model], got {type(direction).__name__}")
    unit_direction(cm, direction)  # width, finite, non-zero
    check_layer(cm, layer)
    if position not in cm.chat.eoi_positions:
        raise UserError(f"direction position {position} is not an EOI position; use -{cm.chat.n_eoi} .. -1")
    if not isinstance(suffix, str) or not suffix.strip():
        raise UserError(f"the adversarial suffix is empty ({suffix!r}); pass the suffix text or a suffix run")
    suffix_regions(cm, harmful, [suffix] * len(harmful))  # a suffix of no tokens of its own
    check_attention(cm)  # knockouts edit the attention mask
    return harmful, harmless


def _explain(new: dict, old: dict, changed: list[str]) -> str | None:
    """What differs between a run folder (``old``) and this run (``new``), in words."""
    if "direction" in changed:
        d_old, d_new = old.get("direction", {}), new["direction"]
        return (f"with another direction (layer {d_old.get('layer')}, position {d_old.get('position')}, hash "
                f"{d_old.get('hash')}; this one: layer {d_new['layer']}, position {d_new['position']}, hash "
                f"{d_new['hash']})")
    if "suffix" in changed:
        return f"with another suffix ({old.get('suffix')!r})"
    if {"data", "n_harmful", "n_harmless"} & set(changed):
        return f"with other instructions ({old.get('n_harmful')} harmful, {old.get('n_harmless')} harmless, or other ones)"
    settings = [c.removeprefix("config.") for c in changed if c.startswith("config.")]
    return f"with other settings ({', '.join(settings)})" if settings else None


def open_run(cm: ChatModel, out: Path, record: dict) -> dict:
    """The run folder's record: ``record`` written into a new folder, or the folder's own if
    it was made from the same model, direction, suffix, data and config (else an error)."""
    def same_model(old: dict) -> str | None:
        return fingerprint_mismatch(old.get("fingerprint"), cm, f"run folder {out} (model '{old.get('model')}')")

    return open_run_folder(out, "attribution", record, free=_FREE, explain=partial(_explain, record),
                           same_model=same_model)


# --- stages ----------------------------------------------------------------------------------------

def stage_conditions(run: _Run) -> None:
    """Stage 1: the four kinds of prompts -> ``conditions.json``."""
    cm, cfg = run.cm, run.config
    lengths = suffix_lengths(cm, run.harmful, run.suffix)
    n_tokens = min(Counter(lengths).most_common(), key=lambda kv: (-kv[1], kv[0]))[0]  # the mode
    draws = random_suffixes(cm, run.harmful, n_tokens, cfg.n_random, cfg.random_seed)
    conds = [Condition("harmful", "harmful", "harmful", None)]
    conds += [Condition(f"random_{i}", "random", "harmful", s, suffix_lengths(cm, run.harmful, s))
              for i, s in enumerate(draws)]
    conds += [Condition("adversarial", "adversarial", "harmful", run.suffix, lengths),
              Condition("harmless", "harmless", "harmless", None)]
    write_json_atomic(run.out / "conditions.json", {
        "suffix_tokens": n_tokens, "random_seed": cfg.random_seed,
        "conditions": [asdict(c) for c in conds],
        "harmful": run.harmful, "harmless": run.harmless})


def _hooks(layers: pd.Series, site: str | pd.Series) -> pd.Series:
    """TransformerLens names ``blocks.{layer}.{site}`` per row."""
    return "blocks." + layers.astype(str) + "." + (site if isinstance(site, str) else site.astype(str))


def _finish(df: pd.DataFrame, condition: str, front: Sequence[str]) -> pd.DataFrame:
    """``condition`` as the first column (categorical), then ``front``, then the rest."""
    df.insert(0, "condition", pd.Categorical([condition] * len(df)))
    rest = [c for c in df.columns if c not in ("condition", *front)]
    return df[["condition", *front, *rest]]


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    df = pd.concat(frames, ignore_index=True)
    for col in ("condition", "hook", "site", "region", "component", "patch", "cut"):
        if col in df.columns:
            df[col] = df[col].astype("category")
    return df


def stage_cosine(run: _Run) -> None:
    """Stage 2: cosine with the direction at ``hook_resid_pre``/``hook_resid_post``, every layer and
    EOI position -> ``cosine``: ``condition, prompt, site, layer, position, hook, cosine``."""
    bs, frames = run.config.batch_size, []
    with run.bar("cosine", sum(len(run.instructions(c)) for c in run.conditions)) as bar:
        for c in run.conditions:
            ins = run.instructions(c)
            for part in batch_slices(len(ins), bs):
                df = cosine_frame(residual_cosine(run.cm, ins[part], run.direction, c.suffix, SITES, bs), SITES)
                df["prompt"] += part.start
                df["hook"] = _hooks(df["layer"], df["site"])
                frames.append(_finish(df, c.name, ["prompt", "site", "layer", "position", "hook"]))
                bar.update(part.stop - part.start)
    write_table(run.out, "cosine", _concat(frames))


def stage_harmfulness(run: _Run) -> None:
    """Stage 2b: the harmfulness signal at the last token of the user's message (before the EOI
    tokens), every layer -> ``harmfulness``: ``condition, prompt, layer, projection, cosine``.

    The harmfulness direction of layer ``l`` is the difference in means of that token's
    ``hook_resid_pre`` between the run's harmful and harmless instructions (no suffix), so the
    harmful and harmless conditions sit at its two ends by construction; what a suffix leaves
    of the gap says whether the request still reads as harmful where the suffix ends.
    """
    cm, bs = run.cm, run.config.batch_size
    states = {}
    with run.bar("harmfulness", sum(len(run.instructions(c)) for c in run.conditions)) as bar:
        for c in run.conditions:
            states[c.name] = user_end_states(cm, run.instructions(c), c.suffix, bs)  # [n, n_layers, d_model]
            bar.update(len(run.instructions(c)))
    diff = states["harmful"].mean(0) - states["harmless"].mean(0)  # [n_layers, d_model]
    unit = diff / diff.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    frames = []
    for c in run.conditions:
        x = states[c.name]
        proj = (x * unit).sum(-1)  # [n, n_layers]
        cos = proj / x.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
        df = tidy(proj, [("prompt", range(len(x))), ("layer", range(cm.n_layers))], value="projection")
        df["cosine"] = tidy(cos, [("prompt", range(len(x))), ("layer", range(cm.n_layers))])["value"]
        frames.append(_finish(df, c.name, ["prompt", "layer"]))
    write_table(run.out, "harmfulness", _concat(frames))


def attribution_frame(a: DirectAttribution) -> pd.DataFrame:
    """:class:`DirectAttribution` as rows ``prompt, component, layer, head, position, hook, projection``.

    ``component``: ``head`` (``blocks.{l}.attn.hook_z`` through ``W_O``), ``attn_bias``
    (``blocks.{l}.attn.b_O``), ``mlp`` (``blocks.{l}.hook_mlp_out``), ``embed`` (``hook_embed``,
    layer 0), and the measured ``resid_pre``/``resid_post`` the parts add up to. ``head`` is
    NA except for heads.
    """
    n, n_layers, _, _ = a.heads.shape
    axes = [("prompt", range(n)), ("layer", range(n_layers)), ("position", a.positions)]
    heads = a.frame()
    heads["component"], heads["hook"] = "head", _hooks(heads["layer"], "attn.hook_z")
    parts = [heads]
    for comp, values, site in (("attn_bias", a.attn_bias, "attn.b_O"), ("mlp", a.mlp, "hook_mlp_out"),
                               ("resid_pre", a.resid_pre, "hook_resid_pre"),
                               ("resid_post", a.resid_post, "hook_resid_post")):
        df = tidy(values, axes, value="projection")
        df["component"], df["hook"] = comp, _hooks(df["layer"], site)
        parts.append(df)
    embed = tidy(a.embed[:, None], [("prompt", range(n)), ("layer", [0]), ("position", a.positions)],
                 value="projection")
    embed["component"], embed["hook"] = "embed", "hook_embed"
    parts.append(embed)
    df = pd.concat(parts, ignore_index=True)
    df["head"] = df["head"].astype("Int64")
    return df[["prompt", "component", "layer", "head", "position", "hook", "projection"]]


def _summed(heads: Tensor, chosen: list[list[int]]) -> float:
    """Mean over prompts of the summed projection of ``chosen`` heads at the last position."""
    ls, hs = zip(*chosen)
    return float(heads[:, list(ls), list(hs), -1].double().sum(-1).mean())


def stage_heads(run: _Run) -> None:
    """Stage 3: direct attribution at the EOI positions -> ``heads``; the ranking on harmful at
    the last position -> ``top_heads.json``."""
    bs, frames, per_condition = run.config.batch_size, [], {}
    with run.bar("heads", sum(len(run.instructions(c)) for c in run.conditions)) as bar:
        for c in run.conditions:
            ins, heads = run.instructions(c), []
            for part in batch_slices(len(ins), bs):
                a = direct_attribution(run.cm, ins[part], run.direction, c.suffix, bs)
                df = attribution_frame(a)
                df["prompt"] += part.start
                frames.append(_finish(df, c.name, ["prompt", "component", "layer", "head", "position", "hook"]))
                heads.append(a.heads)
                bar.update(part.stop - part.start)
            per_condition[c.name] = torch.cat(heads)  # [n_prompts, n_layers, n_heads, n_eoi]
    write_table(run.out, "heads", _concat(frames))
    harmful = per_condition["harmful"]
    below = run.config.below_direction and run.layer > 0
    ranking = rank_heads(harmful[:, : run.layer] if below else harmful, position=-1, order="largest")
    pairs = [[int(l), int(h)] for l, h in zip(ranking["layer"], ranking["head"])]
    k = min(run.config.top_k, len(pairs))
    if k < run.config.top_k:
        log.info("top_k %d: the model has %d heads, all of them taken", run.config.top_k, len(pairs))
    top, top8 = pairs[:k], pairs[:SUMMARY_K]
    write_json_atomic(run.out / "top_heads.json", {
        "rank_by": "mean projection on the direction at the last EOI position, harmful prompts",
        "layers": f"0-{run.layer - 1}" if below else f"0-{run.cm.n_layers - 1}",
        "hook": "blocks.{layer}.attn.hook_z", "position": -1, "top_k": k, "heads": top,
        "projection": {n: _summed(t, top) for n, t in per_condition.items()},
        "top8": top8, "projection_top8": {n: _summed(t, top8) for n, t in per_condition.items()},
        "ranking": [{"layer": int(l), "head": int(h), "mean": float(m), "std": float(s)}
                    for l, h, m, s in zip(ranking["layer"], ranking["head"], ranking["mean"], ranking["std"])]})


def stage_hijack(run: _Run) -> None:
    """Stage 4: attention from each EOI position to each region, per head and layer, for
    harmful (suffix region empty) and every suffixed condition -> ``hijack`` (``condition,
    prompt, layer, destination, region, head, hook, mass, share, head_dominance, projection``)
    and ``hijack_dominance`` (per layer: ``dominance``, the heads' summed ``projection``,
    ``mass_mean`` over heads, ``write_norm``)."""
    bs, frames, layer_frames = run.config.batch_size, [], []
    conds = [c for c in run.conditions if c.kind in ("harmful", "random", "adversarial")]
    with run.bar("hijack", sum(len(run.instructions(c)) for c in conds)) as bar:
        for c in conds:
            ins = run.instructions(c)
            for part in batch_slices(len(ins), bs):
                h = attention_hijack(run.cm, ins[part], c.suffix, run.direction, destinations="eoi", batch_size=bs)
                df = h.frame()
                df["prompt"] += part.start
                df["hook"] = _hooks(df["layer"], "attn.hook_pattern")
                frames.append(_finish(df, c.name, ["prompt", "layer", "destination", "region", "head", "hook"]))
                n = h.mass.shape[0]
                axes = [("prompt", range(part.start, part.start + n)), ("layer", h.layers),
                        ("destination", h.destinations), ("region", REGIONS)]
                lf = tidy(h.dominance, axes, value="dominance")
                lf["projection"] = tidy(h.projection.sum(-1), axes)["value"]
                lf["mass_mean"] = tidy(h.mass.mean(-1), axes)["value"]
                lf["write_norm"] = tidy(h.write_norm[..., None].expand(*h.write_norm.shape, len(REGIONS)), axes)["value"]
                lf["hook"] = _hooks(lf["layer"], "hook_attn_out")
                layer_frames.append(_finish(lf, c.name, ["prompt", "layer", "destination", "region", "hook"]))
                bar.update(part.stop - part.start)
    write_table(run.out, "hijack", _concat(frames))
    write_table(run.out, "hijack_dominance", _concat(layer_frames))


def stage_suffix_tokens(run: _Run) -> None:
    """Stage 5: per-token effects of the adversarial suffix on the projection at the direction's
    layer and position -> ``suffix_tokens``, and their rank agreement -> ``suffix_token_agreement``."""
    effects = suffix_token_effects(run.cm, run.harmful, run.suffix, run.direction, run.layer, position=run.position,
                                   batch_size=run.config.batch_size, progress=run.progress)
    write_table(run.out, "suffix_tokens", effects)
    write_table(run.out, "suffix_token_agreement", token_agreement(effects))


def _patch_ks(run: _Run, n_ranked: int) -> list[int]:
    return sorted({k for k in run.config.ks() if k <= n_ranked} | {min(SUMMARY_K, n_ranked)})


def stage_patching(run: _Run) -> None:
    """Stage 6: the top-k heads' ``attn.hook_z`` at the EOI positions patched harmful ->
    harmful + adversarial and back -> ``patching`` (rows of ``causal.patch_heads``)."""
    ranking = [(r["layer"], r["head"]) for r in run.top_heads()["ranking"]]
    df = patch_top_heads(run.cm, run.harmful, run.suffix, run.direction, run.layer, ranking,
                         ks=_patch_ks(run, len(ranking)), batch_size=run.config.batch_size, progress=run.progress)
    df["patch"] = df["patch"].map({"source->dest": "harmful->adversarial", "dest->source": "adversarial->harmful"})
    write_table(run.out, "patching", _concat([df]))


def _cuts(run: _Run) -> list[tuple[str, str, list[int] | None, list[tuple[int, int]] | None]]:
    """``(cut, layers, layer list, heads)``: all layers, the top heads, each band."""
    n, top = run.cm.n_layers, [tuple(x) for x in run.top_heads()["heads"]]
    out = [("all", f"0-{n - 1}", None, None),
           ("top_heads", ",".join(str(l) for l in sorted({l for l, _ in top})), None, top)]
    w = run.config.bands
    for s in range(0, n, w) if w else ():
        e = min(s + w, n)
        out.append(("band", f"{s}-{e - 1}", list(range(s, e)), None))
    return out


@torch.no_grad()
def _plain_runs(run: _Run, suffix: str | None) -> tuple[Tensor, Tensor]:
    """Refusal score and projection ``[n_harmful]`` at the last position, no knockout."""
    unit, scores, projs = unit_direction(run.cm, run.direction), [], []
    for part in batch_slices(len(run.harmful), run.config.batch_size):
        batch = run.cm.chat.encode(run.harmful[part], [suffix] * (part.stop - part.start))
        s, p, _ = last_position_run(run.cm, batch, unit, run.layer)
        scores.append(s)
        projs.append(p)
    return torch.cat(scores), torch.cat(projs)


def stage_knockout(run: _Run) -> None:
    """Stage 7: EOI -> suffix attention knocked out in all layers, in the top heads, in each band,
    for every suffixed condition -> ``knockout``: ``score_plain``, ``score_knockout``, the
    harmful prompt's ``score_harmful`` and ``score_restored`` = (knockout - plain) / (harmful -
    plain), the same for the projection at ``hook``."""
    cuts, conds = _cuts(run), [c for c in run.conditions if c.suffix is not None]
    score_h, proj_h = (x.double() for x in _plain_runs(run, None))
    frames = []
    with run.bar("knockout", len(run.harmful) * len(cuts) * len(conds)) as bar:
        for c in conds:
            for cut, layers, layer_list, heads in cuts:
                df = knockout_scores(run.cm, run.harmful, c.suffix, layers=layer_list, heads=heads,
                                     direction=run.direction, layer=run.layer, batch_size=run.config.batch_size)
                df.insert(1, "cut", cut)
                df.insert(2, "layers", layers)
                df.insert(3, "heads", "all" if heads is None else " ".join(f"L{l}H{h}" for l, h in heads))
                idx = torch.tensor(df["prompt"].tolist())
                for what, harmful in (("score", score_h), ("projection", proj_h)):
                    df[f"{what}_harmful"] = harmful[idx].numpy()
                    df[f"{what}_restored"] = share_restored(torch.tensor(df[f"{what}_knockout"].tolist()), harmful[idx],
                                                            torch.tensor(df[f"{what}_plain"].tolist())).numpy()
                frames.append(_finish(df, c.name, ["cut", "layers", "heads", "prompt"]))
                bar.update(len(run.harmful))
    write_table(run.out, "knockout", _concat(frames))


@torch.no_grad()
def generate_answers(cm: ChatModel, instructions: list[str], suffix: str | None, knockout: bool,
                     max_new_tokens: int, batch_size: int, bar=None) -> list[str]:
    """Greedy answers to ``render(instruction, suffix)``, with EOI -> suffix attention knocked
    out in every layer (also for the generated tokens) when ``knockout``."""
    tok, out = cm.tokenizer, []
    for part in batch_slices(len(instructions), batch_size):
        chunk = instructions[part]
        with ExitStack() as stack:
            if knockout:
                batch = stack.enter_context(suffix_knockout(cm, chunk, suffix))
            else:
                batch = cm.chat.encode(chunk, [suffix] * len(chunk), device=cm.device)
            seqs = cm.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=pad_token_id(tok))
        out += tok.batch_decode(seqs[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        if bar is not None:
            bar.update(len(chunk))
    return out


def knockout_restoration(refused_harmful: Sequence[bool], refused_suffix: Sequence[bool],
                         refused_knockout: Sequence[bool]) -> dict:
    """Of the prompts the suffix made answer (refused without it, not refused with it), how
    many refuse again under the knockout: ``n_made_answer``, ``n_restored``, ``restored``
    (their share; None when the suffix made none answer)."""
    made = [h and not s for h, s in zip(refused_harmful, refused_suffix)]
    back = [m and k for m, k in zip(made, refused_knockout)]
    n_made, n_back = sum(made), sum(back)
    return {"n_made_answer": n_made, "n_restored": n_back, "restored": n_back / n_made if n_made else None}


def _judged(judge: Judge, instructions: list[str], completions: list[str]) -> list[bool]:
    verdicts = [bool(v) for v in judge(instructions, completions)]
    if len(verdicts) != len(completions):
        raise UserError(f"the judge returned {len(verdicts)} verdicts for {len(completions)} completions")
    return verdicts


def stage_generation(run: _Run) -> None:
    """Stage 7b (with a judge): greedy answers, harmful, adversarial, and adversarial under the
    all-layer knockout, each judged -> ``knockout_completions.json``."""
    cfg, n = run.config, len(run.harmful)
    answers: dict[str, list[str]] = {}
    with run.bar("answers", 3 * n) as bar:
        for name, suffix, ko in (("harmful", None, False), ("adversarial", run.suffix, False),
                                 ("knockout", run.suffix, True)):
            answers[name] = generate_answers(run.cm, run.harmful, suffix, ko, cfg.max_new_tokens, cfg.batch_size, bar)
    refused = {name: _judged(run.judge, run.harmful, c) for name, c in answers.items()}
    stats = knockout_restoration(refused["harmful"], refused["adversarial"], refused["knockout"])
    rows = []
    for i, instruction in enumerate(run.harmful):
        row = {"prompt": i, "instruction": instruction}
        row.update({name: {"completion": answers[name][i], "refused": refused[name][i]} for name in answers})
        row["made_answer"] = refused["harmful"][i] and not refused["adversarial"][i]
        row["restored"] = row["made_answer"] and refused["knockout"][i]
        rows.append(row)
    write_json_atomic(run.out / "knockout_completions.json", {
        "judge": getattr(run.judge, "__name__", type(run.judge).__name__), "max_new_tokens": cfg.max_new_tokens,
        "knockout": "EOI -> suffix attention, every layer, generated tokens included",
        **stats, "refusal_rate": {k: sum(v) / n for k, v in refused.items()}, "prompts": rows})


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
    Stage("suffix_tokens", stage_suffix_tokens, ("suffix_tokens", "suffix_token_agreement"), _exists),
    Stage("patching", stage_patching, ("patching",), _exists),
    Stage("knockout", stage_knockout, ("knockout",), _exists),
    Stage("generation", stage_generation, ("knockout_completions.json",), _exists),
)


def _load_conditions(out: Path) -> list[Condition]:
    return [Condition(**c) for c in _read(out, "conditions.json")["conditions"]]


# --- the summary -----------------------------------------------------------------------------------

def _num(x) -> float | None:
    """A JSON number: None for NaN, infinity or missing."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _by_kind(values: dict[str, float | None], conditions: list[Condition], kinds=KINDS) -> dict[str, float | None]:
    """Per-condition values as per-kind means (the random draws averaged)."""
    out = {}
    for kind in kinds:
        vals = [values[c.name] for c in conditions if c.kind == kind and values.get(c.name) is not None]
        out[kind] = _num(sum(vals) / len(vals)) if vals else None
    return out


def _drop(cos: dict, kind: str) -> float | None:
    h, n, x = cos["harmful"], cos["harmless"], cos[kind]
    if None in (h, n, x) or h == n:
        return None
    return _num((h - x) / (h - n))


def _kept(values: dict, kind: str) -> float | None:
    """The share of the harmful-harmless gap that ``kind`` keeps (1: as harmful, 0: as harmless)."""
    d = _drop(values, kind) if values else None
    return None if d is None else _num(1 - d)


def _ratio_of_means(df: pd.DataFrame, new: str, into: str, src: str) -> float | None:
    """``(mean new - mean into) / (mean from - mean into)``: a share of the mean gap, robust to
    prompts whose own gap is near zero."""
    if df.empty:
        return None
    gap = df[src].mean() - df[into].mean()
    return _num((df[new].mean() - df[into].mean()) / gap) if gap != 0 else None


def build_summary(out: Path, record: dict) -> dict:
    """``summary.json``'s content, from the tables of the run folder ``out``."""
    conds = _load_conditions(out)
    layer, position = record["direction"]["layer"], record["direction"]["position"]
    notes = []
    cos = read_table(out, "cosine", ["condition", "site", "layer", "position", "cosine"])
    at = cos[(cos["site"] == "hook_resid_pre") & (cos["layer"] == layer) & (cos["position"] == position)]
    cosine = _by_kind(at.groupby("condition", observed=True)["cosine"].mean().to_dict(), conds)
    top = _read(out, "top_heads.json")
    top8 = [tuple(x) for x in top["top8"]]
    hj = read_table(out, "hijack", ["condition", "layer", "head", "destination", "region", "mass"])
    hj = hj[(hj["destination"] == -1) & pd.MultiIndex.from_arrays([hj["layer"], hj["head"]]).isin(top8)]
    attention = {}
    for region in ("instruction", "suffix", "template", "eoi"):
        means = hj[hj["region"] == region].groupby("condition", observed=True)["mass"].mean().to_dict()
        for kind, v in _by_kind(means, conds, ("harmful", "random", "adversarial")).items():
            attention.setdefault(kind, {})[region] = v
    patch = read_table(out, "patching")
    k8 = int(patch["n_heads"][patch["n_heads"] <= SUMMARY_K].max())
    p8 = patch[(patch["n_heads"] == k8) & (patch["patch"] == "harmful->adversarial")]
    ko = read_table(out, "knockout")
    ko_all = ko[ko["cut"] == "all"]
    kinds = {c.name: c.kind for c in conds}
    score = _by_kind(ko_all.groupby("condition", observed=True)["score_plain"].mean().to_dict(), conds,
                     ("harmful", "random", "adversarial"))
    score["harmful"] = _num(ko_all["score_harmful"].mean()) if len(ko_all) else None
    ko_adv = ko_all[ko_all["condition"].map(kinds) == "adversarial"]
    ko_rnd = ko_all[ko_all["condition"].map(kinds) == "random"]
    gen_path = out / "knockout_completions.json"
    if gen_path.is_file():
        gen = _read(out, gen_path.name)
        restored, n_made = gen["restored"], gen["n_made_answer"]
        if n_made == 0:
            notes.append("knockout_restored: the suffix made no prompt answer that was refused without it")
    else:
        restored = n_made = None
        notes.append("knockout_restored: no judge was given, so the answers under knockout were not generated "
                     "and judged (the refusal scores in knockout.csv are measured)")
    harm = {}
    if table_path(out, "harmfulness") is not None:
        hf = read_table(out, "harmfulness", ["condition", "layer", "projection"])
        harm = _by_kind(hf[hf["layer"] == layer].groupby("condition", observed=True)["projection"].mean().to_dict(),
                        conds)
    agreement = None
    if table_path(out, "suffix_token_agreement") is not None:
        ag = read_table(out, "suffix_token_agreement")
        agreement = {c: _num(ag[c].mean()) for c in ("replace_vs_grad", "block_vs_grad", "replace_vs_block")}
    else:
        notes.append("suffix token effects: not computed (token_effects off)")
    return {
        "model": record["model"], "fingerprint": record["fingerprint"],
        "layer": layer, "position": position, "hook": f"blocks.{layer}.hook_resid_pre",
        "suffix": record["suffix"], "suffix_tokens": _read(out, "conditions.json")["suffix_tokens"],
        "n_harmful": record["n_harmful"], "n_harmless": record["n_harmless"],
        "n_random": sum(c.kind == "random" for c in conds),
        "random_suffixes": [c.suffix for c in conds if c.kind == "random"],
        "cosine": cosine,
        "cosine_drop_adversarial": _drop(cosine, "adversarial"), "cosine_drop_random": _drop(cosine, "random"),
        # the harmfulness direction at the last user token, at the direction's layer: 1 = harmful, 0 = harmless
        "harmfulness": harm or None,
        "harmfulness_kept_adversarial": _kept(harm, "adversarial"), "harmfulness_kept_random": _kept(harm, "random"),
        "top_heads": [list(x) for x in top8],
        "top8_projection": _by_kind({k: _num(v) for k, v in top["projection_top8"].items()}, conds),
        "top8_attention": attention,
        "refusal_score": score,
        "patch_restored": _ratio_of_means(p8, "score_patched", "score_into", "score_from"),
        "patch_projection_restored": _ratio_of_means(p8, "projection_patched", "projection_into", "projection_from"),
        "patch_heads": k8,
        "knockout_restored": _num(restored), "knockout_n_made_answer": n_made,
        "knockout_score_restored": _ratio_of_means(ko_adv, "score_knockout", "score_plain", "score_harmful"),
        "knockout_score_restored_random": _ratio_of_means(ko_rnd, "score_knockout", "score_plain", "score_harmful"),
        "suffix_token_agreement": agreement,
        "stage_seconds": record.get("stages", {}),
        "notes": notes,
    }


def _f(x, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def summary_table(summary: dict) -> str:
    """A few lines to read at a glance."""
    s = summary

    def kinds(d: dict) -> str:
        return "  ".join(f"{k} {_f(d.get(k))}" for k in KINDS if k in d)

    att = s["top8_attention"]
    judged = (f"{_f(s['knockout_restored'], '.2f')} of the {s['knockout_n_made_answer']} prompts the suffix made "
              "answer refuse again" if s["knockout_n_made_answer"] is not None else "not judged (no judge)")
    lines = [
        f"{s['model']} ({s['fingerprint']}), direction at {s['hook']}, position {s['position']}; "
        f"{s['n_harmful']} harmful, {s['n_harmless']} harmless prompts; suffix of {s['suffix_tokens']} tokens, "
        f"{s['n_random']} random controls",
        f"cosine with the direction   {kinds(s['cosine'])}",
        f"  drop from harmful, share of the harmful - harmless gap: adversarial {_f(s['cosine_drop_adversarial'])}, "
        f"random {_f(s['cosine_drop_random'])}",
        f"refusal score, last token   {kinds(s['refusal_score'])}",
        *([f"harmfulness at the last user token (harmful 1, harmless 0): adversarial "
           f"{_f(s['harmfulness_kept_adversarial'])}, random {_f(s['harmfulness_kept_random'])}"]
          if s.get("harmfulness") else []),
        f"top {len(s['top_heads'])} heads  " + " ".join(f"L{l}H{h}" for l, h in s["top_heads"]),
        f"  summed projection         {kinds(s['top8_projection'])}",
        *(f"  attention of last token, {k + ':':12s} " + "  ".join(
            f"{r} {_f(att[k].get(r), '.2f')}" for r in ("instruction", "suffix", "template"))
          for k in ("harmful", "random", "adversarial") if k in att),
        f"patching the top {s['patch_heads']} heads harmful -> adversarial restores {_f(s['patch_restored'])} of the "
        f"refusal-score gap ({_f(s['patch_projection_restored'])} of the projection's)",
        f"EOI -> suffix knockout, all layers: refusal score restored {_f(s['knockout_score_restored'])} "
        f"(random suffixes {_f(s['knockout_score_restored_random'])}); answers: {judged}",
    ]
    return "\n".join(lines)


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
    config: AttributionConfig = AttributionConfig(),
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
