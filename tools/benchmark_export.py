#!/usr/bin/env python
"""Benchmark the Megatron -> HF weight export that every rollout weight sync streams.

    .venv/bin/python tools/benchmark_export.py --params 1.0                      # TP=1
    .venv/bin/torchrun --nproc-per-node 2 tools/benchmark_export.py --params 1.0 --tp 2
    ... --sglang http://host:30000        # on GPU: also push the buckets to a running server

Builds a randomly initialised Qwen2-shaped model of about ``--params`` billion parameters
(tools/benchmark_conversion.py's shape) at the given TP/PP, in bf16, on the GPU when there is
one, then times ``iter_hf_buckets`` (TP all-gather, q/k/v and gate/up split, vocabulary
padding removed, buckets of ``--bucket-mb``) over ``--repeats`` passes. Prints, on rank 0:
model bytes, seconds per pass, GB/s, bucket count, peak host RSS (and peak GPU memory on a
GPU). With ``--sglang`` the buckets go to the server through the engine's weight sync
(``update_weights``: NCCL broadcast from this process, needs the server's GPUs reachable) and
the sync time is reported too.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _conversion_shapes():
    spec = importlib.util.spec_from_file_location("benchmark_conversion",
                                                  ROOT / "tools" / "benchmark_conversion.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=float, default=1.0, help="billions of parameters")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--bucket-mb", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--sglang", help="URL of a running SGLang server to push the weights to")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()

    import torch.distributed as dist

    from megatron_sppo.models.builder import build_gpt_model, transformer_config
    from megatron_sppo.models.hf_config import arch_from_hf_config
    from megatron_sppo.rollout.export import iter_hf_buckets, iter_hf_tensors_live
    from megatron_sppo.runtime import init_distributed

    conv = _conversion_shapes()
    shape = conv.choose_shape(args.params, args.vocab, args.tp, args.pp, tie=False)
    arch = arch_from_hf_config(conv.hf_config(shape, "bfloat16"))
    init_distributed(args.tp, args.pp)
    rank0 = dist.get_rank() == 0
    t0 = time.perf_counter()
    model = build_gpt_model(arch, transformer_config(arch, tp=args.tp, pp=args.pp,
                                                     params_dtype=torch.bfloat16))
    build_s = time.perf_counter() - t0
    engine = None
    if args.sglang and rank0:
        from megatron_sppo.rollout.sglang_engine import SGLangEngine

        engine = SGLangEngine.create(addresses=[args.sglang],
                                     bucket_mb=args.bucket_mb)
    passes = []
    for _ in range(args.repeats):
        dist.barrier()
        t = time.perf_counter()
        nbytes = buckets = 0
        for bucket in iter_hf_buckets(model, arch, args.bucket_mb << 20, gather_pipeline=True):
            buckets += 1
            nbytes += sum(x.numel() * x.element_size() for _, x in bucket)
        passes.append(time.perf_counter() - t)
    sync_s = None
    if engine is not None:
        t = time.perf_counter()
        engine.update_weights(iter_hf_tensors_live(model, arch, gather_pipeline=True), 1)
        sync_s = time.perf_counter() - t
    elif args.sglang:
        for _ in iter_hf_tensors_live(model, arch, gather_pipeline=True):
            pass
    if rank0:
        best = min(passes)
        out = {"params": shape["params"], "tp": args.tp, "pp": args.pp,
               "device": "cuda" if torch.cuda.is_available() else "cpu",
               "model_gb": nbytes / 1e9, "build_s": build_s, "export_s": passes,
               "gb_per_s": nbytes / 1e9 / best, "buckets": buckets,
               "bucket_mb": args.bucket_mb,
               "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
               "peak_gpu_gb": (torch.cuda.max_memory_allocated() / 1e9
                               if torch.cuda.is_available() else None),
               "sglang_sync_s": sync_s}
        print(f"{shape['params'] / 1e9:.2f}B params, TP={args.tp} PP={args.pp} on "
              f"{out['device']}: {out['model_gb']:.2f} GB in {buckets} buckets of <= "
              f"{args.bucket_mb} MiB; export {best:.2f} s ({out['gb_per_s']:.2f} GB/s, best of "
              f"{args.repeats}); rank-0 peak RSS {out['peak_rss_gb']:.2f} GB"
              + (f"; SGLang sync {sync_s:.2f} s" if sync_s is not None else ""))
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
