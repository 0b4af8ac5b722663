"""Throughput of the local rollout engine on CPU (the embedded default's generation speed).

Builds a tiny random Qwen2 (about 1M parameters by default), loads it into
:class:`megatron_sppo.rollout.local.LocalEngine` and samples fixed-length responses
(EOS ignored) for random prompts, printing generated tokens per second per batch size.

    python tools/benchmark_local_engine.py --batch 64 256 --prompt-len 64 --response-len 64
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_sppo.models.tiny import make_tiny_hf_model  # noqa: E402
from megatron_sppo.rollout.engine import SamplingParams  # noqa: E402
from megatron_sppo.rollout.local import LocalEngine  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--response-len", type=int, default=64)
    parser.add_argument("--n", type=int, default=1, help="samples per prompt")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (more than 1 only pays on cores nobody else uses)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        hf = make_tiny_hf_model(Path(tmp) / "m", family="qwen2", hidden_size=args.hidden,
                                num_layers=args.layers, num_heads=4, num_kv_heads=2,
                                intermediate_size=3 * args.hidden)
        engine = LocalEngine(hf, load_weights=True, max_batch_size=max(args.batch))
        engine.eos_token_ids = set()  # fixed-length responses: measure decoding, not stopping
        params_m = sum(p.numel() for p in engine.model.parameters()) / 1e6
        print(f"model: qwen2 hidden={args.hidden} layers={args.layers} ({params_m:.2f}M params), "
              f"torch threads={torch.get_num_threads()}")
        gen = torch.Generator().manual_seed(0)
        for batch in args.batch:
            prompts = torch.randint(10, engine.vocab_size, (batch // args.n, args.prompt_len),
                                    generator=gen).tolist()
            params = SamplingParams(temperature=1.0, max_new_tokens=args.response_len,
                                    n=args.n, seed=0)
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                out = engine.generate(prompts, params)
                best = min(best, time.perf_counter() - start)
            tokens = sum(len(s.token_ids) for group in out for s in group)
            print(f"batch {batch:4d} (n={args.n}): {tokens} tokens in {best:.2f} s = "
                  f"{tokens / best:,.0f} tokens/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
