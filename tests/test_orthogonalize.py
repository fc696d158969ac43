"""Weight orthogonalization equals hook ablation, and the export loads in transformers."""

import copy

import pytest
import torch
from conftest import tiny_chat_model
from transformers import AutoModelForCausalLM

from suffix_analysis.errors import UserError
from suffix_analysis.interventions.directional import ablate_direction
from suffix_analysis.interventions.orthogonalize import export_orthogonalized, orthogonalize_
from suffix_analysis.models.chat import position_ids

PROMPTS = ["Say hi.", "Write a poem about the sea.", "Explain how plants turn sunlight into sugar."]


def _logits(model, cm):
    batch = cm.chat.encode(PROMPTS)
    with torch.no_grad():
        out = model(**batch, position_ids=position_ids(batch["attention_mask"])).logits
    return out[batch["attention_mask"].bool()]


@pytest.mark.parametrize("model_type,tie", [("llama", True), ("llama", False), ("mistral", False),
                                            ("qwen2", False), ("qwen3", True), ("gemma", True)])
def test_orthogonalized_equals_ablated(tmp_path, model_type, tie):
    cm = tiny_chat_model(model_type, tie=tie)
    torch.manual_seed(1)
    r = torch.randn(cm.d_model)
    with ablate_direction(cm, r):
        ablated = _logits(cm.model, cm)
    clean = _logits(cm.model, cm)
    edited = copy.deepcopy(cm)
    out = export_orthogonalized(edited, r, tmp_path / "ortho", {"test": True})
    assert (clean - ablated).abs().max() > 1e-3  # the direction matters
    torch.testing.assert_close(_logits(edited.model, cm), ablated, atol=1e-4, rtol=1e-4)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(reloaded, cm), ablated, atol=1e-4, rtol=1e-4)
    # the unembedding reads the residual stream and must not have been edited
    torch.testing.assert_close(reloaded.get_output_embeddings().weight, cm.model.get_output_embeddings().weight)
    assert [p.name for p in out.parent.iterdir()] == ["ortho"]  # no temporary sibling left behind


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    cm = tiny_chat_model("llama")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(cm.model, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        export_orthogonalized(cm, torch.ones(cm.d_model), tmp_path / "ortho", {})
    assert list(tmp_path.iterdir()) == []


def test_post_norm_architectures_are_refused():
    cm = tiny_chat_model("gemma2")
    with pytest.raises(UserError, match="inference-time ablation"):
        orthogonalize_(cm, torch.ones(cm.d_model))


def test_wrong_width_direction_is_refused(tmp_path):
    cm = tiny_chat_model("llama")
    with pytest.raises(UserError, match="width 64"):
        export_orthogonalized(cm, torch.ones(65), tmp_path / "x", {})
    assert not (tmp_path / "x").exists()
