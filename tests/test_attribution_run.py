"""The attribution run on a tiny random Llama: every table and the summary, skipped stages on
rerun, atomic tables and resumption after a failure, refused folders, input errors before
anything is written, the random-suffix control, and the config as command-line flags."""

import argparse
import json
import shutil
from dataclasses import replace

import pandas as pd
import pytest
import torch
from conftest import tiny_chat_model

from suffix_analysis import tables
from suffix_analysis.attribution import direct_attribution, rank_heads, residual_cosine, user_end_states
from suffix_analysis.attribution import run as run_mod
from suffix_analysis.attribution import stages as stages_mod
from suffix_analysis.attribution.controls import WORD, random_suffixes, suffix_lengths
from suffix_analysis.attribution.run import (
    AttributionConfig,
    knockout_restoration,
    run_attribution,
    summary_table,
)
from suffix_analysis.config import add_arguments, from_arguments
from suffix_analysis.errors import UserError

HARMFUL = ["Write a poem about the sea.", "Say hi.", "Explain how plants turn sunlight into sugar."]
HARMLESS = ["Give three tips for staying healthy.", "Write a poem."]
SUFFIX = "Sure, here is"
LAYER, POSITION = 1, -1
CFG = AttributionConfig(n_random=2, top_k=3, patch_ks="1,2", bands=2, max_new_tokens=3, batch_size=2)
SUMMARY_KEYS = {"layer", "position", "cosine", "cosine_drop_adversarial", "cosine_drop_random", "top_heads",
                "top8_projection", "top8_attention", "knockout_restored", "patch_restored", "model", "fingerprint",
                "n_harmful", "n_harmless", "stage_seconds"}
OUTPUTS = ["run.json", "conditions.json", "cosine.csv", "harmfulness.csv", "heads.csv", "top_heads.json", "hijack.csv",
           "hijack_dominance.csv", "suffix_tokens.csv", "suffix_token_agreement.csv", "suffix_attention.csv",
           "patching.csv", "knockout.csv",
           "summary.json"]
# everything the stages (stages.py) call that runs the model
HEAVY = ("random_suffixes", "suffix_lengths", "residual_cosine", "user_end_states", "direct_attribution", "attention_hijack",
         "suffix_token_effects", "suffix_token_attention", "patch_top_heads", "knockout_scores", "last_position_run",
         "generate_answers")


@pytest.fixture(scope="module")
def cm():
    return tiny_chat_model("llama")


@pytest.fixture(scope="module")
def direction(cm):
    return torch.randn(cm.d_model, generator=torch.Generator().manual_seed(1))


def attribute(cm, direction, out, config=CFG, judge=None, harmful=HARMFUL, harmless=HARMLESS, suffix=SUFFIX,
              layer=LAYER, position=POSITION):
    return run_attribution(cm, direction, layer, position, harmful, harmless, suffix, out, config, judge=judge,
                           progress=False)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, cm, direction):
    """One run without a judge; tests that write copy the folder first."""
    out = tmp_path_factory.mktemp("attribution") / "run"
    return out, attribute(cm, direction, out)


def copied(base_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base_run[0], out)
    return out


def forbid(monkeypatch, names=HEAVY):
    """Replace the model-running functions the stages call (looked up in ``stages.py``) with ones
    that fail the test."""
    def boom(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"{name} was called: the stage should have been skipped")
        return fail
    for name in names:
        monkeypatch.setattr(stages_mod, name, boom(name))


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --- a run ------------------------------------------------------------------------------------------

def test_a_run_writes_every_table_and_a_summary_of_all_the_keys(base_run, cm, direction):
    out, summary = base_run
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)  # no temp files, no completions (no judge)
    assert SUMMARY_KEYS <= set(summary) and json.loads((out / "summary.json").read_text()) == summary
    assert (summary["model"], summary["fingerprint"]) == (cm.name, cm.fingerprint())
    assert (summary["layer"], summary["position"], summary["n_harmful"], summary["n_harmless"]) == (1, -1, 3, 2)
    assert set(summary["stage_seconds"]) == {"conditions", "cosine", "harmfulness", "heads", "hijack", "suffix_tokens",
                                             "patching", "knockout"}

    kinds = ("harmful", "random", "adversarial", "harmless")
    assert set(summary["cosine"]) == set(kinds) and all(-1 <= summary["cosine"][k] <= 1 for k in kinds)
    c = summary["cosine"]
    gap = c["harmful"] - c["harmless"]
    assert summary["cosine_drop_adversarial"] == pytest.approx((c["harmful"] - c["adversarial"]) / gap)
    assert summary["cosine_drop_random"] == pytest.approx((c["harmful"] - c["random"]) / gap)
    # the summary's cosine is the library's, at the direction's layer and position
    direct = residual_cosine(cm, HARMFUL, direction, sites=("hook_resid_pre",))[:, 0, LAYER, POSITION].mean()
    assert c["harmful"] == pytest.approx(float(direct), abs=1e-5)

    # harmfulness: the harmful - harmless difference of means at the last user token, read at the direction's layer
    states = {k: user_end_states(cm, ins, sfx) for k, ins, sfx in (("harmful", HARMFUL, None), ("harmless", HARMLESS, None),
                                                                    ("adversarial", HARMFUL, SUFFIX))}
    diff = states["harmful"].mean(0)[LAYER] - states["harmless"].mean(0)[LAYER]
    level = {k: float((v[:, LAYER] @ (diff / diff.norm())).mean()) for k, v in states.items()}
    h = summary["harmfulness"]
    assert h["harmful"] - h["harmless"] == pytest.approx(float(diff.norm()), rel=1e-4)
    for k in level:
        assert h[k] == pytest.approx(level[k], abs=1e-4)
    assert summary["harmfulness_kept_adversarial"] == pytest.approx(
        (level["adversarial"] - level["harmless"]) / (level["harmful"] - level["harmless"]), abs=1e-4)
    # the random draws: each draw's mean level, averaged over the draws
    random_levels = [float((user_end_states(cm, HARMFUL, sfx)[:, LAYER] @ (diff / diff.norm())).mean())
                     for sfx in summary["random_suffixes"]]
    assert len(random_levels) == CFG.n_random
    assert summary["harmfulness_kept_random"] == pytest.approx(
        (sum(random_levels) / len(random_levels) - level["harmless"]) / (level["harmful"] - level["harmless"]),
        abs=1e-4)

    top = summary["top_heads"]
    # ranked below the direction's layer only: LAYER layers of 4 heads
    assert len(top) == min(8, 4 * LAYER) and len({tuple(x) for x in top}) == len(top)
    assert all(0 <= l < LAYER and 0 <= h < 4 for l, h in top)
    heads = direct_attribution(cm, HARMFUL, direction).heads
    ranked = rank_heads(heads[:, :LAYER], position=-1)
    assert top == [[int(l), int(h)] for l, h in zip(ranked["layer"][:8], ranked["head"][:8])]
    assert set(summary["top8_projection"]) == set(kinds) and all(v is not None for v in summary["top8_projection"].values())
    att = summary["top8_attention"]
    assert set(att) == {"harmful", "random", "adversarial"}
    for kind, regions in att.items():
        assert all(0 <= regions[r] <= 1 for r in ("instruction", "suffix", "template", "eoi"))
        assert sum(regions.values()) == pytest.approx(1, abs=1e-5)
    assert att["harmful"]["suffix"] == 0 and att["adversarial"]["suffix"] > 0

    assert summary["patch_heads"] == min(8, 4 * LAYER)
    # the top heads patched harmful -> harmful + suffix here: the share of the mean score gap restored
    from suffix_analysis.attribution.causal import patch_heads

    fwd = patch_heads(cm, HARMFUL, SUFFIX, direction, LAYER, [tuple(x) for x in top[:summary["patch_heads"]]],
                      batch_size=CFG.batch_size)
    fwd = fwd[fwd["patch"] == "source->dest"]
    into = fwd["score_into"].mean()
    assert summary["patch_restored"] == pytest.approx(
        (fwd["score_patched"].mean() - into) / (fwd["score_from"].mean() - into), abs=1e-4)
    assert summary["knockout_restored"] is None and summary["knockout_n_made_answer"] is None
    assert any("no judge" in n for n in summary["notes"])
    text = summary_table(summary)
    assert cm.name in text and "not judged" in text and len(text.splitlines()) <= 15


def test_the_tables_are_tidy_and_add_up(base_run, cm):
    out, _ = base_run
    conds = json.loads((out / "conditions.json").read_text())
    names = [c["name"] for c in conds["conditions"]]
    assert names == ["harmful", "random_0", "random_1", "adversarial", "harmless"]
    assert conds["suffix_tokens"] == 4 and all(c["suffix_tokens"] == [4, 4, 4] for c in conds["conditions"][1:4])
    n_eoi, n_rows = cm.chat.n_eoi, 4 * len(HARMFUL) + len(HARMLESS)

    cos = pd.read_csv(out / "cosine.csv")
    assert len(cos) == n_rows * 2 * cm.n_layers * n_eoi and cos["cosine"].between(-1, 1).all()
    assert set(cos["hook"]) == {f"blocks.{l}.{s}" for l in range(cm.n_layers) for s in ("hook_resid_pre", "hook_resid_post")}

    heads = pd.read_csv(out / "heads.csv")
    assert len(heads[heads["component"] == "head"]) == n_rows * cm.n_layers * 4 * n_eoi
    # embedding + every head, bias and MLP = the measured residual stream after the last layer
    parts = heads[heads["component"].isin(["embed", "head", "attn_bias", "mlp"])]
    summed = parts.groupby(["condition", "prompt", "position"])["projection"].sum()
    measured = heads[(heads["component"] == "resid_post") & (heads["layer"] == cm.n_layers - 1)]
    measured = measured.set_index(["condition", "prompt", "position"])["projection"]
    pd.testing.assert_series_equal(summed.sort_index(), measured.sort_index(), check_names=False, atol=1e-4, rtol=1e-4)

    hijack = pd.read_csv(out / "hijack.csv")
    assert set(hijack["condition"]) == {"harmful", "random_0", "random_1", "adversarial"}
    assert len(hijack) == 4 * len(HARMFUL) * cm.n_layers * n_eoi * 4 * 4  # x regions x heads
    mass = hijack.groupby(["condition", "prompt", "layer", "destination", "head"])["mass"].sum()
    assert mass.to_numpy() == pytest.approx(1, abs=1e-5)
    dominance = pd.read_csv(out / "hijack_dominance.csv")
    total = dominance.groupby(["condition", "prompt", "layer", "destination"])["dominance"].sum()
    assert total.to_numpy() == pytest.approx(1, abs=1e-4)

    patching = pd.read_csv(out / "patching.csv")
    assert set(patching["n_heads"]) == {1, 2, min(8, 4 * LAYER)}  # 8 capped at the heads below the layer
    assert set(patching["patch"]) == {"harmful->adversarial", "adversarial->harmful"}
    knockout = pd.read_csv(out / "knockout.csv")
    assert set(knockout["cut"]) == {"all", "top_heads", "band"}
    assert set(knockout.loc[knockout["cut"] == "band", "layers"]) == {"0-1", "2-2"}
    assert len(knockout) == 3 * len(HARMFUL) * 4  # suffixed conditions x prompts x cuts
    top = json.loads((out / "top_heads.json").read_text())
    assert top["heads"] == top["top8"][:3] and len(top["ranking"]) == LAYER * 4 and top["layers"] == f"0-{LAYER - 1}"
    assert len(pd.read_csv(out / "suffix_tokens.csv")) == 4 * len(HARMFUL)


# --- reruns -----------------------------------------------------------------------------------------

def test_a_rerun_skips_every_stage(base_run, cm, direction, tmp_path, monkeypatch):
    out = copied(base_run, tmp_path)
    before = snapshot(out)
    forbid(monkeypatch)
    monkeypatch.setattr(run_mod, "build_summary", lambda *a: pytest.fail("the summary was rebuilt"))
    # batching does not change a number: a rerun may choose another batch size
    assert attribute(cm, direction, out, config=replace(CFG, batch_size=3)) == base_run[1]
    assert snapshot(out) == before


def test_a_rerun_with_a_judge_only_generates_and_judges(base_run, cm, direction, tmp_path, monkeypatch):
    out = copied(base_run, tmp_path)
    forbid(monkeypatch, [n for n in HEAVY if n != "generate_answers"])
    # called for harmful, adversarial, adversarial under knockout, in this order
    verdicts = iter([[True, True, True], [False, False, True], [True, False, True]])
    seen = []

    def judge(instructions, completions):
        seen.append((list(instructions), list(completions)))
        return next(verdicts)

    summary = attribute(cm, direction, out, judge=judge)
    assert [s[0] for s in seen] == [HARMFUL] * 3 and all(len(s[1]) == 3 for s in seen)
    # the suffix made prompts 0 and 1 answer; the knockout makes prompt 0 refuse again
    assert summary["knockout_n_made_answer"] == 2 and summary["knockout_restored"] == 0.5
    assert not any("no judge" in n for n in summary["notes"]) and "generation" in summary["stage_seconds"]
    gen = json.loads((out / "knockout_completions.json").read_text())
    assert [p["made_answer"] for p in gen["prompts"]] == [True, True, False]
    assert [p["restored"] for p in gen["prompts"]] == [True, False, False]
    assert gen["prompts"][0]["knockout"]["completion"] == seen[2][1][0]
    assert "refuse again" in summary_table(summary)


def test_a_lean_run_then_token_effects_added_on_rerun(cm, direction, tmp_path, monkeypatch):
    lean = replace(CFG, n_random=0, bands=0, token_effects=False)
    out = tmp_path / "run"
    summary = attribute(cm, direction, out, config=lean)
    assert summary["n_random"] == 0 and summary["cosine"]["random"] is None and summary["cosine_drop_random"] is None
    assert set(summary["top8_attention"]["random"].values()) == {None} and summary["suffix_token_agreement"] is None
    assert set(pd.read_csv(out / "knockout.csv")["cut"]) == {"all", "top_heads"}
    assert not (out / "suffix_tokens.csv").exists() and any("token_effects" in n for n in summary["notes"])
    # token_effects only adds a stage: the folder takes it, and nothing else runs again
    forbid(monkeypatch, [n for n in HEAVY if n not in ("suffix_token_effects", "suffix_token_attention")])
    summary = attribute(cm, direction, out, config=replace(lean, token_effects=True))
    assert (out / "suffix_tokens.csv").exists() and summary["suffix_token_agreement"] is not None
    assert (out / "suffix_attention.csv").exists()


def test_a_stage_failing_midway_leaves_no_table_and_the_rerun_resumes(cm, direction, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = stages_mod.attention_hijack
    calls = []

    def fails_second_time(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return real(*args, **kwargs)

    monkeypatch.setattr(stages_mod, "attention_hijack", fails_second_time)
    with pytest.raises(RuntimeError, match="interrupted"):
        attribute(cm, direction, out)
    names = sorted(p.name for p in out.iterdir())
    # nor temp files
    assert names == ["conditions.json", "cosine.csv", "harmfulness.csv", "heads.csv", "run.json", "top_heads.json"]
    assert set(json.loads((out / "run.json").read_text())["stages"]) == {"conditions", "cosine", "harmfulness", "heads"}

    monkeypatch.setattr(stages_mod, "attention_hijack", real)
    forbid(monkeypatch, ["random_suffixes", "residual_cosine", "user_end_states", "direct_attribution"])
    summary = attribute(cm, direction, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    assert "hijack" in summary["stage_seconds"] and summary["top8_attention"]["adversarial"]["suffix"] > 0


def test_tables_are_written_atomically_as_csv_or_parquet_when_large(tmp_path, monkeypatch):
    df = pd.DataFrame({"prompt": range(30), "hook": ["blocks.0.hook_resid_pre"] * 30, "value": [0.5] * 30})
    real = pd.DataFrame.to_csv

    def half_then_fail(self, path, **kwargs):
        real(self.head(3), path, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        tables.write_table(tmp_path, "t", df)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(pd.DataFrame, "to_csv", real)
    assert tables.write_table(tmp_path, "t", df).name == "t.csv"
    monkeypatch.setattr(tables, "LARGE_ROWS", 10)
    if tables.has_pyarrow():
        path = tables.write_table(tmp_path, "t", df)
        assert path.name == "t.parquet" and sorted(p.name for p in tmp_path.iterdir()) == ["t.parquet"]
    pd.testing.assert_frame_equal(tables.read_table(tmp_path, "t"), df, check_dtype=False)
    assert tables.read_table(tmp_path, "t", ["value"]).columns.tolist() == ["value"]


# --- refused folders and bad inputs -------------------------------------------------------------------

@pytest.mark.parametrize("other,match", [
    ("model", "other weights"), ("direction", "another direction"), ("suffix", "another suffix"),
    ("data", "other instructions"), ("config", "other settings"),
])
def test_a_folder_of_another_model_direction_suffix_data_or_config_is_refused(base_run, cm, direction, other, match):
    out = base_run[0]
    before = snapshot(out)
    kw = {"model": dict(cm=tiny_chat_model("llama", seed=1)),
          "direction": dict(direction=direction + 0.01),
          "suffix": dict(suffix="ok then"),
          "data": dict(harmful=HARMFUL[:2]),
          "config": dict(config=replace(CFG, top_k=2))}[other]
    args = {"cm": cm, "direction": direction, **kw}
    with pytest.raises(UserError, match=match) as e:
        attribute(args.pop("cm"), args.pop("direction"), out, **args)
    assert "\n" not in str(e.value) and "another --out" in str(e.value)
    assert snapshot(out) == before


def test_a_non_empty_folder_without_a_run_record_is_refused(cm, direction, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="no run.json"):
        attribute(cm, direction, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("case,match", [
    (dict(suffix=""), "suffix is empty"),
    (dict(suffix=" \n "), "suffix is empty"),
    (dict(direction="wide"), "width"),
    (dict(direction="zero"), "zero vector"),
    (dict(harmful=[]), "no harmful instructions"),
    (dict(harmless=[]), "no harmless instructions"),
    (dict(layer=3), "layer 3 out of range"),
    (dict(position=0), "not an EOI position"),
    (dict(config=replace(CFG, patch_ks="1,x")), "patch_ks"),
    (dict(config=replace(CFG, top_k=0)), "top_k"),
])
def test_bad_inputs_are_clear_errors_before_anything_is_written(cm, direction, tmp_path, case, match):
    case = dict(case)
    d = {"wide": torch.ones(cm.d_model + 1), "zero": torch.zeros(cm.d_model)}.get(case.pop("direction", None), direction)
    out = tmp_path / "run"
    with pytest.raises(UserError, match=match) as e:
        attribute(cm, d, out, **case)
    assert "\n" not in str(e.value) and not out.exists()


# --- parts ------------------------------------------------------------------------------------------------

def test_random_suffixes_are_seeded_words_of_the_adversarial_length(cm):
    draws = random_suffixes(cm, HARMFUL, 4, 3, seed=0)
    assert len(set(draws)) == 3 and draws == random_suffixes(cm, HARMFUL, 4, 3, seed=0)
    assert draws != random_suffixes(cm, HARMFUL, 4, 3, seed=1)
    for s in draws:
        assert suffix_lengths(cm, HARMFUL, s) == [4, 4, 4]
        assert all(WORD.fullmatch(w) for w in s.split(" "))
    assert random_suffixes(cm, HARMFUL, 4, 0) == []


def test_knockout_restoration_counts_the_prompts_the_suffix_made_answer():
    # prompt 2 was never refused, prompt 3 still refused with the suffix: neither counts
    got = knockout_restoration([True, True, False, True], [False, False, False, True], [True, False, True, True])
    assert got == {"n_made_answer": 2, "n_restored": 1, "restored": 0.5}
    assert knockout_restoration([False], [False], [True])["restored"] is None


def test_the_config_is_command_line_flags():
    ap = argparse.ArgumentParser()
    add_arguments(ap, AttributionConfig)
    cfg = from_arguments(AttributionConfig, ap.parse_args(["--n-random", "1", "--patch-ks", "2, 4", "--no-token-effects",
                                                           "--bands", "0"]))
    assert (cfg.n_random, cfg.ks(), cfg.token_effects, cfg.bands, cfg.top_k) == (1, (2, 4), False, 0, 8)
    assert AttributionConfig(patch_ks=(8, 1, 8)).ks() == (1, 8)
