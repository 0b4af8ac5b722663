#!/usr/bin/env python
"""What the critic costs per step: SPPO's prompt-only critic vs token-level PPO (GAE).

Both methods run the same policy update (old log-probs forward + clipped PPO update) on the
same rollouts; they differ in the critic: SPPO scores the prompt only (values forward + BCE
update on B x prompt tokens), GAE scores every prompt + response token (values forward +
clipped value update on B x (prompt + response) tokens). Real megatron-core on CPU (TP=1),
a random Qwen2-shaped model built locally. Prints per-step figures and the GAE/SPPO ratios.
Memory is the growth of resident memory above its level when the phase starts; PyTorch's CPU
allocator reuses what earlier phases freed, so it is a lower bound of the phase's peak.

    .venv/bin/python tools/benchmark_critic_cost.py --prompt-len 64 --response-len 256 --batch 16
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 5 ms."""

    def __enter__(self):
        self.proc, self.start, self.peak, self.done = psutil.Process(), 0, 0, False
        self.start = self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.done = True
        self.thread.join()
        self.delta_gb = (self.peak - self.start) / 1e9


def trainable(hf_dir, critic):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_sppo.checkpoint.convert import model_from_hf

    arch, config, model = model_from_hf(hf_dir, critic=critic, calculate_per_token_loss=True)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), module=model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-5, clip_grad=1.0), [ddp])
    config.finalize_model_grads_func = finalize_model_grads
    return arch, ddp, opt


def update(ddp, opt, run):
    ddp.zero_grad_buffer()
    opt.zero_grad()
    run()
    opt.step()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--response-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16, help="prompts per step (1 response each)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=4096, help="tokens per micro-batch")
    args = parser.parse_args()

    from megatron_sppo.algorithms import PolicyLossConfig
    from megatron_sppo.models.tiny import make_tiny_hf_model
    from megatron_sppo.runtime import init_distributed
    from megatron_sppo.trainer.critic_update import (CriticBatch, TokenCriticBatch,
                                                     critic_forward_backward,
                                                     token_critic_forward_backward)
    from megatron_sppo.trainer.policy_update import PolicyBatch, policy_forward_backward

    init_distributed(1, 1)
    hf = make_tiny_hf_model(Path(tempfile.mkdtemp()) / "model", "qwen2", hidden_size=args.hidden,
                            num_layers=args.layers, num_heads=4, num_kv_heads=2,
                            intermediate_size=3 * args.hidden,
                            max_position_embeddings=args.prompt_len + args.response_len)
    arch, policy, policy_opt = trainable(hf, critic=False)
    _, critic, critic_opt = trainable(hf, critic=True)
    b, lp, lr = args.batch, args.prompt_len, args.response_len
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, arch.vocab_size, (b, lp + lr), generator=g)
    lengths = torch.full((b,), lp + lr)
    mask = (torch.arange(lp + lr - 1) >= lp - 1).expand(b, -1)
    zeros = torch.zeros(b, lp + lr - 1)
    correctness = torch.randint(0, 2, (b,), generator=g).float()
    prompts = CriticBatch(ids[:, :lp], torch.full((b,), lp), correctness)
    tokens = TokenCriticBatch(ids, lengths, mask, zeros, torch.rand(b, lp + lr - 1, generator=g))
    rollouts = PolicyBatch(ids, lengths, mask, zeros, torch.randn(b, lp + lr - 1, generator=g))
    budget = dict(max_tokens=args.max_tokens)
    critic_runs = {
        "sppo": (b * lp,
                 lambda: critic_forward_backward(critic, prompts, forward_only=True, **budget),
                 lambda: critic_forward_backward(critic, prompts, **budget)),
        "gae": (b * (lp + lr),
                lambda: token_critic_forward_backward(critic, tokens, forward_only=True, **budget),
                lambda: token_critic_forward_backward(critic, tokens, **budget)),
    }
    rows = {}
    for method, (critic_tokens, values, learn) in critic_runs.items():
        critic_s, policy_s, critic_mem, policy_mem = [], [], [], []
        for _ in range(args.steps + 1):  # the first step warms up and is not counted
            start = time.perf_counter()
            with PeakRSS() as mem_c:
                with torch.no_grad():
                    values()
                update(critic, critic_opt, learn)
            mid = time.perf_counter()
            with PeakRSS() as mem_p:
                with torch.no_grad():
                    policy_forward_backward(policy, rollouts, vocab_size=arch.vocab_size,
                                            temperature=1.0, forward_only=True, **budget)
                update(policy, policy_opt, lambda: policy_forward_backward(
                    policy, rollouts, vocab_size=arch.vocab_size, temperature=1.0,
                    loss_cfg=PolicyLossConfig(), **budget))
            critic_s.append(mid - start)
            policy_s.append(time.perf_counter() - mid)
            critic_mem.append(mem_c.delta_gb)
            policy_mem.append(mem_p.delta_gb)
        n = args.steps
        rows[method] = (critic_tokens, sum(critic_s[1:]) / n, sum(policy_s[1:]) / n,
                        max(critic_mem[1:]), max(policy_mem[1:]))
    print(f"\nbatch {b} prompts x 1 response, prompt {lp} + response {lr} tokens, "
          f"hidden {args.hidden}, {args.layers} layers, {args.steps} timed steps, CPU TP=1")
    print(f"{'method':<7}{'critic tokens':>14}{'critic s':>10}{'policy s':>10}"
          f"{'critic +RSS GB':>16}{'policy +RSS GB':>16}  (RSS growth: lower bounds)")
    for method, (tok, cs, ps, cm, pm) in rows.items():
        print(f"{method:<7}{tok:>14}{cs:>10.3f}{ps:>10.3f}{cm:>16.3f}{pm:>16.3f}")
    s, e = rows["sppo"], rows["gae"]
    print(f"gae/sppo: critic tokens x{e[0] / s[0]:.1f}, critic time x{e[1] / s[1]:.1f}, "
          f"step time x{(e[1] + e[2]) / (s[1] + s[2]):.2f}")


if __name__ == "__main__":
    main()
