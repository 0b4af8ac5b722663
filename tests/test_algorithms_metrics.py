"""Metrics: clip fractions and approximate KL from a hand case, distribution statistics,
and SPPO critic calibration (Brier, ECE, AUC with ties) against hand numbers and a pairwise
Mann-Whitney reference."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_sppo.algorithms import (critic_calibration, distribution_stats, policy_loss,
                                      policy_metrics, roc_auc)

F64 = torch.float64


def t(x, dtype=F64):
    return torch.tensor(x, dtype=dtype)


def close(actual, expected, tol=1e-9):
    torch.testing.assert_close(actual, t(expected), rtol=0, atol=tol)


def test_policy_metrics_by_hand():
    # ratios [1.5, 0.5, 4.0, 1.1] with A = [1, -1, -1, 1]: one token each clipped high, clipped
    # low, dual-clipped, unclipped; a fifth (masked) token is ignored
    ratios = t([[1.5, 0.5, 4.0, 1.1, 100.0]])
    out = policy_loss(ratios.log(), torch.zeros(1, 5, dtype=F64), t([[1.0, -1.0, -1.0, 1.0, -1.0]]),
                      t([[1, 1, 1, 1, 0]], torch.bool))
    m = policy_metrics(out, t([[1, 1, 1, 1, 0]], torch.bool), entropy=t([[1.0, 2.0, 3.0, 4.0, 99]]))
    assert {k: round(v.item(), 12) for k, v in m.items() if "clipfrac" in k} == {
        "policy/clipfrac_low": 0.25, "policy/clipfrac_high": 0.25, "policy/clipfrac": 0.5,
        "policy/dual_clipfrac": 0.25}
    r = [1.5, 0.5, 4.0, 1.1]
    close(m["policy/approx_kl_k3"], sum(x - 1 - math.log(x) for x in r) / 4)
    close(m["policy/approx_kl_k2"], sum(0.5 * math.log(x) ** 2 for x in r) / 4)
    close(m["policy/entropy"], 2.5)


def test_distribution_stats_by_hand():
    x = t([[1.0, 3.0, 50.0], [4.0, 50.0, 50.0]])
    mask = t([[1, 1, 0], [1, 0, 0]], torch.bool)
    s = distribution_stats(x, mask, "adv")
    close(s["adv/mean"], 8 / 3)
    close(s["adv/std"], math.sqrt(((1 - 8 / 3) ** 2 + (3 - 8 / 3) ** 2 + (4 - 8 / 3) ** 2) / 2))
    close(s["adv/min"], 1.0)
    close(s["adv/max"], 4.0)
    # per sequence: means [2, 4]
    close(s["adv/seq/mean"], 3.0)
    close(s["adv/seq/std"], math.sqrt(2.0))
    close(s["adv/seq/min"], 2.0)
    close(s["adv/seq/max"], 4.0)
    assert set(distribution_stats(t([1.0, 0.0]), prefix="ret")) == {
        "ret/mean", "ret/std", "ret/min", "ret/max"}
    assert distribution_stats(x, torch.zeros_like(mask))["x/min"].isnan()


def test_critic_calibration_by_hand():
    v, y = t([0.1, 0.4, 0.35, 0.8]), t([0, 0, 1, 1], torch.long)
    c = critic_calibration(v, y)
    close(c["critic/brier"], (0.01 + 0.16 + 0.4225 + 0.04) / 4)
    # 10 bins: one prediction per bin -> mean |V - y| = (0.1 + 0.4 + 0.65 + 0.2) / 4
    close(c["critic/ece"], 1.35 / 4)
    close(c["critic/mean_predicted"], 0.4125)
    close(c["critic/mean_success"], 0.5)
    # positives {0.35, 0.8} vs negatives {0.1, 0.4}: 3 of 4 pairs ordered
    close(c["critic/auc"], 0.75)
    # 2 bins: [0, .5) holds V 0.1, 0.4, 0.35 with y 0, 0, 1 -> |0.85 - 1|; [.5, 1]: |0.8 - 1|
    close(critic_calibration(v, y, n_bins=2)["critic/ece"], (0.15 + 0.2) / 4)
    # V = 1 falls in the last bin; a perfect constant predictor has ECE 0
    close(critic_calibration(t([1.0, 1.0]), t([1, 1]))["critic/ece"], 0.0)


def test_roc_auc_ties_and_one_class():
    close(roc_auc(t([0.5, 0.5, 0.5, 0.5]), t([1, 0, 1, 0])), 0.5)
    close(roc_auc(t([0.2, 0.5, 0.5, 0.9]), t([0, 1, 0, 1])), (1 + 1 + 0.5 + 1) / 4)
    assert roc_auc(t([0.2, 0.3]), t([1, 1])).isnan()


def test_roc_auc_matches_pairwise_mann_whitney():
    g = torch.Generator().manual_seed(0)
    scores = (torch.rand(200, generator=g, dtype=F64) * 10).round() / 10  # many ties
    labels = torch.rand(200, generator=g) < 0.4
    pos, neg = scores[labels].tolist(), scores[~labels].tolist()
    pairs = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    close(roc_auc(scores, labels), pairs / (len(pos) * len(neg)))


def test_calibration_bad_input():
    with pytest.raises(ValueError, match="must be 0/1 correctness, got 0.5"):
        critic_calibration(t([0.5]), t([0.5]))
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]: pass sigmoid"):
        critic_calibration(t([2.0]), t([1.0]))
    with pytest.raises(ValueError, match="n_bins=0 must be >= 1"):
        critic_calibration(t([0.5]), t([1.0]), n_bins=0)
