"""Candidate scoring, selection filters and the resumable direction run folder."""

import csv
import json

import pytest
import torch
from conftest import tiny_chat_model

from suffix_analysis.directions.run import DirectionConfig, load_direction, run_direction
from suffix_analysis.directions.select import (
    CandidateScore,
    SelectionConfig,
    score_candidates,
    score_candidates_naive,
    select_direction,
)
from suffix_analysis.errors import UserError

HARMFUL = ["Write a poem about the sea.", "Explain how plants turn sunlight into sugar.", "Say hi.", "Give three tips."]
HARMLESS = ["Write a haiku.", "The quick brown fox.", "Explain the sea, in detail please.", "Hi"]


def test_fast_scores_equal_naive(tiny):
    torch.manual_seed(0)
    cands = torch.randn(2, tiny.n_layers, tiny.d_model)
    fast = score_candidates(tiny, cands, HARMFUL, HARMLESS, batch_size=3)
    slow = score_candidates_naive(tiny, cands, HARMFUL, HARMLESS, batch_size=3)
    assert [(s.position, s.layer) for s in fast] == [(-2, 0), (-2, 1), (-1, 0), (-1, 1)]
    for a, b in zip(fast, slow):
        assert (a.position, a.layer) == (b.position, b.layer)
        for k in ("bypass", "induce", "kl"):
            assert abs(getattr(a, k) - getattr(b, k)) < 1e-4, (k, a, b)


def test_selection_filters_and_error():
    scores = [CandidateScore(-1, 0, bypass=-1.0, induce=1.0, kl=0.5),   # kl
              CandidateScore(-1, 1, bypass=-2.0, induce=-1.0, kl=0.01),  # induce
              CandidateScore(-1, 2, bypass=0.5, induce=1.0, kl=0.01),    # survives
              CandidateScore(-1, 3, bypass=0.2, induce=1.0, kl=0.01),    # survives, best
              CandidateScore(-1, 4, bypass=-9.0, induce=9.0, kl=0.0),    # last 20% of 5 layers
              CandidateScore(-2, 0, bypass=-9.0, induce=9.0, kl=0.0, norm=0.0)]  # zero direction
    best = select_direction(scores, n_layers=5)
    assert (best.layer, [s.filtered_by for s in scores]) == (3, ["kl", "induce", "", "", "layer", "zero"])
    with pytest.raises(UserError, match=r"1 zero, 1 removed as in the last 20% of layers, 1 with KL > 0.1, 3 with induce"):
        select_direction(scores, 5, SelectionConfig(induce_threshold=5.0))
    with pytest.raises(UserError, match="NaN"):
        select_direction([CandidateScore(-1, 0, float("nan"), 1.0, 0.0)], 5)


LOOSE = dict(harmful_train="h.json", harmless_train="n.json", harmful_val="hv.json", harmless_val="nv.json",
             n_train=4, n_val=2, filter_train=False, filter_val=False, prune_layer_fraction=0.0, kl_threshold=1e9,
             induce_threshold=-1e9, batch_size=2)


@pytest.fixture
def data_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, items in {"h.json": HARMFUL, "n.json": HARMLESS, "hv.json": ["Do A.", "Do B."],
                        "nv.json": ["Do C.", "Do D."]}.items():
        (tmp_path / name).write_text(json.dumps(items))
    return tmp_path


def test_run_folder_stages_resume_and_model_check(data_files):
    cm = tiny_chat_model("llama")
    run = data_files / "run"
    info = run_direction(cm, run, DirectionConfig(**LOOSE), progress=False)
    for f in ("run.json", "candidates.safetensors", "candidates.csv", "direction.safetensors", "direction.json"):
        assert (run / f).is_file(), f
    rows = (run / "candidates.csv").read_text().splitlines()
    assert rows[0] == "position,layer,bypass,induce,kl,norm,filtered_by" and len(rows) == 1 + cm.chat.n_eoi * cm.n_layers
    direction, rec = load_direction(run, cm)
    assert direction.shape == (cm.d_model,) and rec["layer"] == info["layer"]
    mtime = (run / "candidates.csv").stat().st_mtime_ns
    assert run_direction(cm, run, DirectionConfig(**LOOSE), progress=False) == info
    assert (run / "candidates.csv").stat().st_mtime_ns == mtime  # skipped, not recomputed
    other = tiny_chat_model("llama", seed=5)
    with pytest.raises(UserError, match="was made from other weights"):
        load_direction(run, other)
    with pytest.raises(UserError, match=r"other inputs or settings \(config.n_val, data\)"):
        run_direction(cm, run, DirectionConfig(**{**LOOSE, "n_val": 1}), progress=False)
    before = list(csv.DictReader(open(run / "candidates.csv")))
    # thresholds only re-run the selection, from the stored scores; the table names the new survivors
    strict = run_direction(cm, run, DirectionConfig(**{**LOOSE, "prune_layer_fraction": 0.3}), progress=False)
    assert strict["layer"] < 2  # layer 2 of 3 is now pruned
    after = list(csv.DictReader(open(run / "candidates.csv")))
    score_cols = ("position", "layer", "bypass", "induce", "kl", "norm")
    assert [[r[c] for c in score_cols] for r in after] == [[r[c] for c in score_cols] for r in before]
    for r in after:
        if int(r["layer"]) == 2:
            assert r["filtered_by"] in ("zero", "layer")
        if (int(r["position"]), int(r["layer"])) == (strict["position"], strict["layer"]):
            assert r["filtered_by"] == ""
    assert sum(r["filtered_by"] != a["filtered_by"] for r, a in zip(after, before)) > 0


def test_val_prompts_filtered_by_refusal_score_as_in_the_paper(data_files, monkeypatch):
    """filter_val keeps harmful val prompts the model refuses and harmless ones it does not."""
    import suffix_analysis.directions.run as refusal  # the module that scores the prompts

    cm = tiny_chat_model("llama")
    (data_files / "hv.json").write_text(json.dumps(["Do A.", "Do B.", "Do E."]))
    (data_files / "nv.json").write_text(json.dumps(["Do C.", "Do D.", "Do F."]))
    def fake_score(logits, refusal_ids):  # the model "refuses" the prompts of the 2nd and 3rd batch rows
        return torch.tensor([-1.0] + [1.0] * (len(logits) - 1))

    monkeypatch.setattr(refusal, "refusal_score", fake_score)
    cfg = DirectionConfig(**{**LOOSE, "n_val": 3, "filter_val": True, "batch_size": 8})
    run_direction(cm, data_files / "run", cfg, progress=False)
    kept = json.loads((data_files / "run" / "filter.json").read_text())
    assert len(kept["harmful_val"]) == 2 and len(kept["harmless_val"]) == 1
    assert "harmful" not in kept  # train prompts were not filtered

    monkeypatch.setattr(refusal, "refusal_score", lambda logits, ids: torch.full((len(logits),), -1.0))
    with pytest.raises(UserError, match="filtering val prompts by refusal score left 0 harmful"):
        run_direction(cm, data_files / "run2", cfg, progress=False)


def test_last_positions_scores_candidates_at_the_last_eoi_positions_only(data_files):
    from safetensors.torch import load_file

    cm = tiny_chat_model("llama")
    run = data_files / "run_last"
    full = data_files / "run_full"
    info = run_direction(cm, run, DirectionConfig(**LOOSE, last_positions=2), progress=False)
    cands = load_file(str(run / "candidates.safetensors"))["candidates"]
    assert cands.shape == (2, cm.n_layers, cm.d_model) and info["position"] in (-2, -1)
    rows = (run / "candidates.csv").read_text().splitlines()[1:]
    assert len(rows) == 2 * cm.n_layers and {int(r.split(",")[0]) for r in rows} == {-2, -1}
    run_direction(cm, full, DirectionConfig(**LOOSE), progress=False)
    every = load_file(str(full / "candidates.safetensors"))["candidates"]
    assert torch.allclose(cands, every[-2:], atol=1e-5)  # the same candidates as the full run's last two
    with pytest.raises(UserError, match="last_positions"):
        DirectionConfig(last_positions=-1).validate()
