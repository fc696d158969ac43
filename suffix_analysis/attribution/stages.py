"""The attribution run's stages, one function each, in the order :data:`~.run.STAGES` runs
them: each reads a :class:`~.record._Run` and writes its tables into the run folder."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict

import pandas as pd
import torch
from torch import Tensor

from ..artifacts import write_json_atomic
from ..errors import UserError
from ..models.chat import pad_token_id
from ..models.loading import ChatModel
from ..runs import read_json
from ..tables import write_table
from .batches import batch_slices, unit_direction
from .causal import knockout_scores, last_position_run, patch_top_heads, share_restored, suffix_knockout
from .config import SUMMARY_K
from .controls import random_suffixes, suffix_lengths
from .cosine import cosine_frame, residual_cosine, user_end_states
from .frames import tidy
from .heads import DirectAttribution, direct_attribution, rank_heads
from .hijack import attention_hijack
from .record import Condition, Judge, _Run
from .regions import REGIONS
from .suffix_tokens import suffix_token_attention, suffix_token_effects, token_agreement

log = logging.getLogger(__name__)

SITES = ("hook_resid_pre", "hook_resid_post")


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
    layer and position -> ``suffix_tokens``, their rank agreement -> ``suffix_token_agreement``,
    and the attention the top heads pay each suffix token from the last EOI position ->
    ``suffix_attention``."""
    effects = suffix_token_effects(run.cm, run.harmful, run.suffix, run.direction, run.layer, position=run.position,
                                   batch_size=run.config.batch_size, progress=run.progress)
    write_table(run.out, "suffix_tokens", effects)
    write_table(run.out, "suffix_token_agreement", token_agreement(effects))
    top = read_json(run.out / "top_heads.json", "run the attribution's heads stage again")["heads"]
    write_table(run.out, "suffix_attention", suffix_token_attention(run.cm, run.harmful, run.suffix, top))


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
