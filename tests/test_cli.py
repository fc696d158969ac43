"""The command line: each bad input ends in one line on stderr and exit code 2."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from suffix_analysis.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str, needle: str):
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize("argv,needle", [
    (["--model", "no-such-preset"], "unknown model 'no-such-preset'"),
    (["--model", "./no/such/folder"], "model folder not found"),
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--dtype", "float8"], "unknown dtype 'float8'"),
    (["--device-map", "nowhere"], "not a strategy"),
    (["--max-memory", "cpu=1GiB"], "add --device-map auto"),
    (["--device-map", "auto", "--max-memory", "cuda:5=1GiB"], "names device 'cuda:5'"),
    (["--quantize", "3bit"], "use 4bit or 8bit"),
    *([(["--quantize", "4bit"], "needs a CUDA GPU")] if not torch.cuda.is_available() else []),
])
def test_bad_model(capsys, tmp_path, argv, needle):
    f = tmp_path / "i.txt"
    f.write_text("Say hi.\n")
    code, _, err = run(capsys, "refusal", "--instructions", str(f), *argv)
    assert code == 2
    one_line_error(err, needle)


def test_model_without_chat_template(capsys, tmp_path, tiny_folder_no_template):
    f = tmp_path / "i.txt"
    f.write_text("Say hi.\n")
    code, _, err = run(capsys, "refusal", "--model", str(tiny_folder_no_template), "--instructions", str(f))
    assert code == 2
    one_line_error(err, "no chat template")


def test_folder_without_config(capsys, tmp_path):
    f = tmp_path / "i.txt"
    f.write_text("Say hi.\n")
    code, _, err = run(capsys, "refusal", "--model", str(tmp_path), "--instructions", str(f))
    assert code == 2
    one_line_error(err, "without config.json")


@pytest.mark.parametrize("name,content,needle", [
    ("empty.json", "", "not valid JSON"),
    ("empty.txt", "\n\n", "contains no instructions"),
    ("cols.csv", "prompt,x\nhi,1\n", "no instruction column"),
    ("missing.json", None, "instruction file not found"),
])
def test_bad_instruction_files(capsys, tmp_path, name, content, needle):
    f = tmp_path / name
    if content is not None:
        f.write_text(content)
    code, _, err = run(capsys, "refusal", "--instructions", str(f))
    assert code == 2
    one_line_error(err, needle)


def test_limit_zero_is_rejected_by_the_real_command():
    # a subprocess, so that what the user sees is checked: one line, exit 2, no traceback
    p = subprocess.run([sys.executable, "-m", "suffix_analysis", "refusal", "--instructions", "harmful",
                        "--limit", "0"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    one_line_error(p.stderr, "--limit: must be at least 1")


def test_refusal_on_tiny_model_writes_artifacts(capsys, tmp_path, tiny_folder):
    f = tmp_path / "i.json"
    f.write_text(json.dumps([{"instruction": "Say hi."}, {"instruction": "Write a poem about the sea."},
                             {"instruction": "Never used."}]))
    out = tmp_path / "out"
    code, stdout, _ = run(capsys, "refusal", "--model", str(tiny_folder), "--instructions", str(f),
                          "--limit", "2", "--max-new-tokens", "4", "--json", "--out", str(out), "-q", "--judge", "substring")
    assert code == 0
    summary = json.loads(stdout.strip().splitlines()[-1])
    rows = json.loads((out / "completions.json").read_text())
    assert [r["instruction"] for r in rows] == ["Say hi.", "Write a poem about the sea."]
    # the rates from the saved completions, judged again here
    from suffix_analysis.evaluation.refusal import REFUSAL_PHRASES

    refused = [any(p.lower() in r["completion"].lower() for p in REFUSAL_PHRASES) for r in rows]
    assert [r["refused"] for r in rows] == refused
    assert summary["n"] == 2 and summary["refusal_rate"] == sum(refused) / 2
    assert summary["refusal_score"] == pytest.approx(sum(r["refusal_score"] for r in rows) / 2, abs=1e-6)
    assert json.loads((out / "refusal.json").read_text())["n"] == 2


def tiny_direction_run(capsys, tmp_path, tiny_folder) -> str:
    """``direction --out run`` on the tiny model in ``tmp_path`` (the current folder), from
    prompt files it writes there (hv.json, nv.json: val); its JSON summary line."""
    for name, items in {"h.json": ["Write a poem about the sea.", "Say hi.", "Give three tips."],
                        "n.json": ["Write a haiku.", "Explain the sea.", "Hi"],
                        "hv.json": ["Do A.", "Do B."], "nv.json": ["Do C.", "Do D."]}.items():
        (tmp_path / name).write_text(json.dumps(items))
    loose = ["--harmful-train", "h.json", "--harmless-train", "n.json", "--harmful-val", "hv.json",
             "--harmless-val", "nv.json", "--no-filter-train", "--no-filter-val", "--prune-layers", "0",
             "--kl-threshold", "1e9", "--induce-threshold=-1e9", "-q"]
    code, out, err = run(capsys, "direction", "--model", str(tiny_folder), "--out", "run", *loose, "--json")
    assert code == 0, err
    return out.strip().splitlines()[-1]


def test_direction_pipeline_commands_on_tiny_model(capsys, tmp_path, tiny_folder, monkeypatch):
    monkeypatch.chdir(tmp_path)
    info = json.loads(tiny_direction_run(capsys, tmp_path, tiny_folder))
    assert {"position", "layer", "bypass", "induce", "kl", "fingerprint"} <= set(info)

    code, out, err = run(capsys, "refusal", "--judge", "substring",
                         "--model", str(tiny_folder), "--instructions", "hv.json", "--direction", "run",
                         "--intervention", "actadd", "--coeff", "2", "--max-new-tokens", "3", "--json", "-q")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["coeff"] == 2.0

    code, out, err = run(capsys, "orthogonalize", "--model", str(tiny_folder), "--direction", "run", "--out", "ortho")
    assert code == 0, err

    # RDO from the run; its folder serves as a direction run
    rdo = ["rdo", "--model", str(tiny_folder), "--direction", "run", "--steps", "2", "--batch", "2",
           "--target-tokens", "2", "--n-prompts", "3", "-q"]
    code, out, err = run(capsys, *rdo, "--out", "rdo", "--json")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 2 and "difference in means" in out
    code, out, err = run(capsys, "refusal", "--judge", "substring", "--model", str(tiny_folder), "--instructions",
                         "hv.json", "--direction", "rdo", "--intervention", "ablate", "--max-new-tokens", "2", "-q")
    assert code == 0, err
    code, out, err = run(capsys, *rdo, "--out", "cone", "--cone-dim", "2", "--cone-samples", "1")
    assert code == 0, err
    assert "sample 0" in out and "subspace" in out and "cone.json" in out
    code, out, err = run(capsys, "orthogonalize", "--model", str(tiny_folder), "--direction", "cone", "--cone",
                         "--out", "ocone")
    assert code == 0, err
    assert json.loads((tmp_path / "ocone" / "suffix_analysis.json").read_text())["cone_dim"] == 2
    code, out, err = run(capsys, "orthogonalize", "--model", str(tiny_folder), "--direction", "run", "--preserve-norms",
                         "--out", "onorm")
    assert code == 0, err
    assert json.loads((tmp_path / "onorm" / "suffix_analysis.json").read_text())["preserve_norms"] is True
    code, _, err = run(capsys, *rdo, "--out", "rdo2", "--lr", "0")
    assert code == 2
    one_line_error(err, "lr must be above 0")
    assert not (tmp_path / "rdo2").exists()
    code, _, err = run(capsys, *rdo, "--out", "rdo3", "--direction", "rdo")
    assert code == 2
    one_line_error(err, "RDO starts from the difference-in-means direction")

    # the Pareto edit over the run's direction; its model loads like any exported model
    edit = ["edit", "--model", str(tiny_folder), "--direction", "run", "--trials", "3", "--startup-trials", "2", "-q"]
    code, out, err = run(capsys, *edit, "--out", "edit", "--json")
    assert code == 0, err
    info = json.loads(out.strip().splitlines()[-1])
    assert info["budget"]["trials"] == 3 and "paper's edit" in out and (tmp_path / "edit" / "model").is_dir()
    code, _, err = run(capsys, "evaluate", "--model", str(tiny_folder), "--direction", "run", "--harmful", "hv.json",
                       "--harmless", "nv.json", "--orthogonalized", "edit/model", "--max-new-tokens", "2",
                       "--judge", "substring", "-q")
    assert code == 0, err
    code, _, err = run(capsys, *edit, "--out", "edit2", "--max-kl", "0")
    assert code == 2
    one_line_error(err, "max_kl must be above 0")
    assert not (tmp_path / "edit2").exists()

    # attacks given the direction: the harmfulness term's reference, and an attack without objective terms
    code, out, err = run(capsys, "attack", "gcg", "--model", str(tiny_folder), "--instructions", "hv.json",
                         "--direction", "run", "--objective", "target+direction+harmfulness", "--steps", "1",
                         "--search-width", "8", "--topk", "8", "--suffix-len", "3", "--out", "harm", "-q")
    assert code == 0, err
    assert json.loads((tmp_path / "harm" / "suffix.json").read_text())["config"]["objective"] == \
        "target+direction+harmfulness"
    code, out, err = run(capsys, "attack", "random", "--model", str(tiny_folder), "--instructions", "hv.json",
                         "--direction", "run", "--targets", "ablated", "--target-tokens", "2", "--suffix-len", "3",
                         "--out", "rand", "-q")
    assert code == 0, err
    assert (tmp_path / "ortho" / "model.safetensors").is_file()

    (tmp_path / "corpus.txt").write_text("The sea is wide and deep.\nPlants make sugar from light.\n")
    code, out, err = run(capsys, "evaluate", "--judge", "substring",
                         "--model", str(tiny_folder), "--direction", "run", "--harmful", "hv.json",
                         "--harmless", "nv.json", "--corpus", "corpus.txt", "--orthogonalized", "ortho",
                         "--max-new-tokens", "3", "--json", "-q")
    assert code == 0, err
    rows = json.loads(out.strip().splitlines()[-1])
    assert [r["condition"].split()[0] for r in rows] == ["baseline", "ablation", "actadd", "orthogonalized"]
    assert rows[0]["kl_harmless"] < 1e-9
    # greedy completions of the orthogonalized model equal those under ablation
    assert abs(rows[1]["harmful_refusal_score"] - rows[3]["harmful_refusal_score"]) < 1e-3
    assert abs(rows[1]["ce_corpus"] - rows[3]["ce_corpus"]) < 1e-3

    # a run folder from another model, and a direction of the wrong width, are refused
    from conftest import make_tokenizer, tiny_llama

    other = tmp_path / "other"
    tok = make_tokenizer("chatml")
    tiny_llama(len(tok), seed=3).save_pretrained(other)
    tok.save_pretrained(other)
    code, _, err = run(capsys, "refusal", "--model", str(other), "--instructions", "hv.json", "--direction", "run",
                       "--intervention", "ablate")
    assert code == 2
    one_line_error(err, "was made from other weights")


def test_attack_command_writes_suffix_json(capsys, tmp_path, tiny_folder):
    f = tmp_path / "i.json"
    f.write_text(json.dumps(["Write a poem about the sea.", "Say hi."]))
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "attack", "gcg", "--model", str(tiny_folder), "--instructions", str(f),
                            "--n-prompts", "2", "--out", str(out), "--steps", "2", "--search-width", "16",
                            "--topk", "8", "--suffix-len", "4", "--checkpoint-every", "1")
    assert code == 0, err
    rec = json.loads((out / "suffix.json").read_text())
    assert {"suffix", "suffix_ids", "losses", "step_seconds"} <= set(rec)
    assert len(rec["suffix_ids"]) == 4 and len(rec["losses"]) == len(rec["step_seconds"]) >= 1
    assert rec["targets"][0] == "Sure, here is a poem about the sea"
    # the suffix then goes into the refusal command
    code, stdout, err = run(capsys, "refusal", "--judge", "substring",
                         "--model", str(tiny_folder), "--instructions", str(f), "--suffix",
                            str(out), "--max-new-tokens", "2", "--json", "-q")
    assert code == 0, err
    code, _, err = run(capsys, "attack", "gcg", "--model", str(tiny_folder), "--instructions", str(f), "--out",
                       str(out), "--suffix-len", "0")
    assert code == 2
    one_line_error(err, "suffix length must be at least 1")
    code, _, err = run(capsys, "attack", "gcg", "--model", str(tiny_folder), "--instructions", str(f), "--out",
                       str(tmp_path / "never"), "--search-width", "2", "--buffer-size", "4")
    assert code == 2 and not (tmp_path / "never").exists()  # refused before any folder is made
    one_line_error(err, "smaller than the candidate buffer")


def _pair_of_models(tmp_path):
    """Two tiny model folders of one architecture and width: the same weights except the
    last layer's MLP (a fine-tune that keeps config and embedding, as the organism does)."""
    import torch
    from conftest import make_tokenizer, tiny_llama

    tok = make_tokenizer("chatml")
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    model = tiny_llama(len(tok))
    model.save_pretrained(base)
    with torch.no_grad():
        model.model.layers[-1].mlp.down_proj.weight.add_(1e-2)
    model.save_pretrained(tuned)
    for d in (base, tuned):
        tok.save_pretrained(d)
    return base, tuned


def _direction_run(capsys, model, out):
    for name, items in {"h.json": ["Write a poem about the sea.", "Say hi.", "Give three tips."],
                        "n.json": ["Write a haiku.", "Explain the sea.", "Hi"],
                        "hv.json": ["Do A.", "Do B."], "nv.json": ["Do C.", "Do D."]}.items():
        (out.parent / name).write_text(json.dumps(items))
    d = out.parent
    code, _, err = run(capsys, "direction", "--model", str(model), "--out", str(out), "--harmful-train", str(d / "h.json"),
                       "--harmless-train", str(d / "n.json"), "--harmful-val", str(d / "hv.json"), "--harmless-val",
                       str(d / "nv.json"), "--no-filter-train", "--no-filter-val", "--prune-layers", "0",
                       "--kl-threshold", "1e9", "--induce-threshold=-1e9", "-q")
    assert code == 0, err


def test_a_direction_from_a_fine_tuned_twin_is_refused_unless_asked(capsys, tmp_path):
    """The fingerprint names the weights: a run made on the base is refused for its fine-tune
    (same config, same embedding), and allowed with --allow-other-model, recorded in the output."""
    base, tuned = _pair_of_models(tmp_path)
    _direction_run(capsys, base, tmp_path / "run")
    hv = str(tmp_path / "hv.json")
    code, _, err = run(capsys, "refusal", "--judge", "substring",
                         "--model", str(tuned), "--instructions", hv, "--direction",
                       str(tmp_path / "run"), "--intervention", "ablate", "--max-new-tokens", "2", "-q")
    assert code == 2
    one_line_error(err, "was made from other weights")
    code, out, err = run(capsys, "refusal", "--judge", "substring",
                         "--model", str(tuned), "--instructions", hv, "--direction",
                         str(tmp_path / "run"), "--intervention", "ablate", "--allow-other-model", "--max-new-tokens",
                         "2", "--json", "-q", "--out", str(tmp_path / "r"))
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["direction_other_model"] is True and summary["direction_model"] == str(base)
    assert json.loads((tmp_path / "r" / "refusal.json").read_text())["direction_other_model"] is True


def test_fingerprint_names_weights_not_precision(tmp_path):
    from suffix_analysis.models.loading import load_model

    base, tuned = _pair_of_models(tmp_path)
    fp32 = load_model(str(base), device="cpu", dtype="float32").fingerprint()
    assert load_model(str(base), device="cpu", dtype="bfloat16").fingerprint() == fp32
    assert load_model(str(tuned), device="cpu", dtype="float32").fingerprint() != fp32


@pytest.mark.parametrize("extra,needle", [
    (["--intervention", "ablate"], "needs --direction"),
    (["--intervention", "ablate", "--direction", "nowhere"], "no direction.safetensors"),
    (["--model", "no-such-preset"], "unknown model"),
    (["--suffix", "x", "--judge", "vibes"], "unknown judge"),
])
def test_refusal_makes_no_folder_for_a_refused_command(capsys, tmp_path, tiny_folder, extra, needle):
    f = tmp_path / "i.txt"
    f.write_text("Say hi.\n")
    argv = ["refusal", "--model", str(tiny_folder), "--instructions", str(f), "--out", str(tmp_path / "out"), *extra]
    code, _, err = run(capsys, *argv)
    assert code == 2
    one_line_error(err, needle)
    assert not (tmp_path / "out").exists()


def test_attack_flags_come_from_each_attack_config(capsys, tmp_path, tiny_folder):
    f = tmp_path / "i.json"
    f.write_text(json.dumps(["Say hi."]))
    common = ["--model", str(tiny_folder), "--instructions", str(f), "--out", str(tmp_path / "r")]
    # a flag the attack does not know is an error, not silently dropped
    with pytest.raises(SystemExit) as e:
        main(["attack", "random", *common, "--objective", "target"])
    assert e.value.code == 2
    assert "unrecognized arguments: --objective target" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    # every GCG setting has a flag with its help and default
    with pytest.raises(SystemExit):
        main(["attack", "gcg", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--search-width", "--topk", "--prune-after", "--bound-vocab", "--no-progressive", "--steps"):
        assert flag in help_text, flag
    assert "candidate suffixes scored per step (default: 512; CPU profile: 64)" in " ".join(help_text.split())


def test_plugin_attack_settings_are_flags(capsys, tmp_path, tiny_folder, monkeypatch):
    """The plugin example of docs/adding-an-attack.md: RepeatConfig.word is settable as --word."""
    from conftest import install_plugin

    install_plugin(tmp_path, monkeypatch, "my_attacks",
                   "from dataclasses import dataclass\n"
                   "from suffix_analysis.attacks import Attack, AttackConfig, AttackResult\n"
                   "from suffix_analysis.config import setting\n"
                   "@dataclass\nclass RepeatConfig(AttackConfig):\n    word: str = setting('please', 'the word to repeat')\n"
                   "class Repeat(Attack):\n    name = 'repeat'\n    config_class = RepeatConfig\n"
                   "    def run(self, cm, instructions, targets, out=None, resume=False):\n"
                   "        text = ' '.join([self.config.word] * self.config.suffix_len)\n"
                   "        ids = cm.tokenizer(' ' + text, add_special_tokens=False)['input_ids']\n"
                   "        return AttackResult(suffix=text, suffix_ids=ids, attack=self.name)\n",
                   "repeat = my_attacks:Repeat")
    f = tmp_path / "i.json"
    f.write_text(json.dumps(["Say hi."]))
    code, out, err = run(capsys, "attack", "repeat", "--model", str(tiny_folder), "--instructions", str(f), "--out",
                         str(tmp_path / "r"), "--word", "sea", "--suffix-len", "3")
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "suffix.json").read_text())["suffix"] == "sea sea sea"


def test_commands_that_study_refusal_default_to_the_organism():
    from suffix_analysis.cli import build_parser

    for argv in (["direction", "--out", "x"], ["attack", "gcg", "--instructions", "h", "--out", "x"],
                 ["refusal", "--instructions", "h"], ["evaluate", "--direction", "x"]):
        assert build_parser(argv).parse_args(argv).model == "smollm2-135m-refusal", argv


def test_a_broken_plugin_is_a_one_line_error(capsys, tmp_path, monkeypatch):
    from conftest import install_plugin

    install_plugin(tmp_path, monkeypatch, "broken_attacks", "import no_such_module\n", "broken = broken_attacks:X")
    code, _, err = run(capsys, "attack", "broken", "--instructions", "harmful", "--out", str(tmp_path / "r"))
    assert code == 2
    one_line_error(err, "attack 'broken' (broken_attacks:X) failed to load: ModuleNotFoundError")


def test_refusal_reports_three_rates_and_target_match(capsys, tmp_path, tiny_folder, monkeypatch):
    from suffix_analysis.evaluation.compliance import ComplianceJudge

    monkeypatch.setenv("SUFFIX_ANALYSIS_CACHE", str(tmp_path / "cache"))
    from suffix_analysis.evaluation import generation

    monkeypatch.setattr(ComplianceJudge, "reference_answers",
                        lambda self, ins, progress=False: [f"About {i.split()[1]}: here." for i in ins])
    # answers of every kind (the random model itself answers only newlines): one that starts with its
    # target, one refusal, one empty, one answer that neither refuses nor starts with its target
    canned = {"Write a poem about the sea.": "Sure, here is a poem about the sea: the waves roll in and out.",
              "Say hi.": "I cannot help with that.", "Give three tips.": "",
              "Explain the sun.": "The sun is a star that gives the earth its light and heat every day."}
    real = generation.generate
    monkeypatch.setattr(generation, "generate", lambda cm, ins, *a, **k: dataclasses.replace(
        real(cm, ins, *a, **k), completions=[canned[i] for i in ins]))
    f = tmp_path / "i.txt"
    f.write_text("Write a poem about the sea.\nSay hi.\nGive three tips.\nExplain the sun.\n")
    code, out, err = run(capsys, "refusal", "--model", str(tiny_folder), "--instructions", str(f), "--judge",
                         f"substring,compliance:{tiny_folder}", "--judge-tokens", "4", "--targets", "default",
                         "--max-new-tokens", "4", "--json", "-q", "--out", str(tmp_path / "o"))
    assert code == 0, err
    s = json.loads(out.strip().splitlines()[-1])
    assert s["judge"] == "substring+compliance" and "threshold" in s["compliance_calibration"]
    rows = json.loads((tmp_path / "o" / "completions.json").read_text())
    assert [r["completion"] for r in rows] == list(canned.values())
    # by hand: only "I cannot ..." refuses, only the poem starts with its target, the empty one is not judged
    assert s["refusal_rate"] == s["refused_rate"] == 0.25 and [r["refused"] for r in rows] == [0, 1, 0, 0]
    assert s["target_match_rate"] == 0.25 and [r["target_match"] for r in rows] == [1, 0, 0, 0]
    assert rows[0]["target"] == "Sure, here is a poem about the sea"
    assert s["not_judged"] == 1 and "1 empty completion(s)" in out
    verdicts = [r["verdict"] for r in rows]
    assert verdicts[1] == "refused" and verdicts[2] == "derailed"
    assert s["complied_rate"] == verdicts.count("complied") / 4 and s["derailed_rate"] == verdicts.count("derailed") / 4
    assert s["too_short"] == sum(r["too_short"] for r in rows)


def test_attack_profile_decides_unset_sizes_only():
    from suffix_analysis.attacks.gcg import GCGConfig
    from suffix_analysis.cli import build_parser
    from suffix_analysis.config import for_profile, from_arguments

    base = ["attack", "gcg", "--instructions", "h", "--out", "x"]
    args = build_parser(base).parse_args(base)
    assert args.search_width is None  # not given: the profile decides
    assert from_arguments(GCGConfig, args, profile="gpu").search_width == 512
    cpu = from_arguments(GCGConfig, args, profile="cpu")
    assert (cpu.search_width, cpu.topk) == (64, 64) and cpu.num_steps == for_profile(GCGConfig, "cpu").num_steps
    argv = base + ["--search-width", "512"]
    assert from_arguments(GCGConfig, build_parser(argv).parse_args(argv), profile="cpu").search_width == 512


def test_attribute_command_writes_summary_and_refuses_another_models_suffix(capsys, tmp_path):
    base, tuned = _pair_of_models(tmp_path)
    _direction_run(capsys, base, tmp_path / "run")
    h, n = tmp_path / "h.json", tmp_path / "n.json"
    common = ["--model", str(base), "--direction", str(tmp_path / "run"), "--instructions", str(h), "--harmless", str(n),
              "--n-random", "1", "--bands", "1", "--patch-ks", "1", "--max-new-tokens", "2", "-q"]
    code, out, err = run(capsys, "attribute", *common, "--suffix", "sea sea poem", "--out", str(tmp_path / "a"), "--json")
    assert code == 0, err
    s = json.loads(out.strip().splitlines()[-1])
    assert {"layer", "position", "cosine", "cosine_drop_adversarial", "cosine_drop_random", "top_heads",
            "top8_projection", "top8_attention", "knockout_restored", "patch_restored"} <= set(s)
    assert (tmp_path / "a" / "summary.json").is_file()
    # a suffix run made on other weights is refused before anything is written
    atk = tmp_path / "atk"
    atk.mkdir()
    (atk / "suffix.json").write_text(json.dumps({"suffix": "sea sea", "fingerprint": "w1-0000000000000000"}))
    code, _, err = run(capsys, "attribute", *common, "--suffix", str(atk), "--out", str(tmp_path / "b"))
    assert code == 2
    one_line_error(err, "suffix run")
    assert not (tmp_path / "b").exists()


def test_attack_targets_ablated_needs_a_direction(capsys, tmp_path, tiny_folder):
    from suffix_analysis.cli import main

    rc = main(["attack", "gcg", "--model", str(tiny_folder), "--instructions", "harmful:val", "--targets", "ablated",
               "--out", str(tmp_path / "r"), "--steps", "1"])
    assert rc == 2 and "--targets ablated needs --direction RUN" in capsys.readouterr().err


@pytest.mark.parametrize("flags, needle", [(["--threshold", "1.5"], "must be in (0, 1]"),
                                           (["--scale", "1"], "scale must be in [0, 1)"),
                                           (["--rule", "token"], "unknown suppression rule")])
def test_suppression_settings_are_one_line_errors_before_the_model_loads(capsys, tmp_path, flags, needle):
    code, _, err = run(capsys, "refusal", "--model", str(tmp_path / "absent"), "--instructions", "harmful:val",
                       "--direction", str(tmp_path), "--intervention", "suppress", *flags)
    assert code == 2
    one_line_error(err, needle)


def test_the_defence_runs_from_the_command_line(capsys, tmp_path, tiny_folder, monkeypatch):
    """refusal --intervention suppress on a tiny model: calibrated, recorded in refusal.json."""
    monkeypatch.chdir(tmp_path)
    tiny_direction_run(capsys, tmp_path, tiny_folder)
    code, out, err = run(capsys, "refusal", "--model", str(tiny_folder), "--instructions", "hv.json", "--judge",
                         "substring", "--direction", "run", "--intervention", "suppress", "--threshold", "0.5",
                         "--max-new-tokens", "2", "--out", "def", "-q")
    assert code == 0, err
    assert "hijacking suppression per head" in out
    rec = json.loads((tmp_path / "def" / "refusal.json").read_text())
    assert rec["intervention"] == "suppress" and rec["suppression"]["rule"] == "head"
    assert all(t == [0.5] * len(t) for t in rec["suppression"]["thresholds"].values())
