"""The hook vocabulary: TransformerLens names on the plain transformers model give the
activations TransformerLens itself gives, per architecture family; hooks replace what
they return; bad names and bad returns are clear errors."""

import pytest
import torch
from conftest import tiny_chat_model

from suffix_analysis.errors import UserError
from suffix_analysis.interventions.directional import ablation_hooks, addition_hooks
from suffix_analysis.models.hooks import SITES, Recorder, hook_names, hook_point, run_with_hooks
from suffix_analysis.models.loading import to_bridge

# The families the suite supports whose architecture TransformerLens's bridge knows.
FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2"]
PROMPTS = ["Write a poem about the sea.", "Say hi."]


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_every_hook_matches_the_transformer_lens_bridge(family):
    cm = tiny_chat_model(family)
    cm.model.set_attn_implementation("eager")
    ids = cm.chat.encode(PROMPTS[:1])["input_ids"]  # one row: nothing to pad or mask
    names = hook_names(cm)
    plain = Recorder(names)
    with plain.recording(cm):
        logits = cm.model(input_ids=ids).logits
    # head 1 of layer 1 knocked out through its z
    knocked_hook = [("blocks.1.attn.hook_z", lambda z, hook: torch.cat([z[:, :, :1], 0 * z[:, :, 1:2], z[:, :, 2:]], 2))]
    with run_with_hooks(cm, knocked_hook):
        knocked = cm.model(input_ids=ids).logits
    r = torch.randn(cm.d_model, generator=torch.Generator().manual_seed(1))
    with run_with_hooks(cm, ablation_hooks(cm, r) + addition_hooks(cm, r, 1, 2.0)):
        steered = cm.model(input_ids=ids).logits

    bridge = to_bridge(cm)
    lens = Recorder(names)
    torch.testing.assert_close(bridge.run_with_hooks(ids, fwd_hooks=lens.hooks()), logits, atol=1e-4, rtol=1e-4)
    for name in names:
        torch.testing.assert_close(plain[name], lens[name], atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(bridge.run_with_hooks(ids, fwd_hooks=knocked_hook), knocked, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bridge.run_with_hooks(ids, fwd_hooks=ablation_hooks(cm, r) + addition_hooks(cm, r, 1, 2.0)),
                               steered, atol=1e-4, rtol=1e-4)
    assert (knocked - logits).abs().max() > 1e-4 and (steered - logits).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3_text"])
@torch.no_grad()
def test_hooks_decompose_the_residual_stream(family):
    """resid_mid = resid_pre + attn_out, resid_post = resid_mid + mlp_out = next resid_pre;
    attention rows sum to one; z through W_O is the attention output (before any post-norm)."""
    cm = tiny_chat_model(family)
    batch = cm.chat.encode(PROMPTS)
    rec = Recorder(hook_names(cm))
    with rec.recording(cm):
        cm.model(**batch)
    for l in range(cm.n_layers):
        b = f"blocks.{l}."
        torch.testing.assert_close(rec[b + "hook_resid_mid"], rec[b + "hook_resid_pre"] + rec[b + "hook_attn_out"])
        torch.testing.assert_close(rec[b + "hook_resid_post"], rec[b + "hook_resid_mid"] + rec[b + "hook_mlp_out"])
        if l + 1 < cm.n_layers:
            torch.testing.assert_close(rec[b + "hook_resid_post"], rec[f"blocks.{l + 1}.hook_resid_pre"])
        pattern = rec[b + "attn.hook_pattern"]  # [batch, heads, q, k]
        assert pattern.shape[:2] == (2, cm.model.config.num_attention_heads)
        torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]))
        z = rec[b + "attn.hook_z"]  # [batch, pos, heads, d_head]
        o_proj = cm.layers[l].self_attn.o_proj
        if not cm.arch.post_norm_writers:
            torch.testing.assert_close(o_proj(z.flatten(2)), rec[b + "hook_attn_out"], atol=1e-5, rtol=1e-4)
    assert cm.model.config._attn_implementation != "eager" or family == "gemma2"  # switched back after the patterns


@torch.no_grad()
def test_recorder_positions_sums_and_activity():
    cm = tiny_chat_model("llama")
    names = ["blocks.0.hook_resid_pre", "blocks.2.attn.hook_z", "blocks.1.attn.hook_pattern"]
    everything, eoi, summed = Recorder(names), Recorder(names, [-2, -1]), Recorder(names[:2], [-2, -1], reduce="sum")
    batch = cm.chat.encode(PROMPTS)
    with run_with_hooks(cm, everything.hooks() + eoi.hooks() + summed.hooks()):
        cm.model(**batch)
        summed.active = False  # not recorded
        cm.model(**batch)
    assert everything.count == 4 and eoi.count == 4 and summed.count == 2
    full = everything["blocks.0.hook_resid_pre"][:2]
    torch.testing.assert_close(eoi["blocks.0.hook_resid_pre"][:2], full[:, -2:])
    torch.testing.assert_close(eoi["blocks.1.attn.hook_pattern"][:2], everything["blocks.1.attn.hook_pattern"][:2, :, -2:])
    torch.testing.assert_close(summed.mean("blocks.2.attn.hook_z").float(),
                               everything["blocks.2.attn.hook_z"][:2, -2:].mean(0), atol=1e-6, rtol=1e-5)
    assert summed["blocks.2.attn.hook_z"].dtype == torch.float64


def test_bad_names_and_bad_returns_are_clear_errors():
    cm = tiny_chat_model("llama")
    ids = cm.chat.encode(PROMPTS[:1])["input_ids"]
    with pytest.raises(UserError, match="unknown hook name 'blocks.0.resid'"):
        hook_point(cm, "blocks.0.resid")
    with pytest.raises(UserError, match="layer 7 out of range for a model with 3 layers"):
        hook_point(cm, "blocks.7.hook_resid_pre")
    with pytest.raises(UserError, match="returned shape"):
        with run_with_hooks(cm, [("blocks.0.hook_mlp_out", lambda x, hook: x[:, :1])]):
            cm.model(input_ids=ids)
    with pytest.raises(UserError, match="read-only"):
        with run_with_hooks(cm, [("blocks.0.attn.hook_pattern", lambda x, hook: x * 0)]):
            cm.model(input_ids=ids)
    # name filters expand to every matching hook, as in TransformerLens; all hooks leave on exit
    seen = []
    with run_with_hooks(cm, [(lambda n: n.endswith("hook_mlp_out"), lambda x, hook: seen.append(hook.name))]):
        cm.model(input_ids=ids)
    assert seen == [f"blocks.{l}.hook_mlp_out" for l in range(3)]
    cm.model(input_ids=ids)
    assert len(seen) == 3 and len(SITES) == 7
