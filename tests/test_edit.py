"""The Pareto edit: the weight profile's shares, hooks that equal the weight edit, the search
and its folder, the chosen edit exported, bad input refused in one line."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_chat_model
from test_pipeline import data_files  # noqa: F401  (fixture)
from test_rdo import start  # noqa: F401  (fixture: a tiny model and its direction run)

from suffix_analysis.edits.pareto import ParetoConfig, choose, full_params, pareto_front, profile_of, run_pareto
from suffix_analysis.errors import UserError
from suffix_analysis.interventions.directional import ablation_hooks
from suffix_analysis.interventions.orthogonalize import orthogonalize_, writer_sites, writers
from suffix_analysis.interventions.profile import Tent, WeightProfile, profile_hooks
from suffix_analysis.models.hooks import run_with_hooks

IDS = torch.tensor([[1, 5, 7, 9, 11, 13, 2]])
FAST = dict(trials=6, startup_trials=3, batch_size=4)


def _logits(cm, hooks=()):
    with torch.no_grad(), run_with_hooks(cm, list(hooks)):
        return cm.model(input_ids=IDS).logits


def _hooked_and_baked(cm, direction, profile, preserve_norms=False):
    """The profile's hooks' logits, and a copy of ``cm`` with it baked into the weights; checks
    that the two give the same logits."""
    hooked = _logits(cm, profile_hooks(cm, direction, profile, preserve_norms))
    edited = copy.copy(cm)
    edited.model = copy.deepcopy(cm.model)
    orthogonalize_(edited, direction, scales=profile.sites(cm.n_layers), preserve_norms=preserve_norms)
    assert torch.allclose(_logits(edited), hooked, atol=1e-4)
    return hooked, edited


def test_tent_shares():
    t = Tent(max_weight=1.2, peak=3.0, min_weight=0.2, distance=2.0)
    assert t.weights(7) == pytest.approx([0.0, 0.2, 0.7, 1.2, 0.7, 0.2, 0.0])
    assert WeightProfile.full().sites(3) == {s: 1.0 for s in WeightProfile.full().sites(3)}
    assert profile_of(full_params(30)).sites(30) == pytest.approx(WeightProfile.full().sites(30))
    with pytest.raises(UserError, match="distance must be above 0"):
        Tent(distance=0).weights(3)


def test_full_profile_hooks_equal_the_papers_ablation():
    cm = tiny_chat_model("llama")
    r = torch.randn(cm.d_model)
    assert torch.allclose(_logits(cm, profile_hooks(cm, r, WeightProfile.full())), _logits(cm, ablation_hooks(cm, r)),
                          atol=1e-5)


@pytest.mark.parametrize("rank", [1, 2])
def test_partial_weight_edit_equals_its_hooks(rank):
    """A profile baked into the weights gives what its hooks give, and differs from both the
    clean model and the full ablation (so the shares matter)."""
    cm = tiny_chat_model("llama")
    torch.manual_seed(0)
    direction = torch.randn(cm.d_model) if rank == 1 else torch.randn(rank, cm.d_model)
    profile = WeightProfile(attn=Tent(1.4, 0.3, 0.2, 1.5), mlp=Tent(0.6, 1.0, 0.0, 1.0), embed=0.5)
    hooked, edited = _hooked_and_baked(cm, direction, profile)
    assert not torch.allclose(hooked, _logits(cm), atol=1e-3)
    if rank == 1:
        assert not torch.allclose(hooked, _logits(cm, ablation_hooks(cm, direction)), atol=1e-3)
    with pytest.raises(UserError, match="no residual writer of this model"):
        orthogonalize_(edited, direction, scales={"blocks.99.hook_mlp_out": 1.0})


@pytest.mark.parametrize("rank,bias", [(1, False), (2, False), (1, True)])
def test_norm_preserving_edit_equals_its_hooks_and_keeps_row_norms(rank, bias):
    """heretic's row normalization, exact: the linear writers keep their row norms, the hooks
    give what the baked weights give (with biases too, where the family has them), and it is
    another edit than the plain one."""
    cm = tiny_chat_model("llama", attention_bias=bias, mlp_bias=bias)  # biases on both output projections
    assert any(name.endswith("o_proj.bias") for name in writers(cm)) == bias
    torch.manual_seed(2)
    direction = torch.randn(cm.d_model) if rank == 1 else torch.randn(rank, cm.d_model)
    profile = WeightProfile(attn=Tent(1.3, 0.4, 0.3, 1.5), mlp=Tent(0.7, 1.0, 0.1, 1.0), embed=0.5)
    hooked, edited = _hooked_and_baked(cm, direction, profile, preserve_norms=True)
    plain, _ = _hooked_and_baked(cm, direction, profile)
    assert not torch.allclose(hooked, plain, atol=1e-3)
    shares = profile.sites(cm.n_layers)
    for name, (kind, site) in writer_sites(cm).items():
        before, after = cm.model.get_parameter(name), edited.model.get_parameter(name)
        if kind == "out":
            assert torch.allclose(after.norm(dim=1), before.norm(dim=1), rtol=1e-4)
            assert torch.allclose(after, before) == (shares[site] == 0)


def test_layer_direction_mixes_the_two_layers_around_it():
    from suffix_analysis.directions.extract import layer_direction

    dirs = torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.0, -1.0]])
    assert torch.allclose(layer_direction(dirs, 1.0), torch.tensor([0.0, 1.0]))
    assert torch.allclose(layer_direction(dirs, 0.5), torch.tensor([1.0, 1.0]) / 2 ** 0.5)
    assert torch.allclose(layer_direction(dirs, 2.0), torch.tensor([0.0, -1.0]))
    with pytest.raises(ValueError, match="outside"):
        layer_direction(dirs, 2.5)
    zero = torch.tensor([[0.0, 0.0], [0.0, 3.0]])  # an EOI token's embedding: no difference at layer 0
    assert torch.allclose(layer_direction(zero, 0.5), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="is 0 at layer"):
        layer_direction(zero, 0.0)


def test_the_direction_layer_range_holds_the_selected_layer():
    from suffix_analysis.edits.pareto import space

    d = space(30, 1.5, 16)["direction_layer"]
    assert (d.low, d.high) == pytest.approx((0.4 * 29, 0.9 * 29))  # heretic's range
    assert space(30, 1.5, 5)["direction_layer"].low == 5  # widened: trial 0 (the paper's edit) is in it
    assert "direction_layer" not in space(30, 1.5)


def test_per_layer_directions_weight_edit_equals_its_hooks():
    """heretic's per-layer scope: each writer removes its own layer's direction; baked into the
    weights it gives what its hooks give, and differs from one direction for all."""
    from suffix_analysis.interventions.profile import per_layer_sites

    cm = tiny_chat_model("llama")
    torch.manual_seed(1)
    dirs = torch.randn(cm.n_layers, cm.d_model)
    sites = per_layer_sites(dirs)
    assert torch.equal(sites["blocks.0.hook_attn_out"], dirs[1]) and torch.equal(sites["blocks.0.hook_resid_pre"], dirs[1])
    assert torch.equal(sites[f"blocks.{cm.n_layers - 1}.hook_mlp_out"], dirs[-1])
    profile = WeightProfile(attn=Tent(1.2, 0.5, 0.4, 1.5), mlp=Tent(0.8, 1.0, 0.2, 1.0), embed=0.3)
    hooked, edited = _hooked_and_baked(cm, sites, profile)
    assert not torch.allclose(hooked, _logits(cm, profile_hooks(cm, dirs[1], profile)), atol=1e-3)
    with pytest.raises(UserError, match="no residual writer"):
        orthogonalize_(edited, {"blocks.99.hook_mlp_out": dirs[0]})


def test_front_and_choice():
    rows = [{"refused": 0.0, "kl": 0.3}, {"refused": 0.1, "kl": 0.05}, {"refused": 0.2, "kl": 0.04},
            {"refused": 0.2, "kl": 0.06}, {"refused": 0.5, "kl": 0.01}]
    front = pareto_front(rows)
    assert front == [rows[0], rows[1], rows[2], rows[4]]  # rows[3] is dominated by rows[2]
    assert choose(front, 0.1) is rows[1]  # fewest refusals within the KL bound
    assert choose(front, 0.001) is rows[4]  # none within: the lowest KL


def test_pareto_search_writes_its_folder_and_exports_the_choice(start):  # noqa: F811
    from suffix_analysis.directions.extract import layer_direction
    from suffix_analysis.directions.run import load_direction, load_layer_directions
    from suffix_analysis.interventions.profile import per_layer_sites
    from suffix_analysis.models.loading import load_model

    cm, d = start
    pristine = copy.deepcopy(cm.model)
    info = run_pareto(cm, d / "dim", d / "edit", ParetoConfig(**FAST, max_kl=1e9), progress=False)
    run = d / "edit"
    trials = json.loads((run / "trials.json").read_text())
    layer = json.loads((d / "dim" / "direction.json").read_text())["layer"]
    # trial 0: the paper's edit, the selected direction (its layer) removed from every writer
    assert len(trials) == 6 and trials[0]["params"] == full_params(cm.n_layers, layer, True, preserve_norms=False)
    assert trials[1]["params"] == {**trials[0]["params"], "preserve_norms": True}  # the same shares, norms kept
    assert len({t["params"]["direction_layer"] for t in trials}) > 1  # the direction layer is searched
    assert info["paper_edit"] == pytest.approx({k: trials[0][k] for k in ("refused", "kl", "score")})
    assert info["budget"]["trials"] == 6 and (run / "pareto.png").stat().st_size > 0
    front = (run / "front.csv").read_text().splitlines()
    assert len(front) - 1 == info["front"] >= 1
    chosen = trials[info["chosen"]["trial"]]
    assert chosen["refused"] == min(t["refused"] for t in trials)  # max_kl 1e9: the fewest refusals
    # the exported model is the chosen profile baked in: it scores as its hooks do
    exported = load_model(info["model_folder"], device="cpu")
    clean = copy.copy(cm)
    clean.model = pristine
    cands = load_layer_directions(d / "dim", clean)
    per_layer = chosen["params"]["direction_scope"] == "per layer"
    r = per_layer_sites(cands) if per_layer else layer_direction(cands, chosen["params"]["direction_layer"])
    hooked = _logits(clean, profile_hooks(clean, r, profile_of(chosen["params"]), chosen["params"]["preserve_norms"]))
    assert info["direction_layer"] == chosen["params"]["direction_layer"]
    assert info["preserve_norms"] == chosen["params"]["preserve_norms"]
    # the selected direction is its layer's candidate: trial 0 scores what the paper's edit does
    sel, _ = load_direction(d / "dim", clean)
    assert torch.allclose(layer_direction(cands, float(layer)), sel / sel.norm(), atol=1e-6)
    assert torch.allclose(_logits(exported), hooked, atol=1e-4)
    marker = json.loads((run / "model" / "suffix_analysis.json").read_text())
    assert marker["orthogonalized"] and marker["profile"] == info["profile"]


def test_pareto_search_resumes_and_extends(start):  # noqa: F811
    cm, d = start
    cfg = ParetoConfig(**{**FAST, "export": False})
    run_pareto(cm, d / "dim", d / "a", ParetoConfig(**{**FAST, "trials": 3, "export": False}), progress=False)
    first = json.loads((d / "a" / "trials.json").read_text())
    info = run_pareto(cm, d / "dim", d / "a", cfg, progress=False)  # more trials: the first 3 are kept
    again = json.loads((d / "a" / "trials.json").read_text())
    assert again[:3] == first and len(again) == 6 and info["budget"]["trials"] == 6
    assert "model_folder" not in info and not (d / "a" / "model").exists()


def test_pareto_bad_input(start, tmp_path):  # noqa: F811
    cm, d = start
    with pytest.raises(UserError, match="max_kl must be above 0"):
        run_pareto(cm, d / "dim", d / "x", ParetoConfig(max_kl=0), progress=False)
    with pytest.raises(UserError, match="no direction.safetensors in"):
        run_pareto(cm, tmp_path / "nothing", d / "x", ParetoConfig(**FAST), progress=False)
    with pytest.raises(UserError, match="holds no refusal cone"):
        run_pareto(cm, d / "dim", d / "x", ParetoConfig(**FAST, cone=True), progress=False)
    other = tiny_chat_model("llama", seed=1)
    with pytest.raises(UserError, match="other weights|another model|made from"):
        run_pareto(other, d / "dim", d / "y", ParetoConfig(**FAST), progress=False)
    run_pareto(cm, d / "dim", d / "e", ParetoConfig(**{**FAST, "trials": 2, "export": False}), progress=False)
    with pytest.raises(UserError, match="other inputs or settings"):
        run_pareto(cm, d / "dim", d / "e", ParetoConfig(**{**FAST, "trials": 2, "seed": 5}), progress=False)
    (d / "e" / "trials.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="not a trial list this suite wrote"):
        run_pareto(cm, d / "dim", d / "e", ParetoConfig(**{**FAST, "trials": 2, "export": False}), progress=False)
    assert not (d / "x").exists()


def test_pareto_search_on_named_selection_sets(start, tmp_path):  # noqa: F811
    cm, d = start
    (tmp_path / "h.txt").write_text("Do A.\nDo B.\nDo C.\n")
    (tmp_path / "n.txt").write_text("Say D.\nSay E.\n")
    info = run_pareto(cm, d / "dim", d / "named", ParetoConfig(**{**FAST, "trials": 2, "export": False},
                                                               harmful=str(tmp_path / "h.txt"),
                                                               harmless=str(tmp_path / "n.txt")), progress=False)
    assert info["prompts"]["n_harmful"] == 3 and info["prompts"]["n_harmless"] == 2
    assert info["prompts"]["harmful"].endswith("h.txt")
    (tmp_path / "h2.txt").write_text("Do F.\nDo G.\n")
    both = run_pareto(cm, d / "dim", d / "named2", ParetoConfig(**{**FAST, "trials": 2, "export": False},
                                                                harmful=f"{tmp_path / 'h.txt'}, {tmp_path / 'h2.txt'}",
                                                                harmless=str(tmp_path / "n.txt")), progress=False)
    assert both["prompts"]["n_harmful"] == 5  # a comma list: the sets one after the other
    with pytest.raises(UserError, match="not found"):
        run_pareto(cm, d / "dim", d / "named3", ParetoConfig(**{**FAST, "trials": 2, "export": False},
                                                             harmful=f"{tmp_path / 'h.txt'},nowhere.txt"),
                   progress=False)


def test_the_refusal_objective_also_reads_generated_tokens():
    """With judge_tokens the refused share also counts prompts whose generated tokens the judge
    calls refusals; a judge that finds none leaves the first-token count."""
    from suffix_analysis.edits.pareto import Scorer

    cm = tiny_chat_model("llama")
    harmful, harmless = ["Do A now.", "Do B.", "Make C please."], ["Say hi.", "Name a fruit."]
    r = torch.randn(cm.d_model, generator=torch.Generator().manual_seed(3))
    profile = WeightProfile(attn=Tent(0.5, 1.0, 0.5, 2.0), mlp=Tent(0.5, 1.0, 0.5, 2.0), embed=0.0)
    first = Scorer(cm, harmful, harmless, batch_size=2)(profile, r)
    said = []

    def everything(instructions, completions):
        said.extend(completions)
        return [True] * len(completions)

    assert Scorer(cm, harmful, harmless, 2, judge_tokens=3, judge=everything)(profile, r)["refused"] == 1.0
    assert len(said) == 3 and all(isinstance(c, str) for c in said)
    none = Scorer(cm, harmful, harmless, 2, judge_tokens=3, judge=lambda i, c: [False] * len(c))(profile, r)
    assert none["refused"] == first["refused"] and none["kl"] == pytest.approx(first["kl"], abs=1e-5)
    assert none["score"] == pytest.approx(first["score"], abs=1e-4)  # the first token's score, from generation
    with pytest.raises(UserError, match="judge_tokens"):
        ParetoConfig(judge_tokens=-1).validate()


def test_the_refusal_objective_counts_scores_within_the_margin():
    """With a margin a prompt counts as refused while its first-token refusal score is above
    -margin: the share grows with the margin, from the plain count to every prompt."""
    from suffix_analysis.edits.pareto import Scorer
    from suffix_analysis.metrics import refusal_score
    from suffix_analysis.models.forward import run_batches

    cm = tiny_chat_model("llama")
    harmful, harmless = ["Do A now.", "Do B.", "Make C please.", "Write D."], ["Say hi.", "Name a fruit."]
    r = torch.randn(cm.d_model, generator=torch.Generator().manual_seed(3))
    profile = WeightProfile(attn=Tent(0.5, 1.0, 0.5, 2.0), mlp=Tent(0.5, 1.0, 0.5, 2.0), embed=0.0)
    with torch.no_grad(), run_with_hooks(cm, profile_hooks(cm, r, profile)):
        s = refusal_score(run_batches(cm, cm.chat.tokenize(harmful), 2), cm.refusal_ids)
    # margins that put the cut between the prompts' scores, so each count is exact
    cuts = sorted(set([0.0] + [max(0.0, -v.item()) + 1e-3 for v in s]))
    assert len(cuts) >= 3  # some prompts below 0: the margin has something to count
    shares = [Scorer(cm, harmful, harmless, 2, margin=m)(profile, r)["refused"] for m in cuts]
    assert shares == [pytest.approx((s > -m).float().mean().item()) for m in cuts]
    assert shares == sorted(shares) and shares[-1] == 1.0
    assert shares[0] == Scorer(cm, harmful, harmless, 2)(profile, r)["refused"]
    with pytest.raises(UserError, match="margin"):
        ParetoConfig(margin=-1).validate()
