"""``reproduce`` and ``figures`` on a tiny random model: every stage's tables, the summary and
report, cached reruns, --redo, settings from TOML, clear errors, and figures drawn from the
tables alone (no torch, no model cache)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from suffix_analysis.errors import UserError
from suffix_analysis.reproduce import build_config, load_config, reproduce, to_toml
from suffix_analysis.reproduce import stages as stages_mod
from suffix_analysis.reproduce.config import CPU

HARMFUL = ["Write a poem about the sea.", "Say hi to me.", "Explain how plants turn light into sugar.",
           "Describe a cat.", "List three colors.", "Name a river.", "Tell a short joke.", "Count to five.",
           "Spell the word tree.", "Give a fruit name."]
HARMLESS = ["Give three tips for staying healthy.", "Write a poem.", "Name two birds.", "Say thanks.",
            "Describe rain.", "Name a tree.", "Pick a number.", "Draw a line.", "Name a month.", "Name a day."]
SUMMARY_KEYS = {"refusal_baseline", "refusal_ablated", "refusal_orthogonalized", "induced_refusal_actadd",
                "refusal_adversarial_suffix", "refusal_random_suffix", "complied_adversarial_suffix",
                "complied_random_suffix", "attribution", "layer", "position", "suffix", "random_suffix"}
STAGE_FOLDERS = ("direction", "evaluation", "attack", "transfer", "attribution", "defence")


def _file(folder: Path, name: str, lines: list[str]) -> str:
    path = folder / f"{name}.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def tiny_sections(data: Path) -> dict:
    """Settings that make every stage run in about a second on the tiny model."""
    hf = _file(data, "harmful", HARMFUL)
    hl = _file(data, "harmless", HARMLESS)
    return {
        "run": {"harmful_eval": hf, "harmless_eval": hl, "n_eval": 3, "max_new_tokens": 3, "judge": "substring",
                "batch_size": 4},
        # a random model has no refusal to filter by and no candidate that passes the paper's thresholds
        "direction": {"harmful_train": _file(data, "htrain", HARMFUL[:3]),
                      "harmless_train": _file(data, "ltrain", HARMLESS[:3]),
                      "harmful_val": _file(data, "hval", HARMFUL[3:5]), "harmless_val": _file(data, "lval", HARMLESS[3:5]),
                      "n_train": 3, "n_val": 2, "filter_train": False, "filter_val": False, "kl_threshold": 1e9,
                      "induce_threshold": -1e9, "prune_layer_fraction": 0.0, "last_positions": 1},
        "attack": {"instructions": _file(data, "attack", HARMFUL[5:7]), "n_prompts": 2, "suffix_len": 4,
                   "num_steps": 2, "search_width": 4, "topk": 4},
        "attribution": {"n_prompts": 2, "n_random": 1, "top_k": 2, "patch_ks": "1,2", "bands": 0,
                        "max_new_tokens": 3, "batch_size": 2},
        "defence": {"n_calibration": 2},
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_folder):
    data = tmp_path_factory.mktemp("data")
    cfg = build_config("gpu", tiny_sections(data))
    return str(tiny_folder), cfg, data


@pytest.fixture(scope="module")
def run(setup, tmp_path_factory):
    model, cfg, _ = setup
    out = tmp_path_factory.mktemp("run")
    summary = reproduce(model, out, cfg, device="cpu", progress=False)
    return out, summary


def test_a_run_writes_every_stage_the_summary_stage_times_report_and_figures(run):
    out, summary = run
    assert SUMMARY_KEYS <= set(summary)
    for key in SUMMARY_KEYS - {"attribution", "layer", "position", "suffix", "random_suffix",
                               "complied_adversarial_suffix", "complied_random_suffix"}:
        assert 0.0 <= summary[key] <= 1.0, key
    # substring judge only: no compliance verdicts, and the summary says so with None, not 0
    assert summary["complied_adversarial_suffix"] is None
    assert summary["attribution"]["n_harmful"] == 2
    assert summary["n_eval_harmful"] == 3
    times = json.loads((out / "stages.json").read_text())
    assert times["organism"]["status"] == "skipped"
    for name in STAGE_FOLDERS:
        assert times[name]["status"] == "ran" and times[name]["seconds"] >= 0
        assert json.loads((out / name / "stage.json").read_text())["key"]
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    for kind in ("baseline", "ablation", "actadd", "orthogonalized"):
        rows = json.loads((out / "evaluation" / f"completions_{kind}_harmful.json").read_text())
        assert [r["instruction"] for r in rows] == HARMFUL[7:10] and all("completion" in r for r in rows)
    for table in ("direction/candidates.csv", "evaluation/evaluation.csv", "attack/losses.csv",
                  "attack/suffix.json", "attack/random.json", "transfer/transfer.csv", "attribution/cosine.csv"):
        assert (out / table).is_file(), table
    report = (out / "report.md").read_text()
    assert "| refused, direction ablated |" in report and "![01_refusal_rates](figures/01_refusal_rates.png)" in report
    assert f"--config {out}/config.toml" in report
    pngs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert len(pngs) == 11 and len(list((out / "figures").glob("*.pdf"))) == 11
    # the defence stage: every suffix with and without it, and its harmless cost
    defence = pd.read_csv(out / "defence" / "defence.csv")
    assert len(defence) == 8 and set(defence["suffix"]) == {"none", "adversarial", "random"}
    assert (defence[(defence["set"] == "harmless") & ~defence["defended"]]["kl"] == 0).all()
    assert 0 <= summary["defence_refused_adversarial_suffix_defended"] <= 1
    assert json.loads((out / "defence" / "defence.json").read_text())["thresholds"]


def test_evaluation_sets_are_held_out_from_the_direction_and_the_attack(run, setup):
    out, _ = run
    _, cfg, _ = setup
    sets = json.loads((out / "eval_sets.json").read_text())
    used = set(HARMFUL[:7]) | set(HARMLESS[:5])
    assert sets["harmful"] == HARMFUL[7:10] and not used & set(sets["harmful"] + sets["harmless"])
    assert json.loads((out / "run.json").read_text())["eval"]["harmful_removed"] == 7


def test_the_written_config_reads_back_to_the_same_settings(run, setup):
    out, _ = run
    _, cfg, _ = setup
    again = load_config(out / "config.toml", cfg.profile)
    assert again.sections() == cfg.sections()
    assert to_toml(again) == (out / "config.toml").read_text()


def test_a_rerun_skips_every_stage(run, setup, monkeypatch):
    out, summary = run
    model, cfg, _ = setup

    def boom(ctx, folder):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(stages_mod, "STAGES", tuple(stages_mod.Stage(s.name, boom, s.after, s.settings)
                                                    for s in stages_mod.STAGES))
    from suffix_analysis.reproduce import run as run_mod

    monkeypatch.setattr(run_mod, "STAGES", stages_mod.STAGES)
    again = reproduce(model, out, cfg, device="cpu", progress=False, figures=False)
    assert again == json.loads(json.dumps(summary))
    times = json.loads((out / "stages.json").read_text())
    assert all(times[n]["status"] == "cached" for n in STAGE_FOLDERS)


def test_changed_settings_are_refused_and_redo_recomputes_that_stage_and_the_later_ones(setup, tmp_path):
    model, cfg, data = setup
    out = tmp_path / "run"
    reproduce(model, out, cfg, device="cpu", progress=False, figures=False)
    before = {n: json.loads((out / n / "stage.json").read_text())["finished"] for n in STAGE_FOLDERS}
    sections = tiny_sections(data)
    sections["attack"]["num_steps"] = 3
    changed = build_config("gpu", sections)
    with pytest.raises(UserError, match="attack was made with other settings.*--redo attack"):
        reproduce(model, out, changed, device="cpu", progress=False, figures=False)
    reproduce(model, out, changed, device="cpu", progress=False, figures=False, redo=["attack"])
    times = json.loads((out / "stages.json").read_text())
    assert [times[n]["status"] for n in STAGE_FOLDERS] == ["cached", "cached", "ran", "ran", "ran", "ran"]
    assert json.loads((out / "direction" / "stage.json").read_text())["finished"] == before["direction"]
    assert len(json.loads((out / "attack" / "suffix.json").read_text())["losses"]) == 3


def test_figures_redraw_from_the_tables_without_torch_or_the_model_cache(run, tmp_path):
    out, _ = run
    redrawn = tmp_path / "figs"
    cache = tmp_path / "no-cache"
    code = ("import sys; from suffix_analysis.cli import main; rc = main(['figures', sys.argv[1], '--out', sys.argv[2]]); "
            "bad = [m for m in ('torch', 'transformers', 'transformer_lens') if m in sys.modules]; "
            "print('IMPORTED', bad); sys.exit(rc or bool(bad))")
    env = {**os.environ, "SUFFIX_ANALYSIS_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code, str(out), str(redrawn)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "IMPORTED []" in res.stdout
    assert len(list(redrawn.glob("*.png"))) == 11
    assert not cache.exists()


def test_figures_of_a_folder_without_tables_is_a_clear_error(tmp_path, capsys):
    from suffix_analysis.cli import main

    assert main(["figures", str(tmp_path)]) == 2
    assert "none of the tables" in capsys.readouterr().err
    assert main(["figures", str(tmp_path / "missing")]) == 2
    assert "run folder not found" in capsys.readouterr().err


def test_a_run_folder_of_another_model_is_refused(run, setup):
    out, _ = run
    _, cfg, _ = setup
    with pytest.raises(UserError, match="reproduce run of .*not other-model"):
        reproduce("other-model", out, cfg, device="cpu", progress=False)


@pytest.mark.parametrize("text, match", [
    ("[runs]\nn_eval = 3\n", r"unknown section \[runs\]; did you mean \[run\]\?"),
    ("[attack]\nsearch_widht = 3\n", r"unknown key search_widht in \[attack\]; did you mean search_width\?"),
    ("[run]\nn_eval = 'ten'\n", r"\[run\] n_eval must be int"),
    ("[run]\nn_eval = 0\n", r"n_eval.*at least 1"),
    ("[direction]\nn_train = 0\n", "n_train"),
    ("[run\nn_eval = 3\n", "not valid TOML"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, text, match):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=match):
        load_config(path)


def test_defaults_are_the_papers_and_quick_is_sized_for_a_cpu():
    paper, quick = build_config("gpu"), build_config("cpu")
    assert (paper.direction.n_train, paper.direction.n_val, paper.run.n_eval) == (128, 32, 100)
    assert (paper.gcg.suffix_len, paper.gcg.search_width, paper.gcg.num_steps) == (20, 512, 250)
    assert quick.gcg.search_width == CPU["attack"]["search_width"] < paper.gcg.search_width
    assert quick.direction.n_train < paper.direction.n_train and quick.run.n_eval < paper.run.n_eval
    # a file's value wins over the profile's
    assert build_config("cpu", {"run": {"n_eval": 7}}).run.n_eval == 7


def test_the_example_config_in_the_repository_loads():
    path = Path(__file__).resolve().parents[1] / "configs" / "reproduce.toml"
    cfg = load_config(path)
    assert cfg.sections() == build_config("gpu").sections()


def test_the_command_line_runs_reproduce_with_a_config_file(setup, tmp_path, capsys):
    from suffix_analysis.cli import main

    model, cfg, _ = setup
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    out = tmp_path / "run"
    rc = main(["reproduce", "--model", model, "--out", str(out), "--config", str(path), "--device", "cpu",
               "--profile", "gpu", "-q", "--no-figures", "--json"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "refused, direction ablated" in text and "stage seconds" in text
    # the baseline refusal rate, counted here from the evaluation stage's saved completions
    rows = json.loads((out / "evaluation" / "completions_baseline_harmful.json").read_text())
    assert rows and json.loads(text.strip().splitlines()[-1])["refusal_baseline"] == sum(
        r["refused"] for r in rows) / len(rows)
    assert not (out / "figures").exists()


def _tables(out: Path) -> dict:
    """Every CSV of a run, without the columns that time things."""
    import pandas as pd

    return {str(p.relative_to(out)): pd.read_csv(p).drop(columns=["seconds"], errors="ignore")
            for p in sorted(out.rglob("*.csv"))}


@pytest.mark.parametrize("where", ["evaluation", "attack"])
def test_a_run_killed_mid_stage_resumes_to_the_same_tables_and_figures(run, setup, tmp_path, monkeypatch, where):
    import pandas as pd

    from suffix_analysis.attacks.gcg import search

    clean, _ = run
    model, cfg, _ = setup
    out = tmp_path / "run"
    if where == "evaluation":  # after the orthogonalized export, before any table
        monkeypatch.setattr(stages_mod, "evaluate_direction", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x")))
        expect = RuntimeError
    else:  # GCG interrupted after its first step (it checkpoints on the way out)
        step = search.GCG._step
        calls = []

        def interrupted(self, *a, **k):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return step(self, *a, **k)

        monkeypatch.setattr(search.GCG, "_step", interrupted)
        expect = KeyboardInterrupt
    with pytest.raises(expect):
        reproduce(model, out, cfg, device="cpu", progress=False)
    assert not (out / where / "stage.json").exists() and not (out / "summary.json").exists()
    if where == "attack":
        assert (out / "attack" / "checkpoint.json").is_file()
    monkeypatch.undo()
    reproduce(model, out, cfg, device="cpu", progress=False)
    times = json.loads((out / "stages.json").read_text())
    assert times[where]["status"] == "ran" and times["direction"]["status"] == "cached"
    a, b = _tables(clean), _tables(out)
    assert a.keys() == b.keys()
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=False, rtol=1e-5, atol=1e-6, obj=name)
    for png in sorted((clean / "figures").glob("*.png")):
        assert png.read_bytes() == (out / "figures" / png.name).read_bytes(), png.name


def test_figures_refuse_a_missing_table_of_a_finished_stage_and_a_table_of_another_model(run, tmp_path):
    import shutil

    from suffix_analysis.figures import draw_all

    out, _ = run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "transfer" / "transfer.csv").unlink()
    with pytest.raises(UserError, match="transfer.csv is missing though the transfer stage finished.*--redo transfer"):
        draw_all(copy)
    shutil.copy(out / "transfer" / "transfer.csv", copy / "transfer" / "transfer.csv")
    rec = json.loads((copy / "attack" / "suffix.json").read_text())
    (copy / "attack" / "suffix.json").write_text(json.dumps({**rec, "model": "someone-else"}))
    with pytest.raises(UserError, match="suffix.json is from model someone-else"):
        draw_all(copy)


def test_a_setting_added_since_a_stage_ran_matches_at_its_default_only(run, setup):
    from suffix_analysis.reproduce.stages import STAGES, Context

    out, _ = run
    model, cfg, _ = setup
    ctx = Context(out=out, config=cfg, model=model)
    attack = next(s for s in STAGES if s.name == "attack")
    for s in STAGES:
        rec = json.loads((out / s.name / "stage.json").read_text()) if (out / s.name / "stage.json").is_file() else None
        if rec:
            ctx.keys[s.name] = rec["key"]
    rec = json.loads((out / "attack" / "stage.json").read_text())
    assert attack.matches(rec, ctx)
    del rec["inputs"]["settings"]["attack"]["words_only"]  # as if recorded before the setting existed
    assert attack.matches(rec, ctx)
    import dataclasses

    ctx.config = dataclasses.replace(cfg, gcg=dataclasses.replace(cfg.gcg, words_only=True))
    assert not attack.matches(rec, ctx)


def test_evaluation_judges_harmless_completions_for_compliance_only_when_asked(tiny):
    import torch

    from suffix_analysis.evaluation.compliance import Calibration, ComplianceResult
    from suffix_analysis.evaluation.report import evaluate_direction

    judged = []

    class Stub:
        def judge(self, instructions, completions, refused, progress=False, max_new_tokens=None):
            judged.append(list(instructions))
            cal = Calibration(0.0, 1, 1, 0.0, 1.0, 0.0, 0.0, {}, "stub", "", "", {})
            return ComplianceResult(["derailed"] * len(completions), [None] * len(completions),
                                    [None] * len(completions), 0, cal)

    r = torch.randn(tiny.d_model)
    for flag in (True, False):
        judged.clear()
        rows = evaluate_direction(tiny, r, 1, HARMFUL[:2], HARMLESS[:2], max_new_tokens=2, compliance=Stub(),
                                  judge_harmless=flag)
        assert sum(j == HARMLESS[:2] for j in judged) == (3 if flag else 0)  # baseline, ablation, actadd
        assert sum(j == HARMFUL[:2] for j in judged) == 3
        assert ("harmless_complied_rate" in rows[0]) is flag and rows[0]["harmful_derailed_rate"] == 1.0
