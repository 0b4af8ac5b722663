#!/usr/bin/env python
"""Write a tiny random HF checkpoint (model + tokenizer) for offline tests and smoke runs.

    python tools/make_tiny_model.py --out /tmp/tiny-qwen2 --family qwen2

The checkpoint is built in a temporary sibling directory and renamed into
place at the end, so an interrupted run never leaves a half-written model.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")  # == megatron_sppo.models.tiny.TINY_FAMILIES


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--family", choices=FAMILIES, default="qwen2")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate-size", type=int, default=128)
    p.add_argument("--head-dim", type=int, default=None, help="default: hidden-size // heads")
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--tie-embeddings", action="store_true")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out: Path = args.out.resolve()
    # Checked before importing torch/transformers so a refusal is instant.
    if out.exists() and not out.is_dir():
        print(f"error: --out {out} exists and is not a directory", file=sys.stderr)
        return 2
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        print(f"error: --out {out} already exists and is not empty; pass --overwrite to replace it",
              file=sys.stderr)
        return 2

    try:
        import megatron_sppo  # noqa: F401
    except ImportError:  # run as `python tools/make_tiny_model.py` from a source checkout
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    from megatron_sppo.models.tiny import make_tiny_hf_model

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the final directory should be readable like any other
    try:
        make_tiny_hf_model(
            tmp, args.family, hidden_size=args.hidden_size, num_layers=args.layers,
            num_heads=args.heads, num_kv_heads=args.kv_heads,
            intermediate_size=args.intermediate_size, head_dim=args.head_dim,
            rope_theta=args.rope_theta, tie_word_embeddings=args.tie_embeddings,
            dtype=getattr(torch, args.dtype), seed=args.seed,
        )
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {args.family} tiny model to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
