"""Policy/value losses and KL estimators: hand-computed cases, independent per-token loop
references (values and gradients, float64), exact token-mean across micro-batches, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_sppo.algorithms import (AGG_MODES, PolicyLossConfig, aggregate, bce_value_loss,
                                      clipped_value_loss, kl_from_log_ratio, kl_penalty,
                                      policy_loss)

F64 = torch.float64
LN3 = math.log(3.0)


def t(x, dtype=F64):
    return torch.tensor(x, dtype=dtype)


def close(actual, expected, tol=1e-9):
    expected = expected if torch.is_tensor(expected) else t(expected)
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=0, atol=tol)


def grad(y, x):
    return torch.autograd.grad(y, x, retain_graph=True, materialize_grads=True)[0]


# ---------------------------------------------------------------- hand-computed

def _hand_case():
    # ratios [1.5, 0.5, 4.0, 1.1] with A = [1, -1, -1, 1]
    old = torch.zeros(1, 4, dtype=F64)
    logprobs = t([[math.log(1.5), math.log(0.5), math.log(4.0), math.log(1.1)]]).requires_grad_()
    return logprobs, old, t([[1.0, -1.0, -1.0, 1.0]]), torch.ones(1, 4, dtype=torch.bool)


def test_policy_loss_by_hand():
    logprobs, old, adv, mask = _hand_case()
    out = policy_loss(logprobs, old, adv, mask)
    # t0: A>0, r 1.5 > 1.2 -> -1.2 (clipped high)   t1: A<0, r 0.5 < 0.8 -> 0.8 (clipped low)
    # t2: A<0, r 4 -> 4, dual clip caps at c|A| = 3  t3: inside the range -> -1.1
    close(out.per_token, [[-1.2, 0.8, 3.0, -1.1]])
    close(out.loss, 1.5 / 4)
    assert out.loss_sum.item() == pytest.approx(1.5) and out.denominator.item() == 4
    assert out.denominator.dtype == torch.long  # Megatron adds it into an int token count
    assert out.clipped_high.tolist() == [[True, False, False, False]]
    assert out.clipped_low.tolist() == [[False, True, False, False]]
    assert out.dual_clipped.tolist() == [[False, False, True, False]]
    # d/dlogp (-A r) = -A r where unclipped, 0 where any clip is active
    close(grad(out.loss, logprobs), [[0.0, 0.0, 0.0, -1.1 / 4]])
    # without the dual clip the A<0 token with r = 4 costs 4 and pushes with gradient r|A| = 4
    free = policy_loss(logprobs, old, adv, mask, PolicyLossConfig(dual_clip=None))
    close(free.per_token[0, 2], 4.0)
    close(grad(free.loss, logprobs)[0, 2], 4.0 / 4)
    assert not free.dual_clipped.any()


def test_asymmetric_clip_by_hand():
    logprobs, old, adv, mask = _hand_case()
    out = policy_loss(logprobs, old, adv, mask, PolicyLossConfig(eps_low=0.6, eps_high=0.28))
    # t0 capped at 1.28; t1 r = 0.5 > 1 - 0.6 is inside the range now
    close(out.per_token, [[-1.28, 0.5, 3.0, -1.1]])


def test_aggregation_modes_by_hand():
    per_token = t([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0], [9.0, 9.0, 9.0]])
    mask = t([[1, 1, 0], [1, 0, 0], [0, 0, 0]], torch.bool)  # the last response is dropped
    close(aggregate(per_token, mask, "token-mean").loss, 6.0 / 3)
    close(aggregate(per_token, mask, "seq-mean-token-mean").loss, (1.5 + 3.0) / 2)
    out = aggregate(per_token, mask, "seq-mean-token-sum")
    close(out.loss, (3.0 + 3.0) / 2)
    assert out.denominator.item() == 2  # sequences with at least one loss token
    close(aggregate(per_token, mask, denominator=12).loss, 0.5)  # a caller's global count
    empty = aggregate(per_token, torch.zeros_like(mask))
    assert empty.loss.item() == 0 and empty.denominator.item() == 0


def test_truncated_importance_sampling_by_hand():
    # w = min(exp(old - rollout), cap): exp(ln 3) = 3 -> 2, exp(ln 0.5) = 0.5
    logprobs = torch.zeros(1, 2, dtype=F64, requires_grad=True)
    rollout = t([[-LN3, math.log(2.0)]])
    out = policy_loss(logprobs, torch.zeros(1, 2, dtype=F64), t([[1.0, 1.0]]),
                      torch.ones(1, 2), PolicyLossConfig(tis_cap=2.0), rollout_logprobs=rollout)
    close(out.is_weight, [[2.0, 0.5]])
    close(out.per_token, [[-2.0, -0.5]])
    assert not out.is_weight.requires_grad
    close(grad(out.loss, logprobs), [[-1.0, -0.25]])  # the weight scales the gradient


def test_kl_estimators_by_hand():
    x = t([math.log(2.0)])  # log pi - log pi_ref
    close(kl_from_log_ratio(x, "k1"), [0.6931471805599453])
    close(kl_from_log_ratio(x, "k2"), [0.2402265069591007])
    close(kl_from_log_ratio(x, "k3"), [0.5 - 1 + 0.6931471805599453])
    close(kl_penalty(t([-1.0]), t([-1.0 - math.log(2.0)]), "k3"), [0.1931471805599453])
    # low_var_kl: a far-drifted token is capped at 10 with finite gradient
    far = t([-50.0, 0.5]).requires_grad_()
    low = kl_from_log_ratio(far, "low_var_kl")
    close(low, [10.0, math.exp(-0.5) - 1 + 0.5])
    assert torch.isfinite(grad(low.sum(), far)).all()


def test_k1_and_k3_are_unbiased_and_k3_nonnegative():
    # expectation over a ~ p computed exactly by enumeration: E_p[k(log p - log q)] = KL(p || q)
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(6, generator=g, dtype=F64), 0)
    logq = torch.log_softmax(torch.randn(6, generator=g, dtype=F64), 0)
    exact = (logp.exp() * (logp - logq)).sum()
    for estimator in ("k1", "k3"):
        close((logp.exp() * kl_penalty(logp, logq, estimator)).sum(), exact, 1e-12)
    assert (kl_from_log_ratio(torch.randn(1000, generator=g, dtype=F64) * 3, "k3") >= 0).all()


def test_kl_and_entropy_terms_by_hand():
    logprobs = t([[-1.0, -2.0]]).requires_grad_()
    entropy = t([[0.5, 1.5]]).requires_grad_()
    cfg = PolicyLossConfig(kl_coef=0.1, kl_estimator="k1", entropy_coef=0.01)
    out = policy_loss(logprobs, logprobs.detach(), torch.zeros(1, 2, dtype=F64), torch.ones(1, 2),
                      cfg, ref_logprobs=t([[-1.5, -1.0]]), entropy=entropy)
    # A = 0: per token = 0.1 * (logp - ref) - 0.01 * H = [0.05 - 0.005, -0.1 - 0.015]
    close(out.per_token, [[0.045, -0.115]])
    close(out.kl, [[0.5, -1.0]])
    close(grad(out.loss, entropy), [[-0.005, -0.005]])


def test_bce_value_loss_by_hand():
    # V = sigmoid([0, ln 3]) = [0.5, 0.75], y = [1, 0]: -ln 0.5 and -ln 0.25
    logits = t([0.0, LN3]).requires_grad_()
    out = bce_value_loss(logits, t([1, 0], torch.long))
    close(out.per_token, [math.log(2.0), math.log(4.0)])
    close(out.loss, (math.log(2.0) + math.log(4.0)) / 2)
    close(grad(out.loss, logits), [(0.5 - 1) / 2, 0.75 / 2])  # (V - y) / B


def test_clipped_value_loss_by_hand():
    values = t([[1.0, 0.9]]).requires_grad_()
    old, returns = t([[0.5, 0.5]]), t([[0.0, 1.0]])
    out = clipped_value_loss(values, old, returns, torch.ones(1, 2), clip_range=0.2)
    # t0: V_clip = 0.7: 0.5 * max(1.0, 0.49) = 0.5 (unclipped term, gradient V - G = 1)
    # t1: V_clip = 0.7: 0.5 * max(0.01, 0.09) = 0.045 (clipped term, no gradient)
    close(out.per_token, [[0.5, 0.045]])
    close(grad(out.loss, values), [[0.5, 0.0]])


# ---------------------------------------------------------------- loop references

def _random_inputs(seed: int, B: int = 5, T: int = 6):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    old = rand(B, T) - 2
    logprobs = (old + 0.6 * rand(B, T)).requires_grad_()
    with torch.no_grad():
        logprobs[0, 0], logprobs[1, 1] = old[0, 0] + 1.5, old[1, 1] + 2.0  # r = 4.5 and 7.4
    adv = rand(B, T)
    adv[0, 0], adv[1, 1] = -1.0, -0.5  # ... with A < 0: the dual clip must fire
    mask = torch.rand(B, T, generator=g) < 0.75
    mask[:2, :2] = True
    mask[4] = False  # a response dropped from the loss
    return dict(logprobs=logprobs, old_logprobs=old, advantages=adv, response_mask=mask,
                rollout_logprobs=old + 0.3 * rand(B, T), ref_logprobs=old + 0.5 * rand(B, T),
                entropy=rand(B, T).abs().requires_grad_())


def _aggregate_ref(terms: list[list[torch.Tensor]], mode: str) -> torch.Tensor:
    """terms[b] = the per-token losses of sequence b; plain Python means."""
    if mode == "token-mean":
        flat = [x for seq in terms for x in seq]
        return sum(flat) / len(flat)
    seqs = [sum(seq) / (len(seq) if mode == "seq-mean-token-mean" else 1) for seq in terms if seq]
    return sum(seqs) / len(seqs)


def _policy_ref(inp, cfg: PolicyLossConfig) -> torch.Tensor:
    lp, old, adv, mask = (inp[k] for k in ("logprobs", "old_logprobs", "advantages",
                                           "response_mask"))
    terms = []
    for b in range(lp.shape[0]):
        terms.append([])
        for j in range(lp.shape[1]):
            if not mask[b, j]:
                continue
            r, a = torch.exp(lp[b, j] - old[b, j]), float(adv[b, j])
            if a >= 0:  # max(-A r, -A clip(r)) = -A min(r, 1 + eps_high)
                loss = -a * torch.clamp(r, max=1 + cfg.eps_high)
            else:       # = |A| max(r, 1 - eps_low), then the dual cap |A| c
                loss = -a * torch.clamp(r, min=1 - cfg.eps_low)
                if cfg.dual_clip is not None:
                    loss = torch.clamp(loss, max=-a * cfg.dual_clip)
            if cfg.tis_cap is not None:
                loss = loss * min(math.exp(float(old[b, j] - inp["rollout_logprobs"][b, j])),
                                  cfg.tis_cap)
            if cfg.kl_coef:
                d = inp["ref_logprobs"][b, j] - lp[b, j]  # k3 = pi_ref/pi - 1 - log(pi_ref/pi)
                loss = loss + cfg.kl_coef * (torch.exp(d) - 1 - d)
            terms[-1].append(loss - cfg.entropy_coef * inp["entropy"][b, j])
    return _aggregate_ref(terms, cfg.agg)


@pytest.mark.parametrize("cfg", [
    PolicyLossConfig(),
    PolicyLossConfig(eps_low=0.2, eps_high=0.28, dual_clip=None, agg="seq-mean-token-mean"),
    PolicyLossConfig(agg="seq-mean-token-sum", tis_cap=1.5, kl_coef=0.05, entropy_coef=0.01),
], ids=["default", "asym-nodual-seqmean", "seqsum-tis-kl-entropy"])
def test_policy_loss_matches_loop_reference(cfg):
    inp = _random_inputs(seed=1)
    out = policy_loss(**inp, cfg=cfg)
    ref = _policy_ref(inp, cfg)
    close(out.loss, ref)
    for leaf in ("logprobs", "entropy"):
        close(grad(out.loss, inp[leaf]), grad(ref, inp[leaf]))
    assert out.dual_clipped.any() == (cfg.dual_clip is not None)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_micro_batches_with_global_denominator_equal_the_full_batch(mode):
    """Megatron splits a mini-batch into micro-batches: summing each micro-batch's
    loss_sum / global denominator (or summing the (loss_sum, denominator) pairs) must give the
    full-batch mean and the same gradients; a mean of micro-batch means would not."""
    inp = _random_inputs(seed=2)
    cfg = PolicyLossConfig(agg=mode)
    full = policy_loss(**inp, cfg=cfg)
    parts = [{k: v[rows] for k, v in inp.items()} for rows in (slice(0, 1), slice(1, 5))]
    shares = [policy_loss(**p, cfg=cfg, denominator=full.denominator) for p in parts]
    pairs = [policy_loss(**p, cfg=cfg) for p in parts]
    close(sum(s.loss for s in shares), full.loss)
    close(sum(p.loss_sum for p in pairs) / sum(p.denominator for p in pairs), full.loss)
    for leaf in ("logprobs", "entropy"):
        close(grad(sum(s.loss for s in shares), inp[leaf]), grad(full.loss, inp[leaf]))
    naive = sum(p.loss for p in pairs) / 2
    assert abs(naive - full.loss) > 1e-3


def test_value_losses_match_loop_reference():
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(7, generator=g, dtype=F64) * 2).requires_grad_()
    y = (torch.rand(7, generator=g) < 0.5).to(F64)
    out = bce_value_loss(logits, y)
    ref = sum(-(yi * torch.log(torch.sigmoid(z)) + (1 - yi) * torch.log(1 - torch.sigmoid(z)))
              for z, yi in zip(logits, y)) / 7
    close(out.loss, ref)
    close(grad(out.loss, logits), grad(ref, logits))

    inp = _random_inputs(seed=4)
    values = inp["logprobs"]
    old, returns, mask = inp["old_logprobs"] + 1.6, inp["advantages"] - 2, inp["response_mask"]
    for mode in AGG_MODES:
        out = clipped_value_loss(values, old, returns, mask, clip_range=0.3, agg=mode)
        terms = []
        for b in range(values.shape[0]):
            terms.append([])
            for j in range(values.shape[1]):
                if mask[b, j]:
                    v, v0, ret = values[b, j], float(old[b, j]), float(returns[b, j])
                    v_clip = torch.clamp(v, v0 - 0.3, v0 + 0.3)
                    terms[-1].append(0.5 * torch.maximum((v - ret) ** 2, (v_clip - ret) ** 2))
        ref = _aggregate_ref(terms, mode)
        close(out.loss, ref)
        close(grad(out.loss, values), grad(ref, values))


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs,message", [
    (dict(agg="mean"), "unknown loss aggregation mode 'mean': use one of token-mean"),
    (dict(kl_estimator="k5"), "unknown KL estimator 'k5': use one of k1, k2, k3, low_var_kl"),
    (dict(dual_clip=1.0), "dual_clip=1.0 must be > 1"),
    (dict(eps_low=1.0), "need 0 <= eps_low < 1"),
    (dict(tis_cap=0.0), "tis_cap=0.0 must be > 0"),
    (dict(kl_coef=-0.1), "must be >= 0"),
])
def test_bad_policy_loss_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PolicyLossConfig(**kwargs)


def test_policy_loss_missing_inputs_and_shapes():
    inp = _random_inputs(seed=5)
    del inp["rollout_logprobs"], inp["ref_logprobs"], inp["entropy"]
    with pytest.raises(ValueError, match="tis_cap needs rollout_logprobs"):
        policy_loss(**inp, cfg=PolicyLossConfig(tis_cap=2.0))
    with pytest.raises(ValueError, match="kl_coef=0.1 needs ref_logprobs"):
        policy_loss(**inp, cfg=PolicyLossConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="entropy_coef=0.01 needs entropy"):
        policy_loss(**inp, cfg=PolicyLossConfig(entropy_coef=0.01))
    with pytest.raises(ValueError, match=r"advantages has shape \(5,\), expected \(5, 6\)"):
        policy_loss(**{**inp, "advantages": torch.zeros(5)})
    with pytest.raises(ValueError, match="unknown loss aggregation mode"):
        aggregate(torch.zeros(2), torch.ones(2), "sum")


def test_value_loss_bad_input():
    with pytest.raises(ValueError, match="correctness must be 0/1 correctness, got 0.5"):
        bce_value_loss(torch.zeros(3), t([1.0, 0.5, 0.0]))
    with pytest.raises(ValueError, match="correctness must be 0/1 correctness, got -1"):
        bce_value_loss(torch.zeros(2), t([-1, 1], torch.long))
    with pytest.raises(ValueError, match="clip_range=0 must be > 0"):
        clipped_value_loss(*[torch.zeros(1, 2)] * 4, clip_range=0)
