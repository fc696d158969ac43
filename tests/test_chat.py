"""Chat templates split around the instruction; EOI tokens land at the same negative
positions in every left-padded row."""

import pytest
import torch
from conftest import make_tokenizer, tiny_llama

from suffix_analysis.errors import UserError
from suffix_analysis.models.chat import ChatFormat, position_ids
from suffix_analysis.models.presets import TEMPLATES

# The post-instruction text each family's template must produce.
EXPECTED_EOI = {
    "chatml": "<|im_end|>\n<|im_start|>assistant\n",
    "llama2": " [/INST] ",
    "llama3": "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "gemma": "<end_of_turn>\n<start_of_turn>model\n",
    "mistral": "[/INST]",
}
EXPECTED_PREFIX = {
    "chatml": "<|im_start|>user\n",
    "llama2": "<s>[INST] ",
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
    "gemma": "<bos><start_of_turn>user\n",
    "mistral": "<s>[INST] ",
}

INSTRUCTIONS = ["Write a poem.", "Explain how plants turn sunlight into sugar, in detail please.", "Hi"]


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_template_split_and_eoi(family):
    tok = make_tokenizer(family)
    fmt = ChatFormat.from_tokenizer(tok)
    assert fmt.eoi == EXPECTED_EOI[family]
    assert fmt.prefix == EXPECTED_PREFIX[family]
    assert tok.decode(fmt.eoi_ids) == fmt.eoi
    assert fmt.eoi_positions == list(range(-len(fmt.eoi_ids), 0))


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_eoi_at_same_negative_positions_in_every_row(family):
    tok = make_tokenizer(family)
    fmt = ChatFormat.from_tokenizer(tok)
    batch = fmt.encode(INSTRUCTIONS, suffixes=[None, "! ! !", None])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    n = fmt.n_eoi
    for row in range(len(INSTRUCTIONS)):
        assert ids[row, -n:].tolist() == fmt.eoi_ids
        real = mask[row].bool()
        # left padding: padding only before the first real token
        first = int(real.nonzero()[0])
        assert real[first:].all() and not real[:first].any()
        assert (ids[row, :first] == tok.pad_token_id).all()
    # the row with the suffix holds it between instruction and EOI
    assert tok.decode(ids[1][mask[1].bool()]).endswith("in detail please. ! ! !" + fmt.eoi)


def test_fallback_template_used_only_without_own():
    tok = make_tokenizer("chatml", with_template=False)
    with pytest.raises(UserError, match="no chat template"):
        ChatFormat.from_tokenizer(tok)
    fmt = ChatFormat.from_tokenizer(tok, TEMPLATES["chatml"])
    assert fmt.eoi == EXPECTED_EOI["chatml"]
    own = make_tokenizer("gemma")
    assert ChatFormat.from_tokenizer(own, TEMPLATES["llama3"]).eoi == EXPECTED_EOI["gemma"]


def test_real_smollm_template(smollm):
    fmt = smollm.chat
    assert fmt.eoi == "<|im_end|>\n<|im_start|>assistant\n"
    assert "You are a helpful AI assistant named SmolLM" in fmt.prefix  # its own template's system prompt
    assert len(fmt.eoi_ids) == 6  # <|im_end|> \n <|im_start|> ass istant \n
    assert smollm.tokenizer.decode(fmt.eoi_ids) == fmt.eoi


@torch.no_grad()
def test_left_padding_matches_unpadded_last_position():
    tok = make_tokenizer("llama3")
    fmt = ChatFormat.from_tokenizer(tok)
    model = tiny_llama(len(tok))
    batch = fmt.encode(INSTRUCTIONS)
    assert (batch["attention_mask"] == 0).any(), "the test needs padded rows"
    out = model(**batch, position_ids=position_ids(batch["attention_mask"]), output_hidden_states=True)
    for i, instr in enumerate(INSTRUCTIONS):
        single = fmt.encode([instr])
        ref = model(**single, output_hidden_states=True)
        for layer in range(len(out.hidden_states)):
            torch.testing.assert_close(out.hidden_states[layer][i, -fmt.n_eoi:],
                                       ref.hidden_states[layer][0, -fmt.n_eoi:], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.logits[i, -1], ref.logits[0, -1], atol=1e-5, rtol=1e-4)


def test_position_ids_start_at_first_real_token():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
