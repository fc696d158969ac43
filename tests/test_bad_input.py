"""Bad files given to the commands: each ends in one line that names the file and the fix,
exit code 2, no traceback, and nothing written."""

import json
import shutil

import pytest
import torch
from conftest import make_tokenizer, tiny_llama

from suffix_analysis.cli import main
from suffix_analysis.errors import UserError


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str, *needles: str):
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def instructions(tmp_path):
    f = tmp_path / "i.json"
    f.write_text(json.dumps(["Write a poem about the sea.", "Say hi."]))
    return f


# --- 1. a .gguf file that is not one ------------------------------------------------------------

@pytest.mark.parametrize("content", [b"not a gguf file at all", b"GGUF\x03\x00\x00\x00\x02\x00"],
                         ids=["garbage", "truncated-header"])
def test_invalid_gguf_is_one_line_error(capsys, tmp_path, monkeypatch, instructions, content):
    monkeypatch.setenv("SUFFIX_ANALYSIS_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "model.gguf"
    bad.write_bytes(content)
    code, _, err = run(capsys, "refusal", "--model", bad, "--instructions", instructions)
    assert code == 2
    one_line_error(err, str(bad), "as a GGUF model", "download it again")
    assert not (tmp_path / "cache").exists()  # nothing converted, nothing left behind


# --- 2. the suite's own marker file, corrupt -------------------------------------------------------

@pytest.mark.parametrize("content", [b'{"preset": "smollm2-1', b"[1, 2]", b"\xff\xfe\x00garbage"],
                         ids=["truncated", "not-an-object", "not-utf8"])
def test_corrupt_marker_file_is_one_line_error(capsys, tmp_path, tiny_folder, instructions, content):
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    (folder / "suffix_analysis.json").write_bytes(content)
    code, _, err = run(capsys, "refusal", "--model", folder, "--instructions", instructions, "--out", tmp_path / "out")
    assert code == 2
    one_line_error(err, str(folder / "suffix_analysis.json"), "--preset")
    assert not (tmp_path / "out").exists()


# --- 3. weights from safetensors only -------------------------------------------------------------

@pytest.fixture
def pickled_folder(tmp_path):
    """A model folder whose weights are a pickle (``pytorch_model.bin``), as older checkpoints
    ship them. (transformers 5 always saves safetensors: ``safe_serialization=False`` is gone.)"""
    folder = tmp_path / "pickled"
    tok = make_tokenizer("chatml")
    model = tiny_llama(len(tok))
    model.config.save_pretrained(folder)
    tok.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def test_pickled_weights_are_refused(capsys, tmp_path, pickled_folder, instructions):
    code, _, err = run(capsys, "refusal", "--model", pickled_folder, "--instructions", instructions,
                       "--out", tmp_path / "out")
    assert code == 2
    one_line_error(err, str(pickled_folder), "pytorch_model.bin", "convert")
    assert not (tmp_path / "out").exists()


def test_pickled_weights_are_refused_for_a_judge_too(pickled_folder):
    from suffix_analysis.evaluation.refusal import make_judge

    with pytest.raises(UserError, match="convert"):
        make_judge(f"llamaguard:{pickled_folder}", device="cpu")
