"""The nanogcg attack: its own environment, the checks before the model loads, the JSON round
trip (through a fake runner python), the exported model, and (slow) two real nanoGCG steps."""

import json
import os
import sys
import textwrap

import pytest
import torch
from conftest import make_tokenizer, tiny_chat_model, tiny_llama

from suffix_analysis.attacks import nanogcg_env
from suffix_analysis.attacks.nanogcg_adapter import NanoGCG, NanoGCGConfig, init_string, target_is_greedy
from suffix_analysis.cli import main
from suffix_analysis.errors import UserError

INSTR = "Write a poem about the sea."


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str, needle: str):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], lines[0]


def fake_python(tmp_path, result: dict | None, exit_code: int = 0, versions: dict | None = None):
    """An executable that answers the adapter like a nanoGCG environment's python would: the
    version probe (``-c``) with ``versions``, the runner with the canned ``result``. What the
    runner was given (the spec, the exported model folder) is kept in ``seen.json``."""
    versions = versions if versions is not None else {"nanogcg": "0.3.0", "transformers": "4.47.1", "torch": "2.13.0"}
    seen = tmp_path / "seen.json"
    script = tmp_path / "fake-python"
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent(f"""\
        import json, os, sys
        if sys.argv[1] == "-c":
            print(json.dumps({versions!r}))
            sys.exit(0)
        spec = json.load(open(sys.argv[2]))
        d = spec["model_dir"]
        files = {{f: os.path.islink(os.path.join(d, f)) for f in os.listdir(d)}}
        config = json.load(open(os.path.join(d, "config.json")))
        json.dump({{"argv": sys.argv[1:], "spec": spec, "files": files, "config": config,
                    "tokenizer_file": os.path.isfile(spec["tokenizer_file"])}}, open({str(seen)!r}, "w"))
        print("nanoGCG says hello")
        if {exit_code}:
            print("RuntimeError: the runner broke", file=sys.stderr)
            sys.exit({exit_code})
        json.dump({result!r}, open(sys.argv[3], "w"))
        """))
    script.chmod(0o755)
    return script, seen


def canned(suffix: str, ids: list[int]) -> dict:
    return {"losses": [2.5, 1.25], "step_seconds": [0.5, 0.25], "best_loss": 1.25, "best_string": suffix,
            "best_ids": ids, "strings": ["x y", suffix],
            "versions": {"nanogcg": "0.3.0", "transformers": "4.47.1", "torch": "2.13.0"}}


@pytest.fixture(autouse=True)
def callers_nanogcg_python(monkeypatch, tmp_path) -> str | None:
    """Neither the caller's $NANOGCG_PYTHON nor the real cache: each test says what it has.
    Returns the caller's $NANOGCG_PYTHON, for the test that may use it."""
    given = os.environ.get("NANOGCG_PYTHON")
    monkeypatch.delenv("NANOGCG_PYTHON", raising=False)
    monkeypatch.setenv("SUFFIX_ANALYSIS_CACHE", str(tmp_path / "cache"))
    return given


def test_a_python_that_does_not_exist_is_refused_before_the_model_loads(capsys, tmp_path):
    f = tmp_path / "i.txt"
    f.write_text(INSTR + "\n")
    out = tmp_path / "run"
    code, _, err = run(capsys, "attack", "nanogcg", "--model", str(tmp_path / "no-model"), "--instructions", str(f),
                       "--out", str(out), "--nanogcg-python", str(tmp_path / "nope" / "python"))
    assert code == 2 and not out.exists()
    one_line_error(err, f"{tmp_path / 'nope' / 'python'} does not exist")
    # with nothing given: the suite's own environment, which does not exist yet, and how to make it
    code, _, err = run(capsys, "attack", "nanogcg", "--model", str(tmp_path / "no-model"), "--instructions", str(f),
                       "--out", str(out))
    assert code == 2
    one_line_error(err, "python -m suffix_analysis.attacks.nanogcg_env")
    assert str(tmp_path / "cache" / "nanogcg-env") in err


def test_the_default_python_is_nanogcg_python_then_the_suite_env(monkeypatch, tmp_path):
    assert nanogcg_env.resolve_python() == nanogcg_env.env_python(tmp_path / "cache" / "nanogcg-env")
    monkeypatch.setenv("NANOGCG_PYTHON", "/somewhere/bin/python")
    assert str(nanogcg_env.resolve_python()) == "/somewhere/bin/python"
    assert str(nanogcg_env.resolve_python("/given/python")) == "/given/python"


def test_a_python_without_nanogcg_is_refused(tmp_path):
    # this project's own python runs, and has no nanogcg (it cannot: transformers 5)
    with pytest.raises(UserError, match="has no nanogcg installed") as e:
        NanoGCGConfig(nanogcg_python=sys.executable).validate()
    assert "\n" not in str(e.value)
    script, _ = fake_python(tmp_path, None, versions={"nanogcg": "0.3.0", "transformers": "4.47.1", "torch": None})
    with pytest.raises(UserError, match="finds no torch"):
        NanoGCG(NanoGCGConfig(nanogcg_python=str(script)))


def test_a_failed_env_is_a_one_line_error_naming_the_fix(tmp_path, monkeypatch):
    (tmp_path / "not-a-venv").mkdir()
    (tmp_path / "not-a-venv" / "precious.txt").write_text("keep")
    with pytest.raises(UserError, match="is not a virtual environment"):
        nanogcg_env.make_env(tmp_path / "not-a-venv")
    assert (tmp_path / "not-a-venv" / "precious.txt").read_text() == "keep"
    # the venv is made, pip finds no nanogcg (no index, no wheels)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(UserError, match="failed while installing nanogcg: .*nanogcg==0.3.0") as e:
        nanogcg_env.make_env(tmp_path / "env")
    assert "\n" not in str(e.value) and f"python -m suffix_analysis.attacks.nanogcg_env {tmp_path / 'env'}" in str(e.value)
    # no interpreter to make it with
    monkeypatch.setattr(nanogcg_env.sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(UserError, match="failed while creating the virtual environment: FileNotFoundError"):
        nanogcg_env.make_env(tmp_path / "env2")


def test_json_round_trip_through_the_cli(capsys, tmp_path, tiny_folder):
    f = tmp_path / "i.txt"
    f.write_text(INSTR + "\n")
    out = tmp_path / "run"
    script, seen = fake_python(tmp_path, canned("x Sure", [90, 223, 60]))
    code, stdout, err = run(capsys, "attack", "nanogcg", "--model", str(tiny_folder), "--instructions", str(f),
                            "--out", str(out), "--nanogcg-python", str(script), "--steps", "2",
                            "--suffix-len", "5", "--search-width", "16", "--topk", "8", "--seed", "3", "--no-early-stop")
    assert code == 0, err
    rec = json.loads((out / "suffix.json").read_text())
    assert rec["attack"] == "nanogcg" and rec["suffix"] == "x Sure" and rec["suffix_ids"] == [90, 223, 60]
    assert rec["losses"] == [2.5, 1.25] and rec["step_seconds"] == [0.5, 0.25] and rec["suffixes"] == ["x y", "x Sure"]
    assert rec["extra"]["python"] == str(script) and rec["extra"]["versions"]["nanogcg"] == "0.3.0"
    assert rec["config"]["nanogcg_python"] == str(script)
    assert "nanoGCG says hello" in (out / "nanogcg.log").read_text()
    # what the runner was given
    s = json.loads(seen.read_text())
    assert s["argv"][0] == str(nanogcg_env.RUNNER)
    spec = s["spec"]
    assert spec["instruction"] == INSTR and spec["target"] == rec["targets"][0]
    assert spec["dtype"] == "float32" and spec["device"] == "cpu" and spec["threads"] == torch.get_num_threads()
    g = spec["gcg"]
    assert (g["num_steps"], g["search_width"], g["topk"], g["seed"], g["early_stop"]) == (2, 16, 8, 3, False)
    assert g["filter_ids"] and g["use_prefix_cache"] and g["buffer_size"] == 0
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_folder)
    assert len(tok(g["optim_str_init"], add_special_tokens=False)["input_ids"]) == 5
    assert spec["chat_template"] == tok.chat_template and spec["special_tokens"]["eos_token"] == "<|im_end|>"
    # the folder's weights are linked, not copied; the config is the transformers 4 one
    assert s["files"]["model.safetensors"] is True and s["tokenizer_file"]
    assert s["config"]["rope_theta"] == 10000.0 and s["config"]["torch_dtype"] == "float32"
    assert "rope_parameters" not in s["config"] and "dtype" not in s["config"]


def test_success_is_the_suites_greedy_check(tmp_path):
    cm = tiny_chat_model("llama")
    suffix = "x Sure"
    prompt = cm.chat.tokenize([INSTR], [suffix])[0]
    with torch.no_grad():
        greedy = cm.model.generate(torch.tensor([prompt]), max_new_tokens=3, do_sample=False)[0, len(prompt):].tolist()
    target = cm.tokenizer.decode(greedy)
    assert cm.tokenizer(target, add_special_tokens=False)["input_ids"] == greedy  # the check below needs it
    other = cm.tokenizer.decode([(greedy[0] + 1) % len(cm.tokenizer)] + greedy[1:])
    assert target_is_greedy(cm, INSTR, suffix, target) and not target_is_greedy(cm, INSTR, suffix, other)
    script, seen = fake_python(tmp_path, canned(suffix, [1, 2, 3]))
    attack = NanoGCG(NanoGCGConfig(nanogcg_python=str(script), num_steps=2, suffix_len=4))
    r = attack.run(cm, [INSTR], [target])
    assert r.success and r.attack == "nanogcg" and r.suffix == suffix
    assert not attack.run(cm, [INSTR], [other]).success
    # a model built in memory has no folder: it is saved for the runner
    s = json.loads(seen.read_text())
    assert s["files"]["model.safetensors"] is False
    assert s["config"]["rope_theta"] == cm.model.config.rope_parameters["rope_theta"]


def test_runner_failure_and_misuse_are_one_line_errors(tmp_path):
    cm = tiny_chat_model("llama")
    script, _ = fake_python(tmp_path, None, exit_code=3)
    attack = NanoGCG(NanoGCGConfig(nanogcg_python=str(script), num_steps=2, suffix_len=4))
    with pytest.raises(UserError, match="nanoGCG failed \\(exit status 3\\): RuntimeError: the runner broke") as e:
        attack.run(cm, [INSTR], ["Sure"], out=tmp_path / "run")
    assert "\n" not in str(e.value) and str(tmp_path / "run" / "nanogcg.log") in str(e.value)
    with pytest.raises(UserError, match="one instruction"):
        attack.run(cm, [INSTR, "Say hi."], ["Sure", "Sure"])
    with pytest.raises(UserError, match="no checkpoints"):
        attack.run(cm, [INSTR], ["Sure"], resume=True)


def test_init_string_has_the_suffix_length(tmp_path):
    cm = tiny_chat_model("llama")
    for n in (1, 4, 7):
        text = init_string(cm.tokenizer, "x", n)
        assert len(cm.tokenizer(text, add_special_tokens=False)["input_ids"]) == n
    with pytest.raises(UserError, match="does not tokenize to --suffix-len 1 tokens \\(0\\)"):
        init_string(cm.tokenizer, "", 1)


def test_rope_settings_are_written_as_transformers_4_reads_them():
    cm = tiny_chat_model("llama")
    cm.model.config.rope_parameters = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192}
    cfg = nanogcg_env.transformers4_config(cm)
    assert cfg["rope_theta"] == 500000.0
    assert cfg["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@pytest.mark.slow  # makes the environment (the package registry, under a minute) unless $NANOGCG_PYTHON names one
def test_two_real_nanogcg_steps_on_a_tiny_model(tmp_path, callers_nanogcg_python):
    from suffix_analysis.models.loading import load_model

    python = callers_nanogcg_python or str(nanogcg_env.make_env(tmp_path / "env"))
    # A rope_theta other than transformers 4's default, so that a config it misreads shows in the loss.
    tok = make_tokenizer("chatml")
    model = tiny_llama(len(tok))
    model.config.rope_parameters["rope_theta"] = 10.0
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    tiny = load_model(str(tmp_path / "model"), device="cpu")
    cfg = NanoGCGConfig(nanogcg_python=python, num_steps=2, suffix_len=5, search_width=16, topk=16,
                        early_stop=False, seed=0)
    r = NanoGCG(cfg).run(tiny, [INSTR], ["Sure, here is"])
    assert len(r.suffix_ids) == 5 and len(tiny.tokenizer(r.suffix, add_special_tokens=False)["input_ids"]) == 5
    assert len(r.losses) == 2 and len(r.step_seconds) == 2 and len(r.suffixes) == 2
    assert r.extra["versions"]["transformers"] == "4.47.1"
    # The model nanoGCG ran is this one: its loss for its last suffix, with its tokenization
    # (the prompt's pieces tokenized apart), equals a plain forward here.
    tok = tiny.tokenizer
    before = tok(tiny.chat.prefix + INSTR + " ", add_special_tokens=False)["input_ids"]
    ids = tok(r.suffixes[-1], add_special_tokens=False)["input_ids"]
    after = tok(tiny.chat.eoi, add_special_tokens=False)["input_ids"]
    target = tok("Sure, here is", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = tiny.model(input_ids=torch.tensor([before + ids + after + target])).logits[0]
    n = len(target)
    loss = torch.nn.functional.cross_entropy(logits[-n - 1:-1], torch.tensor(target)).item()
    assert loss == pytest.approx(r.losses[-1], abs=1e-4)
