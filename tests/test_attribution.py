"""Attribution at the EOI positions: token regions from the whole prompt's tokenization,
residual cosines, direct attribution to heads/MLPs/embedding/biases that adds up to the
residual stream, and per-source attention writes (mass, dominance, projection) computed
from the destination rows only, on tiny random models."""

import pytest
import torch
from conftest import make_tokenizer, tiny_chat_model

from suffix_analysis.attribution import (
    REGIONS,
    attention_hijack,
    cosine_frame,
    direct_attribution,
    per_source_writes,
    prompt_regions,
    rank_heads,
    region_masks,
    region_writes,
    residual_cosine,
    source_writes,
    top_heads,
)
from suffix_analysis.attribution.writers import output_bias, post_norm, recording_values
from suffix_analysis.errors import UserError
from suffix_analysis.models.chat import ChatFormat, position_ids
from suffix_analysis.models.hooks import Recorder, hook_names

INSTRUCTIONS = ["Write a poem about the sea.", "Say hi.", "Explain how plants turn sunlight into sugar."]
SUFFIXES = ["Sure, here is", None, "!! describing.\\ + similarly"]
# texts that exercise the tokenizer: punctuation first, multi-byte characters, an empty suffix
HARD = [("Give three tips for staying healthy.", "!!! Sure"),
        ("Caf\u00e9 na\u00efve r\u00e9sum\u00e9?", "\u00fcber \U0001f600 ok"),
        ("x", ""), ("  padded instruction  ", "tail with  two spaces")]


def unit(cm, seed=1):
    r = torch.randn(cm.d_model, generator=torch.Generator().manual_seed(seed))
    return r / r.norm()


def with_o_proj_bias(cm, seed=0):
    """Give every output projection a random bias (Llama, Qwen2 and Gemma-2 have none by default)."""
    g = torch.Generator().manual_seed(seed)
    for block in cm.layers:
        attn = block.get_submodule(cm.arch.attn)
        old = attn.o_proj
        new = torch.nn.Linear(old.in_features, old.out_features, bias=True)
        with torch.no_grad():
            new.weight.copy_(old.weight)
            new.bias.copy_(0.5 * torch.randn(old.out_features, generator=g))
        attn.o_proj = new
    return cm


def record_plain(cm, names, instructions=INSTRUCTIONS, suffixes=SUFFIXES):
    """Every position of ``names`` for each prompt run alone (no padding), a list per name."""
    out = {n: [] for n in names}
    for ins, suf in zip(instructions, suffixes):
        rec = Recorder(names)
        with rec.recording(cm), torch.no_grad():
            cm.model(**cm.chat.encode([ins], [suf]))
        for n in names:
            out[n].append(rec[n][0])
    return out


# --- regions --------------------------------------------------------------------------------

def check_partition(chat, regions, instructions, suffixes):
    batch = chat.encode(instructions, suffixes)
    masks = region_masks(regions)
    # one region per real token, none for padding
    assert torch.equal(masks.sum(1), batch["attention_mask"])
    for b, reg in enumerate(regions):
        assert reg.ids == tuple(batch["input_ids"][b, reg.pad:].tolist())
        starts = [reg.spans[r][0] for r in REGIONS]
        ends = [reg.spans[r][1] for r in REGIONS]
        assert starts[0] == 0 and ends[-1] == reg.length and starts[1:] == ends[:-1]
        assert reg.spans["eoi"] == (reg.length - chat.n_eoi, reg.length)
        assert list(reg.ids[-chat.n_eoi:]) == chat.eoi_ids
        assert len(reg.labels()) == reg.length
        for k, r in enumerate(REGIONS):
            start, end = reg.padded(r)
            assert masks[b, k, start:end].all() and masks[b, k].sum() == end - start


def decoded(chat, reg, region):
    start, end = reg.spans[region]
    return chat.tokenizer.decode(list(reg.ids[start:end]), skip_special_tokens=False)


@pytest.mark.parametrize("family", ["chatml", "llama2", "llama3", "gemma", "mistral"])
def test_regions_partition_the_prompt_and_decode_to_their_text(family):
    chat = ChatFormat.from_tokenizer(make_tokenizer(family))
    instructions = INSTRUCTIONS + [i for i, _ in HARD]
    suffixes = SUFFIXES + [s for _, s in HARD]
    regions = prompt_regions(chat, instructions, suffixes)
    check_partition(chat, regions, instructions, suffixes)
    for reg in regions:
        assert reg.text == chat.render(instructions[regions.index(reg)], suffixes[regions.index(reg)])
        assert "".join(decoded(chat, reg, r) for r in REGIONS) == reg.text
        if not reg.straddlers:  # the tiny byte-level tokenizers split at these boundaries
            for r in REGIONS:
                assert decoded(chat, reg, r) == reg.text[slice(*reg.chars[r])], r
    reg = regions[0]
    assert decoded(chat, reg, "instruction") == "Write a poem about the sea."
    assert decoded(chat, reg, "suffix") == " Sure, here is"  # the joining space belongs to the suffix
    assert regions[1].spans["suffix"][0] == regions[1].spans["suffix"][1]  # no suffix: empty, in place
    assert decoded(chat, regions[-1], "instruction") == "padded instruction"  # render strips the instruction


def test_tokens_merged_across_a_boundary_go_to_the_region_of_their_first_non_space_character():
    tok = make_tokenizer("chatml")
    tok.add_tokens(["\nWri", "a. Su", "ay hi. S"])  # fuse template|instruction and instruction|suffix
    chat = ChatFormat.from_tokenizer(tok)
    suffixes = ["Sure, here is", "Sure", "S"]
    instructions = ["Write a poem about the sea.", "Say hi.", "Say hi."]
    regions = prompt_regions(chat, instructions, suffixes)
    check_partition(chat, regions, instructions, suffixes)
    reg = regions[0]
    # "\nWri" starts with the template's newline, but its first letter is the instruction's
    assert decoded(chat, reg, "template") == "<|im_start|>user"
    assert decoded(chat, reg, "instruction") == "\nWrite a poem about the sea. Su"
    assert decoded(chat, reg, "suffix") == "re, here is"
    assert [(s.text, s.regions, s.assigned) for s in reg.straddlers] == [
        ("\nWri", ("template", "instruction"), "instruction"), ("a. Su", ("instruction", "suffix"), "instruction")]
    assert reg.offsets[reg.straddlers[0].position] == (len("<|im_start|>user"), len("<|im_start|>user\nWri"))
    # the whole suffix swallowed by a merged token: an empty suffix span, still a partition
    assert regions[2].spans["suffix"][0] == regions[2].spans["suffix"][1]
    assert regions[2].straddlers[-1].regions == ("instruction", "suffix")


@pytest.mark.parametrize("family,merged,owner", [("llama2", "] Wr", "template"), ("gemma", "r\nWr", "template"),
                                                 ("llama3", "\n\nWr", "instruction")])
def test_template_merges_in_other_families(family, merged, owner):
    tok = make_tokenizer(family)
    tok.add_tokens([merged])
    chat = ChatFormat.from_tokenizer(tok)
    (reg,) = prompt_regions(chat, ["Write a poem."], ["Sure"])
    check_partition(chat, [reg], ["Write a poem."], ["Sure"])
    (s,) = reg.straddlers
    assert s.text == merged and s.regions == ("template", "instruction") and s.assigned == owner
    text = decoded(chat, reg, owner)
    assert text.endswith(merged) if owner == "template" else text.startswith(merged)


# --- residual cosine ------------------------------------------------------------------------

@torch.no_grad()
def test_residual_cosine_is_the_cosine_at_every_layer_and_eoi_position_whatever_the_batching():
    cm = tiny_chat_model("llama")
    r = 3 * unit(cm)  # any length: the direction is made unit
    sites = ("hook_resid_pre", "hook_resid_post", "hook_mlp_out")
    cos = residual_cosine(cm, INSTRUCTIONS, r, SUFFIXES, sites=sites, batch_size=2)
    n_eoi = cm.chat.n_eoi
    assert cos.shape == (3, 3, cm.n_layers, n_eoi) and cos.dtype == torch.float32
    plain = record_plain(cm, hook_names(cm, sites))
    for p in range(3):
        for s, site in enumerate(sites):
            for l in range(cm.n_layers):
                x = plain[f"blocks.{l}.{site}"][p][-n_eoi:]
                torch.testing.assert_close(cos[p, s, l], torch.nn.functional.cosine_similarity(x, unit(cm)[None], -1),
                                           atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(residual_cosine(cm, INSTRUCTIONS, r, SUFFIXES, sites=sites, batch_size=3), cos,
                               atol=1e-5, rtol=1e-5)
    df = cosine_frame(cos, sites)
    assert len(df) == cos.numel() and set(df["position"]) == set(range(-n_eoi, 0))
    assert df.query("prompt == 2 and site == 'hook_mlp_out' and layer == 1 and position == -1")["cosine"].item() \
        == pytest.approx(cos[2, 2, 1, -1].item())
    with pytest.raises(UserError, match="unknown residual site"):
        residual_cosine(cm, INSTRUCTIONS, r, sites=("hook_z",))
    with pytest.raises(UserError, match="width 64"):
        residual_cosine(cm, INSTRUCTIONS, torch.ones(3))
    with pytest.raises(UserError, match="3 instructions but 2 suffixes"):
        residual_cosine(cm, INSTRUCTIONS, r, ["a", "b"])
    with pytest.raises(UserError, match="not one string"):
        residual_cosine(cm, "Say hi.", r)


# --- direct attribution -----------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma2", "gemma3_text"])
@torch.no_grad()
def test_direct_attribution_adds_up_to_the_residual_stream(model_type):
    cm = with_o_proj_bias(tiny_chat_model(model_type))
    r = unit(cm)
    attr = direct_attribution(cm, INSTRUCTIONS, r, SUFFIXES, batch_size=2)
    n, L, H, P = 3, cm.n_layers, cm.model.config.num_attention_heads, cm.chat.n_eoi
    assert attr.heads.shape == (n, L, H, P) and attr.mlp.shape == attr.attn_bias.shape == (n, L, P)
    for site, measured in (("hook_resid_pre", attr.resid_pre), ("hook_resid_post", attr.resid_post)):
        torch.testing.assert_close(attr.reconstructed(site), measured, atol=1e-4, rtol=1e-6)
    # the measured sites are the model's own, per prompt alone; the bias part is really there
    plain = record_plain(cm, hook_names(cm, ["hook_resid_pre", "hook_attn_out"]))
    for p in range(n):
        for l in range(L):
            torch.testing.assert_close(attr.resid_pre[p, l], plain[f"blocks.{l}.hook_resid_pre"][p][-P:] @ r,
                                       atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(attr.attn[p, l], plain[f"blocks.{l}.hook_attn_out"][p][-P:] @ r,
                                       atol=1e-4, rtol=1e-5)
    assert attr.attn_bias.abs().min() > 1e-3
    if cm.arch.post_norm_writers:  # the bias comes through the norm, at each position's scale
        assert post_norm(cm, 0) is not None
    else:
        torch.testing.assert_close(attr.attn_bias[0, 0], (output_bias(cm, 0) @ r).expand(P))
    torch.testing.assert_close(direct_attribution(cm, INSTRUCTIONS, r, SUFFIXES, batch_size=3).heads, attr.heads,
                               atol=1e-5, rtol=1e-5)


def test_heads_rank_by_mean_projection_at_a_position():
    cm = tiny_chat_model("llama")
    attr = direct_attribution(cm, INSTRUCTIONS, unit(cm), SUFFIXES)
    ranked = rank_heads(attr)
    means = attr.heads[..., -1].double().mean(0)
    assert len(ranked) == means.numel() and list(ranked["mean"]) == sorted(ranked["mean"], reverse=True)
    l, h = top_heads(attr, k=1)[0]
    assert means[l, h] == means.max()
    assert top_heads(attr, k=2, order="smallest")[0] == tuple(divmod(int(means.argmin()), means.shape[1]))
    assert list(rank_heads(attr, position=-2, order="abs")["mean"].abs()) == sorted(
        rank_heads(attr, position=-2)["mean"].abs(), reverse=True)
    # a difference of two attributions (with and without the suffixes), against a brute-force ranking
    diff = attr.heads - direct_attribution(cm, INSTRUCTIONS, unit(cm)).heads  # [prompt, layer, head, eoi]
    assert diff.abs().max() > 1e-4
    by_hand = sorted((float(diff[:, l, h, -2].double().mean()), l, h)
                     for l in range(diff.shape[1]) for h in range(diff.shape[2]))
    got = rank_heads(diff, position=-2, order="smallest")
    assert list(zip(got["layer"], got["head"])) == [(l, h) for _, l, h in by_hand]
    assert list(got["mean"]) == pytest.approx([m for m, _, _ in by_hand], abs=1e-12)
    assert set(attr.frame().columns) == {"prompt", "layer", "head", "position", "projection"}
    with pytest.raises(UserError, match="not an EOI position"):
        rank_heads(attr, position=-99)


def test_a_post_norm_that_is_not_an_rms_norm_is_refused():
    cm = tiny_chat_model("gemma2")
    cm.layers[1].post_attention_layernorm = torch.nn.LayerNorm(cm.d_model)
    with pytest.raises(UserError, match="not an RMSNorm"):
        direct_attribution(cm, INSTRUCTIONS, unit(cm))
    with pytest.raises(UserError, match="not an RMSNorm"):
        attention_hijack(cm, INSTRUCTIONS, layers=[1])
    attention_hijack(cm, INSTRUCTIONS[:1], layers=[0])  # the other layers are fine


# --- per-source writes, dominance -------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma2"])
@torch.no_grad()
def test_source_writes_sum_to_the_attention_output(model_type):
    cm = tiny_chat_model(model_type)
    if model_type != "gemma2":  # through Gemma-2's post-norm the bias is not a constant to subtract
        with_o_proj_bias(cm)
    P = cm.chat.n_eoi
    for ins, suf in zip(INSTRUCTIONS, SUFFIXES):
        plain = record_plain(cm, ["blocks.1.hook_attn_out", "blocks.1.attn.hook_z"], [ins], [suf])
        y, reg = source_writes(cm, ins, 1, suf)  # [n_dest, n_heads, length, d_model]
        assert y.shape == (P, cm.model.config.num_attention_heads, reg.length, cm.d_model)
        torch.testing.assert_close(y.sum((1, 2)), plain["blocks.1.hook_attn_out"][0][-P:] - output_bias(cm, 1),
                                   atol=1e-5, rtol=1e-5)
        y_last, _ = source_writes(cm, ins, 1, suf, destinations="last")
        torch.testing.assert_close(y_last[0], y[-1])
    # z at a destination is the attention-weighted sum of the value vectors (grouped-query heads repeated)
    batch = cm.chat.encode(INSTRUCTIONS, SUFFIXES)
    rec = Recorder(["blocks.2.attn.hook_pattern", "blocks.2.attn.hook_z"], positions=[-3, -1])
    with recording_values(cm, [2]) as values, rec.recording(cm):
        cm.model(**batch, position_ids=position_ids(batch["attention_mask"]))
    a = rec["blocks.2.attn.hook_pattern"]
    torch.testing.assert_close(torch.einsum("bhji,bihd->bjhd", a, values[2]), rec["blocks.2.attn.hook_z"],
                               atol=1e-5, rtol=1e-5)
    # summing per region first is the per-source writes summed over the region
    w = torch.randn(a.shape[1], values[2].shape[-1], 8)
    masks = region_masks(prompt_regions(cm.chat, INSTRUCTIONS, SUFFIXES)).float()
    per_source = per_source_writes(a, values[2], w)  # [batch, n_dest, n_heads, pos, 8]
    torch.testing.assert_close(region_writes(a, values[2], w, masks),
                               torch.einsum("bjhie,bri->bjrhe", per_source, masks), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma2"])
@torch.no_grad()
def test_dominance_mass_and_projection_of_the_regions(model_type):
    cm = with_o_proj_bias(tiny_chat_model(model_type))
    r = unit(cm)
    hj = attention_hijack(cm, INSTRUCTIONS, SUFFIXES, direction=r, batch_size=2)
    n, L, P, R, H = 3, cm.n_layers, cm.chat.n_eoi, len(REGIONS), cm.model.config.num_attention_heads
    assert hj.mass.shape == hj.share.shape == hj.head_dominance.shape == hj.projection.shape == (n, L, P, R, H)
    assert hj.destinations == cm.chat.eoi_positions and hj.layers == list(range(L))
    ones = torch.ones(n, L, P)
    torch.testing.assert_close(hj.dominance.sum(-1), ones, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hj.share.sum((-2, -1)), ones, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hj.head_dominance.sum(-2), torch.ones(n, L, P, H), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hj.mass.sum(-2), torch.ones(n, L, P, H), atol=1e-5, rtol=1e-5)
    suffix = REGIONS.index("suffix")
    assert hj.mass[1, :, :, suffix].abs().max() == 0 and hj.dominance[1, :, :, suffix].abs().max() == 0  # no suffix
    assert hj.mass[0, :, :, suffix].min() > 0
    # projections: per region they add up to the attention write's projection, per source to the region's
    plain = record_plain(cm, hook_names(cm, ["hook_attn_out"]))
    attr = direct_attribution(cm, INSTRUCTIONS, r, SUFFIXES)
    for p in range(n):
        reg = hj.regions[p]
        masks = region_masks([reg])[0].float()  # [n_regions, length]
        for l in range(L):
            y, _ = source_writes(cm, INSTRUCTIONS[p], l, SUFFIXES[p])
            torch.testing.assert_close(hj.projection[p, l], torch.einsum("jhie,ri->jrhe", y, masks) @ r,
                                       atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(hj.write_norm[p, l], y.sum((1, 2)).norm(dim=-1), atol=1e-5, rtol=1e-5)
            # with the bias (through Gemma-2's post-norm at this position's scale) it is hook_attn_out's
            torch.testing.assert_close(hj.projection[p, l].sum((-2, -1)) + attr.attn_bias[p, l],
                                       plain[f"blocks.{l}.hook_attn_out"][p][-P:] @ r, atol=1e-5, rtol=1e-5)
        src = hj.source_projection[p]  # [n_layers, n_dest, n_heads, length]
        assert src.shape == (L, P, H, reg.length)
        torch.testing.assert_close(torch.einsum("ljhi,ri->ljrh", src, masks), hj.projection[p], atol=1e-5, rtol=1e-5)
    # padding changes nothing: one prompt per batch gives the same numbers
    alone = attention_hijack(cm, INSTRUCTIONS, SUFFIXES, direction=r, layers=[2, 0], destinations=[-1, -2], batch_size=1)
    torch.testing.assert_close(alone.share, hj.share[:, [2, 0]][:, :, [-1, -2]], atol=1e-5, rtol=1e-5)
    assert set(alone.frame().columns) == {"prompt", "layer", "destination", "region", "head", "mass", "share",
                                          "head_dominance", "projection"}


def test_hijack_input_errors():
    cm = tiny_chat_model("llama")
    with pytest.raises(UserError, match="destinations must be"):
        attention_hijack(cm, INSTRUCTIONS, destinations=[-99])
    with pytest.raises(UserError, match="layers must be in 0 .. 2"):
        attention_hijack(cm, INSTRUCTIONS, layers=[3])
    with pytest.raises(UserError, match="batch size"):
        attention_hijack(cm, INSTRUCTIONS, batch_size=0)
    hj = attention_hijack(cm, INSTRUCTIONS, "one suffix for all", destinations="last", layers=[1])
    assert hj.projection is None and hj.source_projection is None and hj.mass.shape[:3] == (3, 1, 1)
