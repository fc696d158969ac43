"""Directional ablation and activation addition hooks on tiny random models."""

import pytest
import torch

from suffix_analysis.directions.extract import diff_in_means, mean_resid_pre
from suffix_analysis.errors import UserError
from suffix_analysis.interventions.directional import ablate_direction, add_direction
from suffix_analysis.models.chat import position_ids
from suffix_analysis.models.hooks import Recorder, hook_names

PROMPTS = ["Say hi.", "Write a poem about the sea.", "Explain how plants turn sunlight into sugar."]


def _resid(cm, prompts):
    batch = cm.chat.encode(prompts)
    with torch.no_grad():
        out = cm.model(**batch, position_ids=position_ids(batch["attention_mask"]), output_hidden_states=True)
    return out, batch


def test_ablation_removes_direction_everywhere(tiny):
    torch.manual_seed(0)
    r = torch.randn(tiny.d_model)
    unit = r / r.norm()
    out, batch = _resid(tiny, PROMPTS)
    assert (out.hidden_states[1] @ unit).abs().max() > 1e-2  # the direction is present without the hook
    with ablate_direction(tiny, r):
        ab, _ = _resid(tiny, PROMPTS)
    mask = batch["attention_mask"].bool()
    # hidden_states[l] is resid_pre of layer l (l < n_layers), last one is after the final norm
    for l in range(tiny.n_layers):
        assert (ab.hidden_states[l][mask] @ unit).abs().max() < 1e-4, l
    again, _ = _resid(tiny, PROMPTS)  # hooks are gone after the block
    torch.testing.assert_close(again.logits, out.logits)


def test_ablation_holds_during_generation(tiny):
    torch.manual_seed(1)
    r = torch.randn(tiny.d_model)
    batch = tiny.chat.encode(PROMPTS[:2])
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=tiny.tokenizer.pad_token_id)
    rec = Recorder(["blocks.1.hook_resid_pre"], positions=[-1])  # registered after the ablation: sees its result
    with ablate_direction(tiny, r), rec.recording(tiny):
        tiny.model.generate(**batch, **kw)
    unit = r / r.norm()
    assert rec.count == 2 * 5  # two rows: prompt pass + 4 cached decoding steps
    assert float((rec["blocks.1.hook_resid_pre"] @ unit).abs().max()) < 1e-4


def _capture_resid_pre(cm, prompts):
    """resid_pre of every layer as the layer sees it (after hooks registered earlier)."""
    rec = Recorder(hook_names(cm, ["hook_resid_pre"]))
    with rec.recording(cm):
        logits = _resid(cm, prompts)[0].logits
    return {l: rec[f"blocks.{l}.hook_resid_pre"] for l in range(cm.n_layers)}, logits


def test_addition_shifts_resid_pre_of_its_layer_only(tiny):
    r = torch.zeros(tiny.d_model)
    r[3] = 5.0
    clean, clean_logits = _capture_resid_pre(tiny, PROMPTS)
    with add_direction(tiny, r, layer=1, coeff=2.0):
        added, logits = _capture_resid_pre(tiny, PROMPTS)
    torch.testing.assert_close(added[0], clean[0])
    torch.testing.assert_close(added[1], clean[1] + 2.0 * r)
    assert not torch.allclose(logits, clean_logits)


def test_wrong_width_and_nan_directions(tiny):
    with pytest.raises(UserError, match="width 64"):
        with ablate_direction(tiny, torch.ones(65)):
            pass
    with pytest.raises(UserError, match="NaN"):
        with add_direction(tiny, torch.full((64,), float("nan")), layer=0):
            pass
    with pytest.raises(UserError, match="out of range"):
        with add_direction(tiny, torch.ones(64), layer=7):
            pass


def test_diff_in_means_matches_stored_activations(tiny):
    harmful, harmless = PROMPTS[:2], PROMPTS[1:]
    cands = diff_in_means(tiny, harmful, harmless, batch_size=1)
    assert cands.shape == (tiny.chat.n_eoi, tiny.n_layers, tiny.d_model) and cands.dtype == torch.float64

    def naive(prompts):
        acc = []
        for p in prompts:
            out, _ = _resid(tiny, [p])
            acc.append(torch.stack([out.hidden_states[l][0, -tiny.chat.n_eoi:] for l in range(tiny.n_layers)], 1))
        return torch.stack(acc).double().mean(0)

    torch.testing.assert_close(cands, naive(harmful) - naive(harmless), atol=1e-5, rtol=1e-4)
    # batching does not change the means
    torch.testing.assert_close(mean_resid_pre(tiny, PROMPTS, batch_size=3), mean_resid_pre(tiny, PROMPTS, batch_size=2),
                               atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_bridge_hooks_match_plain_model_hooks(tiny_folder):
    from suffix_analysis.interventions.directional import ablation_hooks, addition_hooks
    from suffix_analysis.models.loading import load_model, to_bridge

    cm = load_model(str(tiny_folder), device="cpu")
    torch.manual_seed(2)
    r = torch.randn(cm.d_model)
    batch = cm.chat.encode(["Write a poem about the sea."])  # one row: no padding to mask
    with ablate_direction(cm, r):
        ablated = cm.model(**batch).logits
    with add_direction(cm, r, layer=1, coeff=1.5):
        added = cm.model(**batch).logits
    clean = cm.model(**batch).logits
    bridge = to_bridge(cm)
    ids = batch["input_ids"]
    torch.testing.assert_close(bridge(ids), clean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(bridge.run_with_hooks(ids, fwd_hooks=ablation_hooks(cm, r)), ablated,
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(bridge.run_with_hooks(ids, fwd_hooks=addition_hooks(cm, r, 1, 1.5)), added,
                               atol=1e-5, rtol=1e-4)
    assert (ablated - clean).abs().max() > 1e-3 and (added - clean).abs().max() > 1e-3
