"""Advantage estimators and masked helpers: hand-computed cases, independent loop references,
and the bad-input errors (unknown name/option, grpo/rloo with n = 1, sppo with n > 1)."""

from __future__ import annotations

import ast
import math
import sys
from pathlib import Path

import pytest
import torch

from megatron_sppo.algorithms import (ADVANTAGE_ESTIMATORS, AdvantageBatch, AlgorithmInputError,
                                      check_estimator, compute_advantages, masked_mean,
                                      masked_sum, masked_var, masked_whiten)
from megatron_sppo.errors import UserError

F64 = torch.float64
LN3 = math.log(3.0)


def t(x, dtype=F64):
    return torch.tensor(x, dtype=dtype)


def close(actual, expected, tol=1e-6):
    torch.testing.assert_close(actual, t(expected) if not torch.is_tensor(expected) else expected,
                               rtol=0, atol=tol)


# ---------------------------------------------------------------- masked helpers

def test_masked_helpers_by_hand():
    x = t([[1.0, 2.0, float("nan")], [3.0, float("inf"), 5.0]])
    m = t([[1, 1, 0], [1, 0, 1]], torch.bool)
    close(masked_sum(x, m), 11.0)
    close(masked_sum(x, m, -1), [3.0, 8.0])
    close(masked_mean(x, m), 11.0 / 4)
    close(masked_mean(x, m, -1), [1.5, 4.0])
    close(masked_var(x, m), ((1 - 2.75) ** 2 + (2 - 2.75) ** 2 + 0.25**2 + 2.25**2) / 3)
    assert masked_mean(x, torch.zeros_like(m)) == 0  # empty mask: 0, not NaN
    assert masked_var(t([4.0]), t([1], torch.bool)) == 0  # one entry: no spread
    white = masked_whiten(x, m)
    close(masked_mean(white, m), 0.0)
    close(masked_var(white, m), 1.0, 1e-6)
    assert white[0, 2] == 0 and white[1, 1] == 0


# ---------------------------------------------------------------- hand-computed estimators

def test_sppo_by_hand():
    # V = sigmoid([0, ln 3]) = [0.5, 0.75];  A = R - V = [0.5, -0.75] on each response token
    mask = t([[1, 1, 0], [1, 0, 0]], torch.bool)
    out = compute_advantages("sppo", AdvantageBatch(rewards=t([1.0, 0.0]), response_mask=mask,
                                                    critic_logits=t([0.0, LN3])))
    close(out.advantages, [[0.5, 0.5, 0.0], [-0.75, 0.0, 0.0]])
    close(out.returns, [1.0, 0.0])  # the critic target: correctness = R when R is 0/1


def test_sppo_shaped_reward_keeps_correctness_as_critic_target():
    # shaped R = [0.5, -1] (format penalties), correctness [1, 0]: A uses R, the critic learns y
    out = compute_advantages("sppo", AdvantageBatch(
        rewards=t([0.5, -1.0]), response_mask=torch.ones(2, 2, dtype=torch.bool),
        critic_logits=t([0.0, LN3]), correctness=t([1, 0], torch.long)))
    close(out.advantages, [[0.0, 0.0], [-1.75, -1.75]])
    close(out.returns, [1.0, 0.0])


def test_sppo_normalize_whitens_over_sequences():
    # A = [0.5, -0.75]: mean -0.125, unbiased std 0.625 * sqrt(2) -> +-1/sqrt(2)
    batch = AdvantageBatch(rewards=t([1.0, 0.0]), response_mask=t([[1, 1, 1], [1, 0, 0]]),
                           critic_logits=t([0.0, LN3]))
    out = compute_advantages("sppo", batch, normalize=True)
    s = 1 / math.sqrt(2)
    close(out.advantages, [[s, s, s], [-s, 0.0, 0.0]])


def test_gae_by_hand():
    # one response of 3 tokens, R = 1 on the last, V = [0.5, 0.6, 0.8]
    batch = AdvantageBatch(rewards=t([1.0]), response_mask=torch.ones(1, 3, dtype=torch.bool),
                           values=t([[0.5, 0.6, 0.8]]))
    # gamma = lam = 1: A_t = R - V_t (Monte Carlo), returns = R
    out = compute_advantages("gae", batch, whiten=False)
    close(out.advantages, [[0.5, 0.4, 0.2]])
    close(out.returns, [[1.0, 1.0, 1.0]])
    # gamma 0.9, lam 0.5: delta = [0.9*0.6-0.5, 0.9*0.8-0.6, 1-0.8] = [0.04, 0.12, 0.2]
    # A_2 = 0.2; A_1 = 0.12 + 0.45*0.2 = 0.21; A_0 = 0.04 + 0.45*0.21 = 0.1345
    out = compute_advantages("gae", batch, gamma=0.9, lam=0.5, whiten=False)
    close(out.advantages, [[0.1345, 0.21, 0.2]])
    close(out.returns, [[0.6345, 0.81, 1.0]])
    # a masked hole (e.g. tool output) is stepped over, whatever value sits there
    holed = AdvantageBatch(rewards=t([1.0]), response_mask=t([[1, 0, 1, 1, 0]], torch.bool),
                           values=t([[0.5, 99.0, 0.6, 0.8, 7.0]]))
    out = compute_advantages("gae", holed, gamma=0.9, lam=0.5, whiten=False)
    close(out.advantages, [[0.1345, 0.0, 0.21, 0.2, 0.0]])


def test_gae_kl_in_reward_by_hand():
    # k1 per token = logp - ref = [0.5, 1.0]; r = [-0.1*0.5, 1 - 0.1*1.0] = [-0.05, 0.9]
    batch = AdvantageBatch(rewards=t([1.0]), response_mask=torch.ones(1, 2, dtype=torch.bool),
                           values=t([[0.0, 0.0]]), logprobs=t([[-0.5, -1.0]]),
                           ref_logprobs=t([[-1.0, -2.0]]))
    out = compute_advantages("gae", batch, whiten=False, kl_coef=0.1)
    close(out.advantages, [[0.85, 0.9]])


def test_grpo_by_hand():
    # prompt 7: R = [1, 0, 0, 1] -> mean 0.5, unbiased std sqrt(1/3); prompt 3: all 0 -> A = 0
    batch = AdvantageBatch(rewards=t([1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]),
                           response_mask=torch.ones(8, 1, dtype=torch.bool),
                           group_index=t([7, 7, 3, 3, 7, 7, 3, 3], torch.long))
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)  # eps = 1e-6 keeps the all-equal group at 0, not 0/0
    close(compute_advantages("grpo", batch).advantages[:, 0],
          [a, -a, 0, 0, -a, a, 0, 0])
    # Dr. GRPO: no division by std
    close(compute_advantages("grpo", batch, norm_by_std=False).advantages[:, 0],
          [0.5, -0.5, 0, 0, -0.5, 0.5, 0, 0])


def test_rloo_by_hand():
    # R = [1, 0, 0]: A_0 = 1 - (0+0)/2 = 1, A_1 = A_2 = 0 - (1+0)/2 = -0.5
    batch = AdvantageBatch(rewards=t([1.0, 0.0, 0.0]), response_mask=t([[1, 1], [1, 0], [1, 1]]),
                           group_index=t([0, 0, 0], torch.long),
                           logprobs=t([[0.5, 1.0], [0.0, 9.0], [0.0, 0.0]]),
                           ref_logprobs=torch.zeros(3, 2, dtype=F64))
    out = compute_advantages("rloo", batch)
    close(out.advantages, [[1.0, 1.0], [-0.5, 0.0], [-0.5, -0.5]])
    close(out.returns, [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    # KL in reward: totals = [1 - 0.1*1.5, 0 (masked token ignored), 0] = [0.85, 0, 0]
    out = compute_advantages("rloo", batch, kl_coef=0.1)
    close(out.advantages, [[0.85, 0.85], [-0.425, 0.0], [-0.425, -0.425]])


def test_remax_by_hand():
    batch = AdvantageBatch(rewards=t([1.0, 0.0]), response_mask=torch.ones(2, 2, dtype=torch.bool),
                           greedy_rewards=t([0.0, 1.0]), logprobs=t([[0.2, 0.0], [0.0, 0.4]]),
                           ref_logprobs=torch.zeros(2, 2, dtype=F64))
    close(compute_advantages("remax", batch).advantages, [[1.0, 1.0], [-1.0, -1.0]])
    # KL in reward: token rewards [[-0.1, 1], [0, -0.2]]; each token's reward-to-go minus the
    # greedy response's outcome (no KL): [[0.9 - 0, 1 - 0], [-0.2 - 1, -0.2 - 1]]
    out = compute_advantages("remax", batch, kl_coef=0.5)
    close(out.advantages, [[0.9, 1.0], [-1.2, -1.2]])
    close(out.returns, [[0.9, 1.0], [-0.2, -0.2]])


def test_reinforce_pp_by_hand():
    batch = AdvantageBatch(rewards=t([1.0, 0.0]), response_mask=t([[1, 1, 0], [1, 1, 0]]))
    # gamma = 1: G = [[1, 1], [0, 0]], whitened: +-0.5 / sqrt(1/3)
    a = 0.5 / math.sqrt(1 / 3)
    out = compute_advantages("reinforce_pp", batch)
    close(out.advantages, [[a, a, 0], [-a, -a, 0]])
    close(out.returns, [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    # gamma = 0.5: G = [[0.5, 1], [0, 0]], mean 0.375, unbiased std 0.478714
    out = compute_advantages("reinforce_pp", batch, gamma=0.5)
    close(out.returns, [[0.5, 1.0, 0.0], [0.0, 0.0, 0.0]])
    close(out.advantages, [[0.261116, 1.305582, 0], [-0.783349, -0.783349, 0]])


# ---------------------------------------------------------------- loop references

def _random_batch(seed: int, prompts: int = 3, n: int = 4, T: int = 7) -> AdvantageBatch:
    g = torch.Generator().manual_seed(seed)
    B = prompts * n
    mask = torch.rand(B, T, generator=g) < 0.8  # ragged, with holes
    mask[:, 0] = True
    mask[1] = False  # a response dropped from the loss entirely
    perm = torch.randperm(B, generator=g)  # groups need not be contiguous
    rand = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    return AdvantageBatch(
        rewards=(torch.rand(B, generator=g) < 0.5).to(F64) + 0.1 * rand(B),
        response_mask=mask, group_index=torch.arange(prompts).repeat_interleave(n)[perm],
        critic_logits=rand(B), values=rand(B, T), greedy_rewards=rand(B),
        logprobs=rand(B, T) - 1, ref_logprobs=rand(B, T) - 1)


def _token_rewards_ref(b, i, kl_coef, idx):
    """Token rewards of sequence i at its response positions idx (k1 KL)."""
    r = [-kl_coef * float(b.logprobs[i, j] - b.ref_logprobs[i, j]) for j in idx]
    if idx:
        r[-1] += float(b.rewards[i])
    return r


def _ref(name, b, gamma=1.0, lam=1.0, kl_coef=0.0, eps=1e-6):
    """Plain-Python loops over sequences and tokens; whitening/std via statistics-style sums."""
    B, T = b.response_mask.shape
    adv, ret = torch.zeros(B, T, dtype=F64), torch.zeros(B, T, dtype=F64)
    prompt = list(range(B)) if b.group_index is None else b.group_index.tolist()
    groups = {}
    for i in range(B):
        groups.setdefault(prompt[i], []).append(i)
    totals = []
    for i in range(B):
        idx = [j for j in range(T) if b.response_mask[i, j]]
        r = _token_rewards_ref(b, i, kl_coef, idx)
        totals.append(sum(r))
        if name == "gae":
            a, nxt_v, nxt_a = [0.0] * len(idx), 0.0, 0.0
            for k in reversed(range(len(idx))):
                v = float(b.values[i, idx[k]])
                a[k] = r[k] + gamma * nxt_v - v + gamma * lam * nxt_a
                nxt_v, nxt_a = v, a[k]
            for k, j in enumerate(idx):
                adv[i, j], ret[i, j] = a[k], a[k] + float(b.values[i, j])
        if name in ("reinforce_pp", "remax"):
            g_t = 0.0
            for k in reversed(range(len(idx))):
                g_t = r[k] + gamma * g_t
                ret[i, idx[k]] = g_t
                if name == "remax":  # reward-to-go minus the greedy response's outcome
                    adv[i, idx[k]] = g_t - float(b.greedy_rewards[i])
    if name == "remax":
        return adv, ret
    if name in ("gae", "reinforce_pp"):
        src = adv if name == "gae" else ret
        vals = [float(src[i, j]) for i in range(B) for j in range(T) if b.response_mask[i, j]]
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) + 1e-8)
        white = torch.where(b.response_mask, (src - mean) / std, 0)
        return white, ret
    seq = []
    for i in range(B):
        R, mates = float(b.rewards[i]), groups[prompt[i]]
        if name == "sppo":
            seq.append(R - 1 / (1 + math.exp(-float(b.critic_logits[i]))))
        elif name == "grpo":
            rs = [float(b.rewards[j]) for j in mates]
            mean = sum(rs) / len(rs)
            std = math.sqrt(sum((x - mean) ** 2 for x in rs) / (len(rs) - 1))
            seq.append((R - mean) / (std + eps))
        elif name == "rloo":
            others = [totals[j] for j in mates if j != i]
            seq.append(totals[i] - sum(others) / len(others))
    mask = b.response_mask
    return torch.where(mask, t(seq)[:, None], 0), torch.where(mask, t(totals)[:, None], 0)


@pytest.mark.parametrize("name,options", [
    ("gae", dict(gamma=0.95, lam=0.9, kl_coef=0.05)), ("gae", dict(gamma=1.0, lam=1.0)),
    ("grpo", {}), ("rloo", dict(kl_coef=0.05)), ("remax", dict(kl_coef=0.05)),
    ("reinforce_pp", dict(gamma=0.9, kl_coef=0.05)), ("sppo", {}),
])
def test_estimators_match_loop_reference(name, options):
    batch = _random_batch(seed=len(name) + len(options))
    if name == "sppo":
        batch.group_index = None
        batch.rewards = batch.rewards.round().clamp(0, 1)
    out = compute_advantages(name, batch, **options)
    ref_adv, ref_ret = _ref(name, batch, **options)
    close(out.advantages, ref_adv)
    if name != "sppo":
        close(out.returns, ref_ret)
    assert (out.advantages[~batch.response_mask] == 0).all()


def test_estimators_give_constants_even_from_inputs_with_grad():
    """Advantages weight the policy gradient; no gradient may flow back into the critic."""
    batch = _random_batch(seed=0)
    batch.group_index = None
    batch.rewards = batch.rewards.round().clamp(0, 1)
    batch.critic_logits.requires_grad_(True)
    batch.values.requires_grad_(True)
    for name, out in [("sppo", compute_advantages("sppo", batch)),
                      ("gae", compute_advantages("gae", batch))]:
        assert not out.advantages.requires_grad and not out.returns.requires_grad, name


def test_registry_is_extensible():
    from megatron_sppo.algorithms import AdvantageOutput, register_estimator

    @register_estimator("_constant_test")
    def constant(batch, value: float = 1.0):
        return AdvantageOutput(torch.where(batch.mask, value, 0.0), batch.rewards)

    try:
        out = compute_advantages("_constant_test", AdvantageBatch(
            rewards=t([0.0]), response_mask=t([[1, 0]], torch.bool)), value=2.0)
        close(out.advantages.double(), [[2.0, 0.0]])
    finally:
        del ADVANTAGE_ESTIMATORS["_constant_test"]
    assert set(ADVANTAGE_ESTIMATORS) == {"sppo", "gae", "grpo", "rloo", "remax", "reinforce_pp"}


def test_library_imports_torch_only():
    """The math must stay importable without Megatron, an engine or reward code."""
    allowed = {"torch", "megatron_sppo.algorithms", "megatron_sppo.errors",
               *sys.stdlib_module_names}
    package = Path(__file__).resolve().parents[1] / "megatron_sppo" / "algorithms"
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module] if isinstance(node, ast.ImportFrom) else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                assert any(name == a or name.startswith(a + ".") for a in allowed), (path, name)


# ---------------------------------------------------------------- bad input

def test_unknown_estimator_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'.*sppo, gae, grpo"):
        check_estimator("ppo")
    with pytest.raises(UserError):  # the CLI prints it as one line
        check_estimator("ppo")


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(ValueError, match="gae has no option gama: its options are gamma, lam"):
        check_estimator("gae", gama=0.9)
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        check_estimator("rloo", n=2, kl_estimator="k4")


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_group_baselines_refuse_one_response_per_prompt(name):
    with pytest.raises(ValueError, match=f"{name} needs n >= 2 responses per prompt"):
        check_estimator(name, n=1)
    with pytest.raises(ValueError, match="other responses to the same prompt"):
        compute_advantages(name, AdvantageBatch(rewards=t([1.0, 0.0]),
                                                response_mask=torch.ones(2, 1)))
    check_estimator(name, n=2)


def test_sppo_warns_with_several_responses_per_prompt(recwarn):
    with pytest.warns(UserWarning, match="not the paper's setting"):
        check_estimator("sppo", n=4)
    check_estimator("sppo", n=1)
    assert not [w for w in recwarn if "paper" in str(w.message)]


def test_sppo_refuses_a_non_binary_critic_target():
    batch = AdvantageBatch(rewards=t([0.5, 1.0]), response_mask=torch.ones(2, 1),
                           critic_logits=t([0.0, 0.0]))
    with pytest.raises(ValueError, match="must be 0/1 correctness, got 0.5"):
        compute_advantages("sppo", batch)


def test_missing_inputs_and_bad_shapes():
    with pytest.raises(ValueError, match="gae needs batch.values"):
        compute_advantages("gae", AdvantageBatch(rewards=t([1.0]), response_mask=torch.ones(1, 2)))
    with pytest.raises(ValueError, match="remax needs batch.logprobs, batch.ref_logprobs"):
        compute_advantages("remax", AdvantageBatch(rewards=t([1.0]), response_mask=torch.ones(1, 2),
                                                   greedy_rewards=t([0.0])), kl_coef=0.1)
    with pytest.raises(ValueError, match=r"values has shape \(1, 3\), expected \(1, 2\)"):
        AdvantageBatch(rewards=t([1.0]), response_mask=torch.ones(1, 2), values=torch.zeros(1, 3))
    with pytest.raises(ValueError, match="response_mask has shape"):
        AdvantageBatch(rewards=t([1.0]), response_mask=torch.ones(2))
    with pytest.raises(ValueError, match="n=0"):
        check_estimator("sppo", n=0)
    assert issubclass(AlgorithmInputError, UserError)
