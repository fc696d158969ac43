"""The GCG benchmarks refuse bad input in one line, before a model loads or anything is measured;
the GPU benchmark's model and reachable targets work at a tiny shape."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args,message", [
    (["--max-steps", "0"], "the budget must be at least 1 step and more than 0 seconds"),
    (["--max-seconds", "0"], "the budget must be at least 1 step and more than 0 seconds"),
    (["--variant", "fast:momentum=2"], "variant 'fast': momentum must be in [0, 1)"),
    (["--variant", "fast:warp=9"], "'warp=9' is not key=value with a GCG setting"),
    (["--variant", "fast:n_replace_start=x"], "n_replace_start must be int"),
    (["--nanogcg-python", "/nonexistent/python"], "/nonexistent/python"),
    (["--judge", "--prompts", "2", "--no-nanogcg"], "pass --prompts 3 or more"),
    (["--no-ours", "--no-nanogcg"], "nothing to run"),
    (["--variant", "probe:draft=layers:4,objective='target+refusal'"], "target objective only"),
])
def test_time_to_success_bad_input_is_one_line(args, message):
    r = _run("bench_gcg_tts.py", *args)
    assert r.returncode != 0
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "Loading weights" not in r.stderr  # refused before any model loads


def test_time_to_success_refuses_a_python_without_nanogcg_and_a_foreign_draft(tmp_path, tiny_folder):
    r = _run("bench_gcg_tts.py", "--nanogcg-python", sys.executable, "--prompts", "1", "--seeds", "1")
    if "no nanogcg installed" not in r.stderr:
        pytest.skip("this test's python has nanogcg")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "Loading weights" not in r.stderr, r.stderr
    r = _run("bench_gcg_tts.py", "--no-nanogcg", "--model", str(tiny_folder), "--prompts", "1", "--seeds", "1",
             "--variant", "probe:draft=smollm2-135m")
    assert r.returncode != 0 and "another tokenizer" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "prompt  0" not in r.stdout  # nothing measured


def test_gpu_benchmark_without_a_tokenizer_names_the_fix(tmp_path):
    r = _run("bench_gcg_gpu.py", "--tokenizer", str(tmp_path), "--device", "cpu", "--shape", "tiny")
    assert r.returncode != 0 and "--save-tokenizer" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_gpu_benchmark_model_and_reachable_target(tmp_path):
    from conftest import make_tokenizer

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_gcg_gpu import SHAPES, random_chat_model, reachable_target

    from suffix_analysis.attacks.gcg import GCG, GCGConfig
    from suffix_analysis.attacks.nanogcg_adapter import target_is_greedy

    make_tokenizer("chatml").save_pretrained(tmp_path)
    cm = random_chat_model("tiny", str(tmp_path), torch.float32, "cpu")
    assert cm.model.config.vocab_size == SHAPES["tiny"]["vocab_size"] == SHAPES["llama3-8b"]["vocab_size"]
    assert cm.model.config.num_key_value_heads < cm.model.config.num_attention_heads  # grouped-query, as Llama-3
    target, suffix = reachable_target(cm, "Write a poem.", 3, 4, seed=0)
    assert target and target_is_greedy(cm, "Write a poem.", suffix, target)  # reached by the suffix it came from
    r = GCG(GCGConfig(num_steps=2, search_width=8, topk=8, suffix_len=4)).run(cm, ["Write a poem."], [target])
    # token ids beyond the tokenizer's are never drawn into a suffix
    assert all(i < len(cm.tokenizer) for i in r.suffix_ids)
    assert len(r.losses) == 2 or r.success


@pytest.mark.parametrize("args,message", [
    (["--shares", "0"], "every share in (0, 3]"),
    (["--layers", "x"], "comma-separated numbers"),
    (["--limit", "0"], "--limit must be at least 1"),
])
def test_norms_benchmark_bad_input_is_one_line(args, message):
    r = _run("bench_norms.py", "--direction", "nowhere", *args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and message in lines[0] and lines[0].startswith("bench_norms: ")
