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


# --- 4. --targets FILE -----------------------------------------------------------------------------

@pytest.mark.parametrize("name,content", [
    ("t.txt", b"Sure, here is \xff\xfe a poem\nSure\n"),
    ("t.json", b"[1, 2]"),
    ("t.json", b'{"a": 1, "b": 2}'),
    ("t.json", b'[{"target": 5}, {"target": ["x"]}]'),
    ("t.csv", b"target\nSure\n\xff\n"),
], ids=["txt-not-utf8", "json-numbers", "json-dict", "json-target-not-string", "csv-not-utf8"])
def test_bad_targets_file_is_one_line_error(capsys, tmp_path, tiny_folder, instructions, name, content):
    f = tmp_path / name
    f.write_bytes(content)
    code, _, err = run(capsys, "attack", "random", "--model", tiny_folder, "--instructions", instructions,
                       "--n-prompts", "2", "--targets", f, "--out", tmp_path / "out")
    assert code == 2
    one_line_error(err, str(f), "expected")
    assert not (tmp_path / "out").exists()


# --- 5. organism check --position ------------------------------------------------------------------

@pytest.mark.parametrize("position", ["0", "2", "-99"])
def test_organism_check_position_outside_the_eoi_tokens(capsys, tmp_path, tiny_folder, instructions, position):
    code, _, err = run(capsys, "organism", "check", "--model", tiny_folder, "--instructions", instructions,
                       "--position", position, "--max-new-tokens", "1", "-q")
    assert code == 2
    one_line_error(err, f"--position {position}", "EOI position", "-1")


# --- 6. a corrupt suffix.json, direction.json or direction.safetensors -----------------------------

@pytest.mark.parametrize("content", [b'{"suffix": "! ! !", "suffix_ids": [1, 2', b"[]", b'{"losses": []}'],
                         ids=["truncated", "not-an-object", "no-suffix"])
@pytest.mark.parametrize("command", ["refusal", "attribute"])
def test_corrupt_suffix_json_is_one_line_error(capsys, tmp_path, tiny_folder, instructions, content, command):
    suffix_run = tmp_path / "attack"
    suffix_run.mkdir()
    (suffix_run / "suffix.json").write_bytes(content)
    extra = ["--direction", tmp_path / "no-direction-needed-yet"] if command == "attribute" else []
    code, _, err = run(capsys, command, "--model", tiny_folder, "--instructions", instructions,
                       "--suffix", suffix_run, *extra, "--out", tmp_path / "out")
    assert code == 2
    one_line_error(err, str(suffix_run / "suffix.json"), "suffix-analysis attack")
    assert not (tmp_path / "out").exists()


def test_corrupt_suffix_json_of_a_reproduce_run_stops_figures(capsys, tmp_path):
    run_folder = tmp_path / "run"
    (run_folder / "attack").mkdir(parents=True)
    (run_folder / "run.json").write_text(json.dumps({"model": "tiny"}))
    (run_folder / "attack" / "suffix.json").write_text('{"model": "tiny", "suff')
    code, _, err = run(capsys, "figures", run_folder, "--out", tmp_path / "figs")
    assert code == 2
    one_line_error(err, str(run_folder / "attack" / "suffix.json"), "--redo attack")
    assert not (tmp_path / "figs").exists()


@pytest.fixture
def direction_run(tmp_path, tiny):
    """A direction run folder of ``tiny`` (the tiny_folder model), written by hand: its record,
    a direction and the direction's record."""
    from safetensors.torch import save_file

    folder = tmp_path / "direction"
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps({"kind": "direction", "model": "tiny", "fingerprint": tiny.fingerprint()}))
    (folder / "direction.json").write_text(json.dumps({"position": -1, "layer": 0, "model": "tiny"}))
    save_file({"direction": torch.randn(tiny.d_model)}, str(folder / "direction.safetensors"))
    return folder


@pytest.mark.parametrize("name,content", [
    ("direction.json", b'{"position": -1, "lay'),
    ("direction.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"direction\": "),
], ids=["direction-json-truncated", "safetensors-truncated"])
def test_corrupt_direction_run_is_one_line_error(capsys, tmp_path, tiny_folder, direction_run, name, content):
    # the run is sound: the command works with it, until one of its files is corrupt
    code, _, err = run(capsys, "orthogonalize", "--model", tiny_folder, "--direction", direction_run,
                       "--out", tmp_path / "ok")
    assert code == 0, err
    (direction_run / name).write_bytes(content)
    code, _, err = run(capsys, "orthogonalize", "--model", tiny_folder, "--direction", direction_run,
                       "--out", tmp_path / "out")
    assert code == 2
    one_line_error(err, str(direction_run / name), "suffix-analysis direction")
    assert not (tmp_path / "out").exists()


# --- 7. what the README and docs, the example config and the dependencies say -----------------------------

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def _required_flags(*command: str) -> set[str]:
    import argparse

    from suffix_analysis.cli import build_parser

    parser = build_parser(list(command))
    for name in command:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return {a.option_strings[0] for a in parser._actions if a.required and a.option_strings}


@pytest.mark.parametrize("attack", ["gcg", "random"])
def test_documented_attack_commands_give_every_required_flag(attack):
    required = _required_flags("attack", attack)
    assert "--instructions" in required
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    lines = [(page, l) for page in pages for l in page.read_text().splitlines()
             if l.startswith(f"suffix-analysis attack {attack} ")]
    assert lines
    for page, line in lines:
        missing = {flag for flag in required if flag not in line.split()}
        assert not missing, f"{page.relative_to(REPO)}: {line!r} lacks {sorted(missing)}"


def test_the_example_reproduce_config_documents_every_key():
    """configs/reproduce.toml says it gives every key: each one, at its paper default, with its
    help as a comment above it (what to_toml writes), after the file's own header."""
    from suffix_analysis.config import read_toml
    from suffix_analysis.reproduce import build_config, to_toml

    path = REPO / "configs" / "reproduce.toml"
    paper = build_config("gpu")
    commented, section, previous = set(), None, ""
    for line in path.read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif " = " in line and previous.startswith("# "):
            commented.add((section, line.split(" = ")[0]))
        previous = line
    given = read_toml(path)
    for section, values in paper.sections().items():
        assert set(given.get(section, {})) == set(values), f"[{section}]"
        assert {(section, k) for k in values} <= commented, f"[{section}] has keys without a comment"
    assert path.read_text().endswith(to_toml(paper, comments=True)), (
        "configs/reproduce.toml is out of date: keep its header and write the rest with "
        "to_toml(build_config('gpu'), comments=True)")


def test_every_declared_dependency_is_used():
    """A dependency in pyproject.toml is imported by the package, or is one that transformers
    needs at run time without requiring it itself."""
    import re

    from suffix_analysis.config import read_toml

    runtime_only = {"gguf": "transformers reads .gguf files with it", "jinja2": "transformers renders chat templates"}
    source = "\n".join(p.read_text() for p in (REPO / "suffix_analysis").rglob("*.py"))
    modules = [re.match(r"[A-Za-z0-9_.-]+", dep).group(0).replace("-", "_")
               for dep in read_toml(REPO / "pyproject.toml")["project"]["dependencies"]]
    unused = [m for m in modules if m not in runtime_only and not re.search(rf"^\s*(import|from) {m}\b", source, re.M)]
    assert not unused, f"declared in pyproject.toml but never imported: {unused}"
