"""Presets, loading, fingerprints and the TransformerLens bridge."""

import pytest
import torch

from suffix_analysis.errors import UserError
from suffix_analysis.models.loading import load_model, resolve, to_bridge
from suffix_analysis.models.presets import ARCHS, PRESETS, TEMPLATES, arch_for

PAPER_MODELS = ["qwen-1.8b-chat", "qwen-7b-chat", "qwen-14b-chat", "qwen-72b-chat", "yi-6b-chat", "yi-34b-chat",
                "gemma-2b-it", "gemma-7b-it", "llama-2-7b-chat", "llama-2-13b-chat", "llama-2-70b-chat",
                "llama-3-8b-instruct", "llama-3-70b-instruct"]


def test_presets_cover_paper_and_current_families():
    for name in PAPER_MODELS:
        assert name in PRESETS
    for prefix in ("llama-3.1", "llama-3.2", "qwen2.5", "qwen3", "gemma-2", "gemma-3", "mistral"):
        assert any(n.startswith(prefix) for n in PRESETS), prefix
    for p in PRESETS.values():
        assert p.template in TEMPLATES and p.refusal_tokens
    assert PRESETS["qwen-1.8b-chat"].refusal_tokens == ("I", "As")
    assert PRESETS["llama-3-8b-instruct"].paper_direction == (-5, 12)


def test_arch_map():
    assert arch_for("llama").attn_out == "self_attn.o_proj"
    assert arch_for("gemma2").post_norm_writers
    with pytest.raises(UserError, match="no module map"):
        arch_for("bert")
    assert set(ARCHS) >= {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "qwen"}


def test_remote_code_preset_needs_consent():
    with pytest.raises(UserError, match="--trust-remote-code"):
        resolve("qwen-1.8b-chat")
    assert resolve("qwen-1.8b-chat", trust_remote_code=True)[0] == "Qwen/Qwen-1_8B-chat"
    loc, pre = resolve("meta-llama/Meta-Llama-3-8B-Instruct")
    assert pre.name == "llama-3-8b-instruct"


def test_load_folder(tiny, tiny_folder):
    assert tiny.n_layers == 2 and tiny.d_model == 64
    assert tiny.chat.eoi == "<|im_end|>\n<|im_start|>assistant\n"
    assert tiny.tokenizer.padding_side == "left"
    assert tiny.fingerprint() == load_model(str(tiny_folder), device="cpu").fingerprint()


def test_fingerprint_tells_weights_apart(tmp_path, tiny):
    from conftest import make_tokenizer, tiny_llama

    tok = make_tokenizer("chatml")
    tiny_llama(len(tok), seed=1).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert load_model(str(tmp_path), device="cpu").fingerprint() != tiny.fingerprint()


@torch.no_grad()
def test_bridge_same_logits_and_hook_names(tiny_folder):
    cm = load_model(str(tiny_folder), device="cpu")
    batch = cm.chat.encode(["Say hi.", "Write a poem about the sea."])
    ref = cm.model(**batch).logits
    bridge = to_bridge(cm)
    logits, cache = bridge.run_with_cache(batch["input_ids"], attention_mask=batch["attention_mask"])
    real = batch["attention_mask"].bool()  # padded positions hold nothing meaningful
    assert (~real).any()
    torch.testing.assert_close(logits[real], ref[real], atol=1e-5, rtol=1e-4)
    for name in ("blocks.0.hook_resid_pre", "blocks.1.attn.hook_z", "blocks.1.attn.hook_pattern",
                 "blocks.0.hook_attn_out", "blocks.0.hook_mlp_out"):
        assert name in cache, name


def test_default_model_loads(smollm):
    assert smollm.n_layers == 30 and smollm.d_model == 576
    assert smollm.model.config.model_type == "llama"
    assert [smollm.tokenizer.decode([i]) for i in smollm.refusal_ids] == ["I", "As"]
