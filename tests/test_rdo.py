"""Refusal direction optimization: its terms move the direction, the run resumes exactly,
its folder reads as a direction run, bad input is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_chat_model
from test_pipeline import LOOSE, data_files  # noqa: F401  (fixture)

from suffix_analysis.directions.rdo import RDOConfig, run_rdo, score_direction
from suffix_analysis.directions.run import DirectionConfig, load_direction, run_direction
from suffix_analysis.errors import UserError

FAST = dict(steps=4, batch=2, target_tokens=3, n_prompts=4, lr=0.02, checkpoint_every=2)


@pytest.fixture
def start(data_files):  # noqa: F811
    cm = tiny_chat_model("llama")
    run_direction(cm, data_files / "dim", DirectionConfig(**LOOSE), progress=False)
    return cm, data_files


def test_rdo_learns_a_direction_that_loads_like_a_direction_run(start):
    cm, d = start
    before = [p.detach().clone() for p in cm.model.parameters()]
    info = run_rdo(cm, d / "dim", d / "rdo", RDOConfig(**FAST), progress=False)
    assert all(torch.equal(a, p) for a, p in zip(before, cm.model.parameters()))  # weights untouched
    assert all(p.requires_grad for p in cm.model.parameters())  # and as trainable as before
    dim, dim_info = load_direction(d / "dim", cm)
    direction, rdo_info = load_direction(d / "rdo", cm)  # every --direction consumer takes it
    assert rdo_info["layer"] == dim_info["layer"] and rdo_info["method"] == "rdo"
    assert direction.norm().item() == pytest.approx(dim.norm().item(), rel=1e-4)  # scaled as the start
    assert 0.5 < info["cosine_to_start"] < 1.0  # it moved, from where it started
    losses = [json.loads(x) for x in [json.dumps(r) for r in json.loads((d / "rdo" / "checkpoint.json").read_text())
                                      ["losses"]]]
    assert [r["step"] for r in losses] == [1, 2, 3, 4] and {"ablation", "addition", "retain"} <= set(losses[0])
    # the recorded scores are what scoring the saved direction gives
    again = score_direction(cm, direction, rdo_info["layer"], ["Do A.", "Do B."], ["Do C.", "Do D."])
    assert again == pytest.approx({k: info[k] for k in again}, abs=1e-5)


def test_rdo_resumes_to_the_same_direction(start):
    cm, d = start
    whole = run_rdo(cm, d / "dim", d / "whole", RDOConfig(**FAST), progress=False)
    run_rdo(cm, d / "dim", d / "split", RDOConfig(**{**FAST, "steps": 2}), progress=False)
    split = run_rdo(cm, d / "dim", d / "split", RDOConfig(**FAST), progress=False)  # more steps: resumes at 2
    a, _ = load_direction(d / "whole", cm)
    b, _ = load_direction(d / "split", cm)
    assert torch.allclose(a, b, atol=1e-6) and split["steps"] == whole["steps"] == 4


def test_each_term_pulls_its_way(start):
    """The ablation term alone lowers the harmful answers' loss under ablation."""
    cm, d = start
    cfg = RDOConfig(**{**FAST, "steps": 6, "addition_weight": 0.0, "retain_weight": 0.0, "lr": 0.1})
    run_rdo(cm, d / "dim", d / "abl", cfg, progress=False)
    losses = json.loads((d / "abl" / "checkpoint.json").read_text())["losses"]
    assert set(losses[0]) == {"step", "ablation", "seconds"}
    assert losses[-1]["ablation"] < losses[0]["ablation"]


def test_rdo_bad_input(start, tmp_path):
    cm, d = start
    with pytest.raises(UserError, match="steps, batch"):
        run_rdo(cm, d / "dim", d / "x", RDOConfig(steps=0), progress=False)
    with pytest.raises(UserError, match="no direction.safetensors in"):
        run_rdo(cm, tmp_path, d / "x", RDOConfig(**FAST), progress=False)
    other = tiny_chat_model("llama", seed=1)
    with pytest.raises(UserError, match="other weights|another model|made from"):
        run_rdo(other, d / "dim", d / "y", RDOConfig(**FAST), progress=False)
    run_rdo(cm, d / "dim", d / "rdo", RDOConfig(**FAST), progress=False)
    with pytest.raises(UserError, match="RDO starts from"):
        run_rdo(cm, d / "rdo", d / "z", RDOConfig(**FAST), progress=False)
    with pytest.raises(UserError, match="other inputs or settings"):
        run_rdo(cm, d / "dim", d / "rdo", RDOConfig(**{**FAST, "lr": 0.5}), progress=False)
    (d / "rdo" / "checkpoint.safetensors").write_bytes(b"junk")
    with pytest.raises(UserError, match="checkpoint.*unreadable"):
        run_rdo(cm, d / "dim", d / "rdo", RDOConfig(**{**FAST, "steps": 6}), progress=False)


def test_representational_independence_measure():
    """A direction is far from independent of itself; two directions in disjoint coordinates of
    a model whose layers do nothing are fully independent, and one measure is the other's
    mirror."""
    from suffix_analysis.directions.rdo import independence

    cm = tiny_chat_model("llama")
    prompts = ["Do A.", "Do B now."]
    r = torch.randn(cm.d_model, generator=torch.Generator().manual_seed(0))
    self_ = independence(cm, r, r, prompts)
    assert self_["cosine"] == pytest.approx(1.0) and self_["r_when_d_ablated_max"] > 0.01
    assert len(self_["r_when_d_ablated"]) == cm.n_layers
    still = tiny_chat_model("llama")
    with torch.no_grad():  # every layer writes nothing: the residual stream is the embedding
        for layer in still.model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    a, b = torch.zeros(cm.d_model), torch.zeros(cm.d_model)
    a[0], b[1] = 1.0, 1.0
    with torch.no_grad():  # and no token's embedding has anything along a or b
        still.model.model.embed_tokens.weight[:, :2] = 0.0
    both = independence(still, a, b, prompts)
    assert both["r_when_d_ablated_max"] == pytest.approx(0.0, abs=1e-6)
    assert both["d_when_r_ablated_max"] == pytest.approx(0.0, abs=1e-6)
    other = r + torch.randn(cm.d_model, generator=torch.Generator().manual_seed(1))
    mixed, swapped = independence(cm, r, other, prompts), independence(cm, other, r, prompts)
    assert swapped["r_when_d_ablated"] == pytest.approx(mixed["d_when_r_ablated"], abs=1e-5)
    assert mixed["cosine"] == pytest.approx(swapped["cosine"]) and mixed["cosine"] < 0.99


def test_rdo_learns_a_representationally_independent_direction(start):
    """With --independent-of the independence term is trained, the run starts orthogonal to
    that direction, and direction.json reports the measure against it."""
    cm, d = start
    cfg = RDOConfig(**{**FAST, "independent_of": str(d / "dim"), "independence_weight": 10.0})
    info = run_rdo(cm, d / "dim", d / "repind", cfg, progress=False)
    losses = json.loads((d / "repind" / "checkpoint.json").read_text())["losses"]
    assert "independence" in losses[0]
    assert abs(info["cosine_to_start"]) < 0.5  # a random start orthogonal to the difference in means
    ind = info["independence_of"]
    assert ind["run"] == str(d / "dim") and set(ind) >= {"cosine", "r_when_d_ablated_max", "d_when_r_ablated_max"}
    assert "independence_of_start" in info
    with pytest.raises(UserError, match="--cone-dim 1"):
        run_rdo(cm, d / "dim", d / "x", RDOConfig(**{**FAST, "independent_of": str(d / "dim"), "cone_dim": 2}),
                progress=False)


def test_a_cone_is_learned_checked_and_resumed(start):
    from safetensors.torch import load_file

    cm, d = start
    cfg = dict(FAST, cone_dim=2, cone_samples=3)
    run_rdo(cm, d / "dim", d / "cone", RDOConfig(**cfg), progress=False)
    basis = load_file(str(d / "cone" / "cone.safetensors"))["basis"]
    assert basis.shape == (2, cm.d_model) and torch.allclose(basis @ basis.T, torch.eye(2), atol=1e-5)
    checks = json.loads((d / "cone" / "cone.json").read_text())
    names = [r["vector"] for r in checks["vectors"]]
    assert names == ["basis 0", "basis 1", "sample 0", "sample 1", "sample 2", "subspace"]
    assert all("induce" in r for r in checks["vectors"][:-1]) and "induce" not in checks["vectors"][-1]
    assert 0 <= checks["samples_bypass_min"] <= 1 and 0 <= checks["samples_induce_min"] <= 1
    direction, info = load_direction(d / "cone", cm)  # the cone's mean direction serves as a direction
    assert info["cone_dim"] == 2
    mean = basis.sum(0)
    assert torch.allclose(direction / direction.norm(), mean / mean.norm(), atol=1e-5)
    run_rdo(cm, d / "dim", d / "cone2", RDOConfig(**{**cfg, "steps": 2}), progress=False)
    run_rdo(cm, d / "dim", d / "cone2", RDOConfig(**cfg), progress=False)
    assert torch.allclose(load_file(str(d / "cone2" / "cone.safetensors"))["basis"], basis, atol=1e-6)
    with pytest.raises(UserError, match="cone_dim must be between 1 and 5"):
        run_rdo(cm, d / "dim", d / "x", RDOConfig(**{**cfg, "cone_dim": 6}), progress=False)


def test_subspace_ablation_removes_the_whole_span():
    from suffix_analysis.interventions.directional import subspace_ablation_hooks

    cm = tiny_chat_model("llama")
    basis = torch.randn(3, cm.d_model)
    (_, hook), *_ = subspace_ablation_hooks(cm, basis)
    x = torch.randn(2, 5, cm.d_model)
    y = hook(x, None)
    assert (y @ basis.T).abs().max() < 1e-4  # nothing of the span is left
    q = torch.linalg.qr(basis.T).Q.T
    assert torch.allclose(y, x - (x @ q.T) @ q, atol=1e-5)  # and nothing else is removed
    with pytest.raises(UserError, match=r"shape \[k, 64\]"):
        subspace_ablation_hooks(cm, torch.randn(2, 32))


def test_orthogonalizing_a_subspace_equals_ablating_it():
    import copy

    from suffix_analysis.interventions.directional import subspace_ablation_hooks
    from suffix_analysis.interventions.orthogonalize import orthogonalize_
    from suffix_analysis.models.hooks import run_with_hooks

    cm = tiny_chat_model("llama")
    basis = torch.randn(2, cm.d_model)
    ids = torch.tensor([[1, 5, 7, 9, 11, 13]])
    with torch.no_grad(), run_with_hooks(cm, subspace_ablation_hooks(cm, basis)):
        ablated = cm.model(input_ids=ids).logits
    edited = copy.copy(cm)
    edited.model = copy.deepcopy(cm.model)
    orthogonalize_(edited, basis)
    with torch.no_grad():
        assert torch.allclose(edited.model(input_ids=ids).logits, ablated, atol=1e-4)


def test_orthogonalize_cone_needs_a_cone(start):
    from suffix_analysis.commands.orthogonalize import OrthogonalizeCommand, run_orthogonalize

    _, d = start
    with pytest.raises(UserError, match="holds no refusal cone"):
        run_orthogonalize(OrthogonalizeCommand(direction=str(d / "dim"), out=str(d / "o"), cone=True,
                                               model=_tiny_options(d), allow_other_model=True))
    assert not (d / "o").exists()


def _tiny_options(d):
    from conftest import make_tokenizer, tiny_llama

    from suffix_analysis.commands.common import ModelOptions

    folder = d / "tiny_model"
    tok = make_tokenizer("chatml")
    tiny_llama(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return ModelOptions(model=str(folder), device="cpu")


def test_cone_figure_is_drawn_from_its_table_alone(tmp_path):
    import pandas as pd

    from suffix_analysis.figures.cones import draw_cones

    rows = [{"cone_dim": k, "vector": v, "refusing_ablated": 0.1 * k, "refusing_added": None if v == "subspace" else 0.9,
             "kl": 0.05 * k} for k in (1, 2, 3) for v in ("basis 0", "sample 0", "sample 1", "subspace")]
    pd.DataFrame(rows).to_csv(tmp_path / "cones.csv", index=False)
    assert draw_cones(tmp_path / "cones.csv").stat().st_size > 10_000
    pd.DataFrame(rows).drop(columns="kl").to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(UserError, match="lacks the column kl"):
        draw_cones(tmp_path / "bad.csv")
