"""Causal attribution on tiny random models: EOI -> suffix knockout (all layers, a band, per
head, during generate) against its constructed equivalent (the suffix keys masked by the
ordinary attention mask at unchanged positions), activation patching of heads' z, and the
per-suffix-token effects (replacement, blocking, gradient x input) with rank agreement."""

import pytest
import torch
from conftest import tiny_chat_model

from suffix_analysis.attribution import (
    AttentionCut,
    cut_attention,
    knockout_scores,
    last_position_run,
    patch_heads,
    patch_top_heads,
    patch_z_hooks,
    prompt_regions,
    share_restored,
    spearman,
    suffix_knockout,
    suffix_token_effects,
    token_agreement,
)
from suffix_analysis.attribution.masks import layer_heads
from suffix_analysis.attribution.suffix_tokens import ranks
from suffix_analysis.errors import UserError
from suffix_analysis.metrics import refusal_score
from suffix_analysis.models.chat import position_ids
from suffix_analysis.models.hooks import Recorder, hook_names, run_with_hooks

INSTRUCTIONS = ["Write a poem about the sea.", "Say hi.", "Explain how plants turn sunlight into sugar."]
SUFFIXES = ["Sure, here is", "!! describing.\\ + similarly", "ok then"]
EXACT = dict(atol=1e-5, rtol=1e-5)


def unit(cm, seed=1):
    r = torch.randn(cm.d_model, generator=torch.Generator().manual_seed(seed))
    return r / r.norm()


def model(model_type, impl):
    cm = tiny_chat_model(model_type)
    cm.model.set_attn_implementation(impl)
    return cm


def suffix_keys(cm, instructions=INSTRUCTIONS, suffixes=SUFFIXES):
    """The batch, and ``[batch, width]`` bool: the suffix positions of each row."""
    batch = cm.chat.encode(instructions, suffixes)
    keys = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    for b, reg in enumerate(prompt_regions(cm.chat, instructions, suffixes)):
        start, end = reg.padded("suffix")
        keys[b, start:end] = True
    return batch, keys


def run(cm, batch, names, mask=None, hooks=(), positions=None):
    """Logits and the recorded ``names`` of one pass; ``mask`` replaces the attention mask
    while the positions stay those of the real one."""
    rec = Recorder(names, positions=positions)
    real = batch["attention_mask"]
    with rec.recording(cm), run_with_hooks(cm, list(hooks)), torch.no_grad():
        logits = cm.model(input_ids=batch["input_ids"], attention_mask=real if mask is None else mask,
                          position_ids=position_ids(real)).logits
    return logits, rec


def masked_equivalent(cm, batch, keys, names, positions=None):
    """The constructed equivalent of the knockout: the suffix keys are padding for every query."""
    return run(cm, batch, names, mask=batch["attention_mask"].masked_fill(keys, 0), positions=positions)


# --- knockout ---------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type,impl", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"),
                                             ("gemma2", "eager")])
def test_knockout_in_all_layers_is_masking_the_suffix_keys(model_type, impl):
    cm = model(model_type, impl)
    names = hook_names(cm, ["hook_resid_post", "attn.hook_z"])
    eoi = cm.chat.eoi_positions
    batch, keys = suffix_keys(cm)
    with suffix_knockout(cm, INSTRUCTIONS, SUFFIXES) as ko_batch:
        assert torch.equal(ko_batch["input_ids"], batch["input_ids"])
        logits, ko = run(cm, batch, names, positions=eoi)
    want_logits, want = masked_equivalent(cm, batch, keys, names, positions=eoi)
    plain_logits, plain = run(cm, batch, names, positions=eoi)
    for n in names:
        torch.testing.assert_close(ko[n], want[n], **EXACT)
    torch.testing.assert_close(logits[:, -cm.chat.n_eoi:], want_logits[:, -cm.chat.n_eoi:], **EXACT)
    assert (ko[names[-1]] - plain[names[-1]]).abs().max() > 1e-3
    assert (logits[:, -1] - plain_logits[:, -1]).abs().max() > 1e-3
    # the hooks are gone after the block
    torch.testing.assert_close(run(cm, batch, names[:1], positions=eoi)[1][names[0]], plain[names[0]], atol=0, rtol=0)


def test_band_and_per_head_knockout():
    cm = model("llama", "sdpa")
    eoi = cm.chat.eoi_positions
    names = hook_names(cm, ["attn.hook_z", "hook_resid_pre"])
    batch, _ = suffix_keys(cm)
    plain = run(cm, batch, names, positions=eoi)[1]

    def knocked(**where):
        with suffix_knockout(cm, INSTRUCTIONS, SUFFIXES, **where):
            return run(cm, batch, names, positions=eoi)[1]

    band = knocked(layers=[1])
    torch.testing.assert_close(band["blocks.0.attn.hook_z"], plain["blocks.0.attn.hook_z"], atol=0, rtol=0)
    torch.testing.assert_close(band["blocks.1.hook_resid_pre"], plain["blocks.1.hook_resid_pre"], atol=0, rtol=0)
    assert (band["blocks.1.attn.hook_z"] - plain["blocks.1.attn.hook_z"]).abs().max() > 1e-3
    # one head: its pattern row loses the suffix and is renormalized; the other heads of the layer are untouched
    one = knocked(heads=[(1, 2)])
    others = [0, 1, 3]
    torch.testing.assert_close(one["blocks.1.attn.hook_z"][:, :, others], plain["blocks.1.attn.hook_z"][:, :, others],
                               atol=0, rtol=0)
    torch.testing.assert_close(one["blocks.1.attn.hook_z"][:, :, 2], band["blocks.1.attn.hook_z"][:, :, 2], **EXACT)
    # every head of every layer is the all-layer knockout; the eager path gives the same numbers
    every = knocked(heads=[(l, h) for l in range(cm.n_layers) for h in range(4)])
    everything = knocked()
    cm.model.set_attn_implementation("eager")
    eager = knocked(heads=[(l, h) for l in range(cm.n_layers) for h in range(4)])
    for n in names:
        torch.testing.assert_close(every[n], everything[n], **EXACT)
        torch.testing.assert_close(eager[n], everything[n], **EXACT)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("rows", [slice(0, 3), slice(1, 2)])  # padded batch; one prompt (sdpa decodes without a mask)
def test_generate_under_knockout_never_lets_the_response_see_the_suffix(impl, rows):
    cm = model("llama", impl)
    ins, suf = INSTRUCTIONS[rows], SUFFIXES[rows]
    steps = 4
    with suffix_knockout(cm, ins, suf) as batch, torch.no_grad():
        out = cm.model.generate(**batch, max_new_tokens=steps, do_sample=False, pad_token_id=cm.tokenizer.pad_token_id)
    # the reference: greedy steps without a cache, the suffix keys masked for every query, positions unchanged
    ids, keys = suffix_keys(cm, ins, suf)
    real = ids["attention_mask"]
    ids, masked = ids["input_ids"], real.masked_fill(keys, 0)
    for _ in range(steps):
        with torch.no_grad():
            logits = cm.model(input_ids=ids, attention_mask=masked, position_ids=position_ids(real)).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
        real, masked = (torch.cat([m, torch.ones_like(m[:, :1])], 1) for m in (real, masked))
    assert torch.equal(out, ids)


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_generate_under_per_head_knockout_matches_passes_without_a_cache(model_type):
    """Decoding with a cache (one query at a time; sdpa packs grouped-query heads) under a
    per-head cut gives the logits of whole passes over the sequence so far under the same cut."""
    cm = model(model_type, "sdpa" if model_type == "llama" else "eager")
    steps, heads = 3, [(0, 1), (2, 3), (2, 0)]
    with suffix_knockout(cm, INSTRUCTIONS, SUFFIXES, heads=heads) as batch, torch.no_grad():
        out = cm.model.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True,
                                return_dict_in_generate=True, pad_token_id=cm.tokenizer.pad_token_id)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        for step in range(steps):
            logits = cm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, -1]
            torch.testing.assert_close(out.logits[step], logits, atol=1e-4, rtol=1e-4)
            ids = torch.cat([ids, out.sequences[:, ids.shape[1], None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    with torch.no_grad():
        plain = cm.model.generate(**batch, max_new_tokens=1, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True, pad_token_id=cm.tokenizer.pad_token_id)
    assert (plain.logits[0] - out.logits[0]).abs().max() > 1e-3


def test_knockout_scores():
    cm = model("llama", "sdpa")
    r = unit(cm)
    df = knockout_scores(cm, INSTRUCTIONS, SUFFIXES, direction=r, layer=2, batch_size=2)
    assert list(df.columns) == ["prompt", "score_plain", "score_knockout", "hook", "projection_plain",
                                "projection_knockout"]
    batch, keys = suffix_keys(cm)
    name = "blocks.2.hook_resid_pre"
    plain_logits, plain = run(cm, batch, [name], positions=[-1])
    want_logits, want = masked_equivalent(cm, batch, keys, [name], positions=[-1])
    torch.testing.assert_close(torch.tensor(df["score_plain"].to_numpy(), dtype=torch.float32),
                               refusal_score(plain_logits[:, -1], cm.refusal_ids), **EXACT)
    torch.testing.assert_close(torch.tensor(df["score_knockout"].to_numpy(), dtype=torch.float32),
                               refusal_score(want_logits[:, -1], cm.refusal_ids), **EXACT)
    torch.testing.assert_close(torch.tensor(df["projection_knockout"].to_numpy(), dtype=torch.float32),
                               want[name][:, 0] @ r, **EXACT)
    band = knockout_scores(cm, INSTRUCTIONS, "Sure, here is", layers=[0, 1])
    assert list(band.columns) == ["prompt", "score_plain", "score_knockout"] and len(band) == 3


def test_knockout_errors():
    cm = model("llama", "sdpa")
    with pytest.raises(UserError, match=r"head \(1, 4\) is out of range"):
        knockout_scores(cm, INSTRUCTIONS, SUFFIXES, heads=[(1, 4)])
    with pytest.raises(UserError, match=r"head \(3, 0\) is out of range"):
        knockout_scores(cm, INSTRUCTIONS, SUFFIXES, heads=[(3, 0)])
    with pytest.raises(UserError, match="listed twice"):
        knockout_scores(cm, INSTRUCTIONS, SUFFIXES, heads=[(0, 1), (0, 1)])
    with pytest.raises(UserError, match="not both"):
        knockout_scores(cm, INSTRUCTIONS, SUFFIXES, layers=[0], heads=[(0, 1)])
    with pytest.raises(UserError, match="layers must be"):
        knockout_scores(cm, INSTRUCTIONS, SUFFIXES, layers=[])
    with pytest.raises(UserError, match="no tokens of its own"):
        knockout_scores(cm, INSTRUCTIONS, [SUFFIXES[0], "", SUFFIXES[2]])
    with pytest.raises(UserError, match="width 64"):
        knockout_scores(cm, INSTRUCTIONS, SUFFIXES, direction=torch.ones(3), layer=1)
    with pytest.raises(UserError, match="both direction and layer"):
        knockout_scores(cm, INSTRUCTIONS, SUFFIXES, direction=unit(cm))
    with pytest.raises(UserError, match="made for 3 prompts"), suffix_knockout(cm, INSTRUCTIONS, SUFFIXES) as batch:
        cm.model.generate(**batch, max_new_tokens=1, num_beams=2, do_sample=False)
    cm.model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UserError, match="'flash_attention_2'.*attn_implementation='eager'"):
        knockout_scores(cm, INSTRUCTIONS, SUFFIXES)


# --- patching ---------------------------------------------------------------------------------

def test_share_restored_arithmetic():
    got = share_restored(torch.tensor([3.0, 1.0, 2.0, 5.0, 4.0]), torch.tensor([5.0, 5.0, 2.0, 1.0, 4.0]),
                         torch.tensor([1.0, 1.0, 0.0, 5.0, 4.0]))
    # (3-1)/(5-1), (1-1)/(5-1), (2-0)/(2-0), (5-5)/(1-5), nothing to restore
    torch.testing.assert_close(got[:4], torch.tensor([0.5, 0.0, 1.0, 0.0], dtype=torch.float64))
    assert torch.isnan(got[4])
    assert share_restored(7.0, 5.0, 1.0).item() == 1.5  # overshoot is kept


def test_patching_a_run_into_itself_changes_nothing():
    cm = model("llama", "sdpa")
    r = unit(cm)
    heads = [(0, 1), (1, 3), (2, 0)]
    df = patch_heads(cm, INSTRUCTIONS, SUFFIXES, r, 2, heads, source_suffixes=SUFFIXES, positions="all")
    assert set(df["patch"]) == {"source->dest", "dest->source"} and len(df) == 6
    # both ends are the plain run, as a pass without hooks measures it
    plain = last_position_run(cm, cm.chat.encode(INSTRUCTIONS, SUFFIXES), r, 2)
    for k, what in enumerate(("score", "projection")):
        for direction in ("source->dest", "dest->source"):
            frame = df[df["patch"] == direction].sort_values("prompt")
            for end in ("from", "into", "patched"):
                torch.testing.assert_close(torch.tensor(frame[f"{what}_{end}"].to_numpy(), dtype=torch.float32),
                                           plain[k], **EXACT)
        assert df[f"{what}_restored"].isna().all()


def test_patching_every_head_everywhere_reproduces_the_source():
    """Source: the plain run. Destination: the same prompt under the suffix knockout, so only
    attention patterns differ. Writing every head's z of every layer at every position from
    the source into the destination gives the source's logits."""
    cm = model("llama", "sdpa")
    r = unit(cm)
    batch = cm.chat.encode(INSTRUCTIONS, SUFFIXES)
    width = batch["input_ids"].shape[1]
    every = [(l, h) for l in range(cm.n_layers) for h in range(4)]
    score, proj, z = last_position_run(cm, batch, r, 1, z_layers=range(cm.n_layers), z_positions=range(-width, 0))
    source_logits, _ = run(cm, batch, [])
    with suffix_knockout(cm, INSTRUCTIONS, SUFFIXES):
        knocked_logits, _ = run(cm, batch, [])
        patched_logits, _ = run(cm, batch, [], hooks=patch_z_hooks(z, every, range(-width, 0)))
        patched_score, patched_proj, _ = last_position_run(cm, batch, r, 1, patch_z_hooks(z, every, range(-width, 0)))
    assert (knocked_logits[:, -1] - source_logits[:, -1]).abs().max() > 1e-3
    torch.testing.assert_close(patched_logits[:, -1], source_logits[:, -1], **EXACT)
    torch.testing.assert_close(patched_score, score, **EXACT)
    torch.testing.assert_close(patched_proj, proj, **EXACT)


def test_patch_heads_both_ways_and_top_k():
    cm = model("llama", "sdpa")
    r, layer = unit(cm), 2
    src = cm.chat.encode(INSTRUCTIONS)
    dst = cm.chat.encode(INSTRUCTIONS, SUFFIXES)
    eoi = cm.chat.eoi_positions
    heads = [(1, 2), (0, 0)]
    s_score, s_proj, s_z = last_position_run(cm, src, r, layer, z_layers=[0, 1], z_positions=eoi)
    d_score, d_proj, d_z = last_position_run(cm, dst, r, layer, z_layers=[0, 1], z_positions=eoi)
    into_dest = last_position_run(cm, dst, r, layer, patch_z_hooks(s_z, heads, eoi))
    into_source = last_position_run(cm, src, r, layer, patch_z_hooks(d_z, heads, eoi))
    df = patch_heads(cm, INSTRUCTIONS, SUFFIXES, r, layer, heads, batch_size=2)
    assert list(df.columns) == ["prompt", "patch", "n_heads", "hook", "score_from", "score_into", "score_patched",
                                "score_restored", "projection_from", "projection_into", "projection_patched",
                                "projection_restored"]
    assert set(df["hook"]) == {"blocks.2.hook_resid_pre"}
    fwd, rev = df[df["patch"] == "source->dest"], df[df["patch"] == "dest->source"]
    col = lambda frame, c: torch.tensor(frame[c].to_numpy(), dtype=torch.float32)  # noqa: E731
    for frame, a, b, patched in ((fwd, (s_score, s_proj), (d_score, d_proj), into_dest),
                                 (rev, (d_score, d_proj), (s_score, s_proj), into_source)):
        for k, what in enumerate(("score", "projection")):
            torch.testing.assert_close(col(frame, f"{what}_from"), a[k], **EXACT)
            torch.testing.assert_close(col(frame, f"{what}_into"), b[k], **EXACT)
            torch.testing.assert_close(col(frame, f"{what}_patched"), patched[k], **EXACT)
            # the share from the frame's own numbers (a ratio: batching's rounding is amplified by small gaps)
            torch.testing.assert_close(torch.tensor(frame[f"{what}_restored"].to_numpy()), share_restored(
                *(torch.tensor(frame[f"{what}_{c}"].to_numpy()) for c in ("patched", "from", "into"))))
    # top k: every head of every layer at the EOI positions restores exactly (the rest is position-wise)
    ranking = [(l, h) for l in (2, 1, 0) for h in range(4)]
    top = patch_top_heads(cm, INSTRUCTIONS, SUFFIXES, r, layer, ranking, ks=(1, 2, 4, 8, 12, 16))
    assert sorted(set(top["n_heads"])) == [1, 2, 4, 8, 12] and len(top) == 5 * 2 * 3
    full = top[top["n_heads"] == 12]
    assert (full["score_restored"] - 1).abs().max() < 1e-4
    assert (full["projection_restored"] - 1).abs().max() < 1e-4
    # heads at or after the direction's layer cannot move its projection
    late = top[top["n_heads"] <= 4]
    assert (late["projection_patched"] - late["projection_into"]).abs().max() == 0


def test_patching_errors():
    cm = model("llama", "sdpa")
    r = unit(cm)
    with pytest.raises(UserError, match=r"head \(0, 9\) is out of range"):
        patch_heads(cm, INSTRUCTIONS, SUFFIXES, r, 1, [(0, 9)])
    with pytest.raises(UserError, match="direction layer 3 out of range"):
        patch_heads(cm, INSTRUCTIONS, SUFFIXES, r, 3, [(0, 1)])
    with pytest.raises(UserError, match="width 64"):
        patch_heads(cm, INSTRUCTIONS, SUFFIXES, torch.ones(8), 1, [(0, 1)])
    with pytest.raises(UserError, match="same token lengths"):
        patch_heads(cm, INSTRUCTIONS, SUFFIXES, r, 1, [(0, 1)], positions="all")
    with pytest.raises(UserError, match="distinct negative positions"):
        patch_heads(cm, INSTRUCTIONS, SUFFIXES, r, 1, [(0, 1)], positions=[-999])
    with pytest.raises(UserError, match="no tokens of its own"):
        patch_heads(cm, INSTRUCTIONS, "", r, 1, [(0, 1)])
    with pytest.raises(UserError, match="fewer than every k"):
        patch_top_heads(cm, INSTRUCTIONS, SUFFIXES, r, 1, [(0, 1)], ks=(2, 4))


# --- suffix tokens ----------------------------------------------------------------------------

def projection_at(cm, ids, r, layer, positions, mask=None, hooks=()):
    """The readout of the full model: ``blocks.{layer}.hook_resid_pre`` at ``positions``, mean."""
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    _, rec = run(cm, batch, [f"blocks.{layer}.hook_resid_pre"], mask=mask, hooks=hooks, positions=positions)
    return (rec[f"blocks.{layer}.hook_resid_pre"] @ r).mean(-1)


@pytest.mark.parametrize("model_type,position", [("llama", "eoi"), ("qwen2", -1)])
def test_suffix_token_effects_are_the_interventions_and_the_gradient(model_type, position):
    cm = model(model_type, "sdpa")
    r, layer = unit(cm), 2
    df = suffix_token_effects(cm, INSTRUCTIONS, SUFFIXES, r, layer, position=position, batch_size=3)
    assert list(df.columns) == ["prompt", "suffix_index", "position", "token_id", "token", "hook", "readout",
                                "effect_replace", "effect_block", "grad_x_input"]
    positions = cm.chat.eoi_positions if position == "eoi" else [position]
    the = cm.tokenizer(" the", add_special_tokens=False)["input_ids"][0]
    for p, reg in enumerate(prompt_regions(cm.chat, INSTRUCTIONS, SUFFIXES)):
        rows = df[df["prompt"] == p]
        start, end = reg.spans["suffix"]
        assert list(rows["position"]) == list(range(start, end)) and list(rows["suffix_index"]) == list(range(end - start))
        assert "".join(rows["token"]) == cm.tokenizer.decode(list(reg.ids[start:end]))
        ids = torch.tensor([reg.ids])
        plain = projection_at(cm, ids, r, layer, positions)
        for _, row in rows.iterrows():
            t = int(row["position"])
            replaced = ids.clone()
            replaced[0, t] = the
            blocked_mask = torch.ones_like(ids)
            blocked_mask[0, t] = 0  # equivalent for every later position: nothing reads t
            assert row["readout"] == pytest.approx(float(plain), abs=1e-5)
            assert row["effect_replace"] == pytest.approx(float(plain - projection_at(cm, replaced, r, layer, positions)),
                                                          abs=1e-5)
            assert row["effect_block"] == pytest.approx(
                float(plain - projection_at(cm, ids, r, layer, positions, mask=blocked_mask)), abs=1e-5)
        # gradient x input through the full model
        emb = cm.model.get_input_embeddings()(ids).detach().requires_grad_(True)
        seen = {}
        with run_with_hooks(cm, [(f"blocks.{layer}.hook_resid_pre", lambda x, hook: seen.update(x=x))]):
            cm.model(inputs_embeds=emb, attention_mask=torch.ones_like(ids))
        (grad,) = torch.autograd.grad((seen["x"][0, positions] @ r).mean(), emb)
        torch.testing.assert_close(torch.tensor(rows["grad_x_input"].to_numpy(), dtype=torch.float32),
                                   (grad * emb).sum(-1)[0, start:end].detach(), **EXACT)
    assert df["effect_block"].abs().max() > 1e-4 and df["effect_replace"].abs().max() > 1e-4
    agree = token_agreement(df)
    assert list(agree.columns) == ["prompt", "n_tokens", "replace_vs_grad", "block_vs_grad", "replace_vs_block"]
    g = df[df["prompt"] == 0]
    assert agree.loc[0, "block_vs_grad"] == pytest.approx(
        spearman(torch.tensor(g["effect_block"].to_numpy()), torch.tensor(g["grad_x_input"].to_numpy())))
    # blocking a token in the cut machinery is the mask edit it claims: all later queries lose that key
    cut = AttentionCut(keys=torch.zeros(1, ids.shape[1], dtype=torch.bool).index_fill(1, torch.tensor([end - 1]), True),
                       queries_from=torch.tensor([end]), heads=layer_heads(cm))
    with cut_attention(cm, cut):
        assert float(projection_at(cm, ids, r, layer, positions)) != pytest.approx(float(plain), abs=1e-6)


def test_spearman_with_ties_and_degenerate_inputs():
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([30.0, 20.0, 10.0])) == pytest.approx(-1)
    assert torch.equal(ranks(torch.tensor([5.0, 1.0, 5.0, 3.0])), torch.tensor([3.5, 1.0, 3.5, 2.0], dtype=torch.float64))
    # ranks (1, 2.5, 2.5, 4) vs (1, 3, 2, 4): centred dot 4.5, norms sqrt(4.5) and sqrt(5)
    assert spearman(torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([1.0, 3.0, 2.0, 4.0])) == pytest.approx(
        4.5 / (4.5 ** 0.5 * 5 ** 0.5))
    assert spearman(torch.tensor([1.0, 10.0, 100.0]), torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(1)  # monotone
    assert torch.isnan(torch.tensor(spearman(torch.tensor([1.0]), torch.tensor([2.0]))))
    assert torch.isnan(torch.tensor(spearman(torch.ones(4), torch.arange(4.0))))
    with pytest.raises(UserError, match="equal-length"):
        spearman(torch.ones(3), torch.ones(4))


def test_suffix_token_errors():
    cm = model("llama", "sdpa")
    r = unit(cm)
    with pytest.raises(UserError, match="no tokens of its own"):
        suffix_token_effects(cm, INSTRUCTIONS, ["a b", "", "c"], r, 1)
    with pytest.raises(UserError, match="needs a suffix"):
        suffix_token_effects(cm, INSTRUCTIONS, None, r, 1)
    with pytest.raises(UserError, match="is 9 tokens"):
        suffix_token_effects(cm, INSTRUCTIONS, SUFFIXES, r, 1, neutral=" hello world")
    with pytest.raises(UserError, match="out of range for a vocabulary"):
        suffix_token_effects(cm, INSTRUCTIONS, SUFFIXES, r, 1, neutral=10**6)
    with pytest.raises(UserError, match="position must be"):
        suffix_token_effects(cm, INSTRUCTIONS, SUFFIXES, r, 1, position=-99)
    with pytest.raises(UserError, match="width 64"):
        suffix_token_effects(cm, INSTRUCTIONS, SUFFIXES, torch.ones(5), 1)
    with pytest.raises(UserError, match="direction layer"):
        suffix_token_effects(cm, INSTRUCTIONS, SUFFIXES, r, 7)
    df = suffix_token_effects(cm, INSTRUCTIONS[:1], "Sure", r, 1, neutral=cm.tokenizer.pad_token_id)
    assert len(df) >= 1 and set(df["hook"]) == {"blocks.1.hook_resid_pre"}
