"""Shared fixtures: offline tokenizers per template family, tiny random models, the real models."""

from __future__ import annotations

import os
import traceback
import warnings

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import suffix_analysis
from suffix_analysis.models.presets import TEMPLATES

_PACKAGE = os.path.dirname(suffix_analysis.__file__) + os.sep


@pytest.fixture(autouse=True)
def deprecations_caused_by_our_calls_fail(monkeypatch):
    """A FutureWarning/DeprecationWarning raised while one of our modules is on the stack is
    an error, wherever the library attributes it (transformers' ``past_key_values`` notice
    names torch's module-call frame, not ours), so the next one is seen the day it appears."""
    real = warnings.warn

    def warn(message, category=None, stacklevel=1, source=None, **kwargs):
        cat = category or (type(message) if isinstance(message, Warning) else UserWarning)
        if issubclass(cat, (DeprecationWarning, FutureWarning)):
            ours = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(_PACKAGE)]
            if ours:
                raise cat(f"{message} (caused by {ours[-1].filename}:{ours[-1].lineno})")
        return real(message, category, stacklevel + 1, source, **kwargs)

    monkeypatch.setattr(warnings, "warn", warn)

# Special tokens per family, as the real tokenizers name them.
FAMILY_TOKENS = {
    "chatml": dict(bos=None, eos="<|im_end|>", extra=["<|im_start|>"]),
    "llama2": dict(bos="<s>", eos="</s>", extra=[]),
    "llama3": dict(bos="<|begin_of_text|>", eos="<|eot_id|>", extra=["<|start_header_id|>", "<|end_header_id|>"]),
    "gemma": dict(bos="<bos>", eos="<eos>", extra=["<start_of_turn>", "<end_of_turn>"]),
    "mistral": dict(bos="<s>", eos="</s>", extra=["[INST]", "[/INST]"]),
}

_CORPUS = [
    "Write a poem about the sea. I cannot help with that. As an AI, I am sorry.",
    "Explain how plants turn sunlight into sugar. The quick brown fox jumps over the lazy dog.",
    "user assistant system model Give three tips for staying healthy. Sure, here is a plan.",
] * 20


def make_tokenizer(family: str, with_template: bool = True) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer with ``family``'s special tokens and chat template."""
    spec = FAMILY_TOKENS[family]
    specials = [t for t in [spec["bos"], spec["eos"], "<pad>", *spec["extra"]] if t]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(_CORPUS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=spec["bos"], eos_token=spec["eos"],
                                  pad_token="<pad>", additional_special_tokens=spec["extra"])
    if with_template:
        tok.chat_template = TEMPLATES[family]
    return tok


def tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A model folder: tiny random Llama + ChatML tokenizer with template."""
    d = tmp_path_factory.mktemp("tiny_chatml")
    tok = make_tokenizer("chatml")
    tiny_llama(len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_folder_no_template(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_notemplate")
    tok = make_tokenizer("chatml", with_template=False)
    tiny_llama(len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny(tiny_folder):
    from suffix_analysis.models.loading import load_model

    return load_model(str(tiny_folder), device="cpu")


@pytest.fixture(scope="session")
def smollm():
    """The embedded default, loaded once (converted from GGUF once into the cache)."""
    from suffix_analysis.models.loading import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def organism():
    """The refusal organism: the shipped delta merged into its base once per cache (about a minute) and loaded once."""
    from suffix_analysis.models.loading import load_model

    return load_model("smollm2-135m-refusal", device="cpu")


TINY_KW = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=256)


def tiny_chat_model(model_type: str, seed: int = 0, tie: bool = True, **config):
    """A ChatModel around a tiny random model of ``model_type`` with a ChatML tokenizer
    (``config``: more config fields, e.g. ``mlp_bias=True``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from suffix_analysis.models.chat import ChatFormat, refusal_token_ids
    from suffix_analysis.models.loading import ChatModel
    from suffix_analysis.models.presets import arch_for

    tok = make_tokenizer("chatml")
    tok.padding_side = "left"
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tok), tie_word_embeddings=tie, **{**TINY_KW, **config})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # random biases and norm weights, so that every edited tensor matters
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return ChatModel(model=model, tokenizer=tok, chat=ChatFormat.from_tokenizer(tok), name=f"tiny-{model_type}",
                     preset=None, refusal_ids=refusal_token_ids(tok, ("I",)), arch=arch_for(model_type))


def install_plugin(tmp_path, monkeypatch, module: str, source: str, entry_points: str) -> None:
    """A plugin distribution on sys.path: ``module.py`` with ``source``, announcing
    ``entry_points`` (``name = module:Class`` lines) in the group ``suffix_analysis.attacks``."""
    (tmp_path / f"{module}.py").write_text(source)
    dist = tmp_path / f"{module}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[suffix_analysis.attacks]\n{entry_points}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
