"""Benchmark metrics over k sampled responses per problem.

avg@k is the mean 0/1 correctness over all k samples of all problems (the paper's Avg@16:
an estimate of pass@1 with k times less variance than one sample). pass@k uses the unbiased
estimator of Chen et al. (2021): with n samples of which c are correct, the chance that k
drawn without replacement include a correct one is 1 - C(n-c, k) / C(n, k), computed as a
product so that n = 1024 does not overflow.
"""

from __future__ import annotations


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples with ``c`` correct (``k <= n``)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):  # C(n-c, k) / C(n, k) = prod (1 - k / i)
        miss *= 1.0 - k / i
    return 1.0 - miss


def default_pass_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def summarize(outcomes: list[list[float]], lengths: list[list[int]],
              truncated: list[list[bool]], pass_ks: list[int] | None = None) -> dict:
    """Metrics of one benchmark: ``outcomes[p][j]`` is the 0/1 correctness of sample j of
    problem p (the same number of samples for every problem), ``lengths`` its response
    tokens, ``truncated`` whether it was cut at the length limit."""
    if not outcomes:
        raise ValueError("no problems to summarize")
    n = len(outcomes[0])
    if n == 0 or any(len(o) != n for o in outcomes):
        raise ValueError("every problem needs the same, non-zero number of samples")
    flat = [x for o in outcomes for x in o]
    out = {"problems": len(outcomes), "samples_per_problem": n,
           f"avg@{n}": sum(flat) / len(flat)}
    correct = [int(round(sum(o))) for o in outcomes]
    for k in pass_ks or default_pass_ks(n):
        if k <= n:
            out[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in correct) / len(outcomes)
    all_lengths = [x for row in lengths for x in row]
    all_truncated = [x for row in truncated for x in row]
    out["response_length_mean"] = sum(all_lengths) / max(len(all_lengths), 1)
    out["truncation_rate"] = sum(map(bool, all_truncated)) / max(len(all_truncated), 1)
    return out
