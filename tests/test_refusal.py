"""Refusal score and the substring judge."""

import math

import torch

from suffix_analysis.evaluation.refusal import SubstringJudge, refusal_score


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
