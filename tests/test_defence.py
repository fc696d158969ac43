"""Hijacking suppression: the shares it reads, the edit it makes (checked against a naive
per-head, per-source sum), calibration on clean prompts, and bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_chat_model

from suffix_analysis.attribution.writers import head_weights, recording_values
from suffix_analysis.defences.suppression import (
    Suppression,
    SuppressionConfig,
    calibrate,
    shares,
    suppressing,
    user_start,
)
from suffix_analysis.errors import UserError
from suffix_analysis.models.chat import position_ids
from suffix_analysis.models.hooks import Recorder, run_with_hooks

PROMPTS = ["Write a poem about the sea.", "Say hi to me please now."]


def test_shares_of_all_sources_sum_to_one():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(2, 4, 6, 6, generator=gen).softmax(-1)
    v, w = torch.randn(2, 6, 4, 8, generator=gen), torch.randn(4, 8, 16, generator=gen)
    s = shares(a, v, w, n_dest=3)
    assert s.shape == (2, 3, 6) and torch.allclose(s.sum(-1), torch.ones(2, 3), atol=1e-4)


def _pass(cm, defence=None, layer=1):
    """Logits, and the layer's pattern, values and attention output, of one pass."""
    batch = cm.chat.encode(PROMPTS, device=cm.device)
    # hook_resid_mid = hook_resid_pre + the attention output as the residual stream receives it
    rec = Recorder([f"blocks.{layer}.attn.hook_pattern", f"blocks.{layer}.hook_resid_mid"])
    with torch.no_grad(), recording_values(cm, [layer]) as values:
        if defence is None:
            with run_with_hooks(cm, rec.hooks()):
                logits = cm.model(**batch).logits
        else:
            seen = {}
            with suppressing(cm, defence, observe=seen), run_with_hooks(cm, rec.hooks()):
                logits = cm.model(**batch).logits
            return logits, rec, values[layer].clone(), batch, seen
    return logits, rec, values[layer].clone(), batch, None


def test_nothing_dominating_changes_nothing():
    cm = tiny_chat_model("llama")
    clean, *_ = _pass(cm)
    defended, *_ = _pass(cm, Suppression({0: float("inf"), 1: float("inf")}, rule="layer"))
    assert torch.equal(clean, defended)


def test_the_edit_is_the_dominating_tokens_writes_scaled_down():
    cm = tiny_chat_model("llama")
    layer, n = cm.n_layers - 1, cm.chat.n_eoi
    _, rec0, v, batch, _ = _pass(cm, layer=layer)
    a = rec0[f"blocks.{layer}.attn.hook_pattern"]  # [b, h, q, k], clean (layers below are not defended)
    clean_out = rec0[f"blocks.{layer}.hook_resid_mid"]
    defence = Suppression({layer: 0.02}, scale=0.25, rule="layer")
    _, rec1, _, _, seen = _pass(cm, defence, layer=layer)
    out = rec1[f"blocks.{layer}.hook_resid_mid"]
    hit = seen[layer]["hit"][:, 0]  # [b, j, k]: the layer rule hits every head alike
    assert hit.any() and not hit.all()
    # only the user's message is ever suppressed, never the template before it or padding
    mask = batch["attention_mask"]
    start = user_start(cm)
    for b in range(len(PROMPTS)):
        pad = int((mask[b] == 0).sum())
        cols = hit[b].any(0).nonzero().flatten().tolist()
        assert all(pad + start <= c < mask.shape[1] - n for c in cols)
    w = head_weights(cm, layer)
    want = clean_out.clone()
    for b in range(len(PROMPTS)):
        for j in range(n):
            for i in hit[b, j].nonzero().flatten().tolist():
                for h in range(w.shape[0]):  # naive: each head's write from each dominating source
                    want[b, a.shape[2] - n + j] -= 0.75 * a[b, h, a.shape[2] - n + j, i] * (v[b, i, h] @ w[h])
    assert torch.allclose(out, want, atol=1e-5)
    assert torch.equal(out[:, :-n], clean_out[:, :-n])  # rows before the EOI positions are untouched


@pytest.mark.parametrize("rule", ["head", "layer"])
def test_generation_runs_defended_and_calibration_rarely_touches_clean_prompts(rule):
    cm = tiny_chat_model("llama")
    words = ["sea", "river bank", "old mountain path", "a cat", "green tea leaves", "the moon tonight", "bread",
             "winter coats for children", "maps", "a short poem about rain"]
    # varied prompts: near-identical ones would tie at the quantile and flip on float noise
    clean = [f"Tell me about {w}." for w in words] + [f"Please list {i + 2} facts on {w}, briefly" for i, w in
                                                      enumerate(words)]
    d = calibrate(cm, clean, layers=[0, 1], quantile=0.9, scale=0.1, batch_size=8, rule=rule)
    assert set(d.thresholds) == {0, 1} and d.record["n_calibration"] == 20 and d.rule == rule
    for layer in (0, 1):
        seen = {}
        batch = cm.chat.encode(clean, device=cm.device)
        with torch.no_grad(), suppressing(cm, d, observe=seen):
            cm.model(**batch, position_ids=position_ids(batch["attention_mask"]))
        touched = seen[layer]["hit"].any(-1).any(-1).float().mean(0)  # per head (per layer: one column)
        assert (touched <= 0.1 + 1e-6).all()  # at most the quantile's tail of the prompts it was made from
    batch = cm.chat.encode(PROMPTS, device=cm.device)
    with suppressing(cm, d):
        out = cm.model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3
    again = Suppression.from_dict(d.to_dict())
    assert again.thresholds == d.thresholds and again.rule == rule


def test_the_head_rule_scales_each_head_on_its_own_spans():
    """Per head: only the heads whose attention mass on a span is above their threshold lose
    that span's write; checked against a naive sum."""
    cm = tiny_chat_model("llama")
    layer, n = cm.n_layers - 1, cm.chat.n_eoi
    heads = cm.model.config.num_attention_heads
    _, rec0, v, batch, _ = _pass(cm, layer=layer)
    a, clean_out = rec0[f"blocks.{layer}.attn.hook_pattern"], rec0[f"blocks.{layer}.hook_resid_mid"]
    defence = Suppression({layer: [0.05] * (heads - 1) + [2.0]}, scale=0.0, rule="head", window=2)
    _, rec1, _, _, seen = _pass(cm, defence, layer=layer)
    hit = seen[layer]["hit"]  # [b, h, j, k]
    assert hit[:, : heads - 1].any() and not hit[:, heads - 1].any()  # the last head's threshold is never reached
    mass = seen[layer]["shares"]  # [b, h, j, k]: attention mass on user tokens
    for b, h, j, i in hit.nonzero().tolist():  # every hit token is in a 2-token span with mass > 0.05
        near = [mass[b, h, j, i - 1] + mass[b, h, j, i], mass[b, h, j, i] + mass[b, h, j, i + 1]]
        assert max(torch.nan_to_num(x, nan=-1.0) for x in near) > 0.05
    w = head_weights(cm, layer)
    want = clean_out.clone()
    q = a.shape[2]
    for b, h, j, i in hit.nonzero().tolist():
        want[b, q - n + j] -= a[b, h, q - n + j, i] * (v[b, i, h] @ w[h])
    assert torch.allclose(rec1[f"blocks.{layer}.hook_resid_mid"], want, atol=1e-5)


@pytest.mark.parametrize("kw, match", [({"threshold": 1.5}, r"in \(0, 1\]"), ({"threshold": -0.1}, r"in \(0, 1\]"),
                                        ({"scale": 1.0}, "scale must be"), ({"quantile": 1.0}, "quantile")])
def test_bad_settings(kw, match):
    with pytest.raises(UserError, match=match):
        SuppressionConfig(**kw).validate()


def test_models_it_cannot_defend_are_refused_in_one_line():
    gemma = tiny_chat_model("gemma2")
    with pytest.raises(UserError, match="pre-norm models"):
        with suppressing(gemma, Suppression({0: 0.5})):
            pass


def test_span_shares_sum_consecutive_user_tokens():
    from suffix_analysis.defences.suppression import span_shares

    s = torch.tensor([[[0.1, 0.2, 0.3, 0.05, 0.4, 0.6]]])
    user = torch.tensor([[[False, True, True, True, True, False]]])
    spans, cover = span_shares(s, user, 2)
    inf = float("-inf")
    assert spans[0, 0].tolist() == pytest.approx([inf, 0.5, 0.35, 0.45, inf, inf])  # spans inside the message only
    assert cover[0, 0].tolist() == pytest.approx([inf, 0.5, 0.5, 0.45, 0.45, inf])  # a token's largest covering span
    one, _ = span_shares(s, user, 1)
    assert one[0, 0, 1:5].tolist() == pytest.approx([0.2, 0.3, 0.05, 0.4]) and one[0, 0, 0] == inf


def test_a_model_without_attention_probabilities_is_refused():
    import copy
    import dataclasses

    from suffix_analysis.defences.suppression import check_model

    cm = copy.copy(tiny_chat_model("llama"))
    cm.arch = dataclasses.replace(cm.arch, pattern_output=None)  # as Qwen-1's remote code
    with pytest.raises(UserError, match="does not return its probabilities"):
        check_model(cm)


def _scores(cm, defence, n=4):
    batch = cm.chat.encode(PROMPTS, device=cm.device)
    with torch.no_grad(), suppressing(cm, defence):
        out = cm.model.generate(**batch, max_new_tokens=n, do_sample=False, output_scores=True,
                                return_dict_in_generate=True, pad_token_id=cm.tokenizer.pad_token_id)
    return torch.stack(out.scores, 1)  # [b, n, vocab]: the logits of each generated token


def test_generated_tokens_are_defended_with_their_own_thresholds():
    cm = tiny_chat_model("llama")
    layers, heads = [0, 1], cm.model.config.num_attention_heads
    clean = ["Tell me about the sea.", "Please list 3 facts on maps, briefly", "Name a green thing now.",
             "Write about old mountain paths."]
    d = calibrate(cm, clean, layers=layers, batch_size=2, window=2, rule="head", generate_tokens=3)
    assert d.generated is not None and set(d.generated) == set(layers)
    assert all(len(t) == heads and all(-1 <= x <= 1 for x in t) for t in d.generated.values())
    assert Suppression.from_dict(d.to_dict()).generated == d.generated
    eoi_only = Suppression(d.thresholds, scale=0.0, window=2, rule="head")
    never = Suppression(d.thresholds, scale=0.0, window=2, rule="head",
                        generated={l: [float("inf")] * heads for l in layers})
    always = Suppression(d.thresholds, scale=0.0, window=2, rule="head", generated={l: [0.0] * heads for l in layers})
    base = _scores(cm, eoi_only)
    assert torch.equal(_scores(cm, never), base)  # thresholds never reached: the EOI-only defence
    hit = _scores(cm, always)
    assert torch.equal(hit[:, 0], base[:, 0])  # the first token comes from the prompt's pass, defended alike
    assert not torch.allclose(hit[:, 1:], base[:, 1:], atol=1e-4)  # later tokens lose what they read from the user


@pytest.mark.parametrize("rule", ["head", "layer"])
def test_spans_flagged_at_the_eoi_rows_persist_into_the_answer(rule):
    """``persist``: the sources hit at the EOI rows stay scaled in the generated tokens' rows;
    with nothing hit there, it is the EOI-only defence."""
    cm = tiny_chat_model("llama")
    heads = cm.model.config.num_attention_heads

    def th(x):
        return {l: [x] * heads if rule == "head" else x for l in (0, 1)}

    eoi_only = _scores(cm, Suppression(th(0.02), scale=0.0, window=2, rule=rule))
    held = _scores(cm, Suppression(th(0.02), scale=0.0, window=2, rule=rule, persist=True))
    assert torch.equal(held[:, 0], eoi_only[:, 0])  # the first token: the prompt's pass, defended alike
    assert not torch.allclose(held[:, 1:], eoi_only[:, 1:], atol=1e-4)  # later rows lose the flagged spans too
    nothing = th(float("inf"))
    assert torch.equal(_scores(cm, Suppression(nothing, scale=0.0, window=2, rule=rule, persist=True)),
                       _scores(cm, Suppression(nothing, scale=0.0, window=2, rule=rule)))
    assert Suppression.from_dict(Suppression(th(0.5), persist=True, rule=rule).to_dict()).persist


@pytest.mark.parametrize("rule,persist", [("head", False), ("layer", False), ("head", True), ("layer", True)])
def test_a_teacher_forced_continuation_is_defended_as_generation_is(rule, persist):
    """Scoring prompt + continuation in one pass with ``prompt_len`` gives the logits that
    generating the continuation step by step gives, defence included (the attacker's view):
    with thresholds of the generated rows, or with the EOI rows' spans persisting."""
    cm = tiny_chat_model("llama")
    heads = cm.model.config.num_attention_heads
    low = [0.02] * heads if rule == "head" else 0.02
    d = Suppression({0: low, 1: low}, scale=0.0, window=2, rule=rule,
                    generated=None if persist else {0: low, 1: low}, persist=persist)
    batch = cm.chat.encode(PROMPTS, device=cm.device)
    with torch.no_grad(), suppressing(cm, d):
        out = cm.model.generate(**batch, max_new_tokens=4, do_sample=False, output_scores=True,
                                return_dict_in_generate=True, pad_token_id=cm.tokenizer.pad_token_id)
    stepped = torch.stack(out.scores, 1)  # [b, 4, vocab]
    n = batch["input_ids"].shape[1]
    mask = torch.cat([batch["attention_mask"], torch.ones(len(PROMPTS), 3, dtype=torch.long)], 1)
    seen = {}
    with torch.no_grad(), suppressing(cm, d, observe=seen, prompt_len=n):
        forced = cm.model(input_ids=out.sequences[:, : n + 3], attention_mask=mask,
                          position_ids=position_ids(mask)).logits[:, n - 1:]
    assert seen[1]["hit"].any()  # the defence acted
    assert torch.allclose(forced, stepped, atol=1e-4)
    with pytest.raises(UserError, match="does not fit"), suppressing(cm, d, prompt_len=n + 10):
        cm.model(**batch)


def test_the_adaptive_attacker_lowers_its_loss_through_the_defence():
    from suffix_analysis.attacks.defended import DefendedGCGConfig, _Layout, defended_loss, run_defended_gcg

    cm = tiny_chat_model("llama")
    heads = cm.model.config.num_attention_heads
    low = [0.05] * heads
    d = Suppression({0: low, 1: low}, scale=0.0, window=2, rule="head", generated={0: low, 1: low})
    instructions, targets = PROMPTS, ["Sure, here it is", "Hello to you"]
    grads = [p.requires_grad for p in cm.model.parameters()]
    res = run_defended_gcg(cm, d, instructions, targets, "one two three four",
                           DefendedGCGConfig(num_steps=3, search_width=16, topk=8), progress=False)
    assert len(res.losses) == 3 and min(res.losses) < res.initial_loss
    layouts = [_Layout(cm, i, t) for i, t in zip(instructions, targets)]
    ids = torch.tensor([res.suffix_ids])
    found = defended_loss(cm, d, layouts, ids)
    assert found.item() == pytest.approx(min(res.losses), rel=1e-4)  # the kept suffix scores what the search saw
    assert not torch.allclose(found, defended_loss(cm, None, layouts, ids))  # the defence is in the loss
    assert [p.requires_grad for p in cm.model.parameters()] == grads  # restored as they were
    with pytest.raises(UserError, match="one target each"):
        run_defended_gcg(cm, d, instructions, targets[:1], "x", progress=False)


def test_completion_ce_under_the_defence():
    """The defended CE scores each response in one teacher-forced pass: with thresholds never
    reached it is the plain CE; with low ones it differs. A pass after a cached prefix (the
    plain CE's) runs undefended rather than misplacing the user's message."""
    from suffix_analysis.defences.suppression import completion_ce
    from suffix_analysis.evaluation.loss import completion_ce as plain_ce

    cm = tiny_chat_model("llama")
    heads = cm.model.config.num_attention_heads
    answers = ["The sea is wide and deep.", "Hi there, friend"]
    never = Suppression({0: [float("inf")] * heads, 1: [float("inf")] * heads}, rule="head", window=2)
    low = Suppression({0: [0.02] * heads, 1: [0.02] * heads}, scale=0.0, rule="head", window=2,
                      generated={0: [0.02] * heads, 1: [0.02] * heads})
    base = plain_ce(cm, PROMPTS, answers)
    assert completion_ce(cm, never, PROMPTS, answers) == pytest.approx(base, rel=1e-4)
    assert completion_ce(cm, low, PROMPTS, answers) != pytest.approx(base, rel=1e-3)
    with suppressing(cm, low):
        assert plain_ce(cm, PROMPTS, answers) == pytest.approx(base, rel=1e-5)
