#!/usr/bin/env python
"""The embedded default job (CPU, tiny model): HF -> Megatron -> HF, checked at every step.

1. build a tiny random Qwen2-style HF model with a character-level tokenizer and chat template;
2. convert it to a Megatron-LM dist checkpoint at TP=2 x PP=2 (4 CPU workers, gloo);
3. reload it at TP=1 and compare its logits with HF transformers';
4. export it back to sharded HF safetensors and check every tensor is bit-identical.

    .venv/bin/python examples/convert_roundtrip.py [--out outputs/convert_roundtrip]
"""

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def sh(*args):
    print("$ " + " ".join(str(a) for a in args), flush=True)
    start = time.time()
    subprocess.run([str(a) for a in args], check=True, cwd=REPO)
    return time.time() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=REPO / "outputs" / "convert_roundtrip", type=Path)
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    hf, mg, back = args.out / "hf", args.out / "megatron_tp2_pp2", args.out / "hf_exported"
    py, cli = sys.executable, [sys.executable, "-m", "megatron_sppo", "convert"]
    times = {
        "make tiny model": sh(py, REPO / "tools" / "make_tiny_model.py", "--out", hf,
                              "--family", "qwen2", "--hidden-size", "128", "--layers", "4",
                              "--heads", "8", "--kv-heads", "2", "--intermediate-size", "256"),
        "hf -> megatron (tp2 x pp2)": sh(*cli, "hf-to-megatron", "--hf-path", hf,
                                         "--megatron-path", mg, "--tp", "2", "--pp", "2"),
        "verify logits (tp1)": sh(*cli, "verify", "--megatron-path", mg, "--hf-path", hf),
        "megatron -> hf": sh(*cli, "megatron-to-hf", "--megatron-path", mg, "--hf-path", back,
                             "--max-shard-size", "256KB"),
    }
    from safetensors.torch import load_file
    import torch

    def tensors(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    a, b = tensors(hf), tensors(back)
    identical = sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype
                                               for k in a)
    print("\nstep                           seconds")
    for step, seconds in times.items():
        print(f"{step:<30} {seconds:7.1f}")
    print(f"\n{len(a)} tensors, {len(list(back.glob('*.safetensors')))} exported shards, "
          f"bit-identical round trip: {identical}")
    print(f"outputs in {args.out}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
