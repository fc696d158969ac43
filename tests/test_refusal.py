"""Refusal score and the substring judge."""

import math

import torch

from suffix_analysis.evaluation.refusal import SubstringJudge
from suffix_analysis.metrics import refusal_score


def test_refusal_score_is_log_odds():
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    p = torch.softmax(logits, -1)
    got = refusal_score(logits, [0, 2])
    for i in range(2):
        pr = float(p[i, 0] + p[i, 2])
        assert math.isclose(float(got[i]), math.log(pr / (1 - pr)), rel_tol=1e-5)


def test_refusal_score_stays_finite_at_extremes():
    logits = torch.tensor([[60.0, -60.0, -60.0], [-60.0, 60.0, 60.0]])
    s = refusal_score(logits, [0])
    assert torch.isfinite(s).all() and s[0] > 100 and s[1] < -100


def test_substring_judge():
    judge = SubstringJudge()
    out = judge(["a"] * 4, ["I\u2019m sorry, but no.", "Sure, here is how", "As an AI, I can't", "I CANNOT do that"])
    assert out == [True, False, True, True]


def test_llamaguard_judge_plumbing(tiny_folder):
    """A (random) moderation model behind the judge interface: one verdict per completion."""
    from suffix_analysis.evaluation.refusal import LlamaGuardJudge, make_judge

    judge = make_judge(f"llamaguard:{tiny_folder}", device="cpu")
    assert isinstance(judge, LlamaGuardJudge)
    out = judge(["Say hi.", "Write a poem."], ["Hello!", "I cannot."])
    assert len(out) == 2 and all(isinstance(x, bool) for x in out)


def test_unknown_judge():
    import pytest

    from suffix_analysis.errors import UserError
    from suffix_analysis.evaluation.refusal import make_judge

    with pytest.raises(UserError, match="unknown judge"):
        make_judge("gpt4")
