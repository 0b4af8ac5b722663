"""The live-model exporter at the launched TP/PP against the HF checkpoint the model was
loaded from.

Usage: torchrun --nproc-per-node N check_export.py --tp T --pp P [--bucket-bytes B] HF_DIR...
Prints per model and mode (own stage / gathered pipeline): the names this rank yielded in
order, the bucket sizes (bytes, tensors), and the names whose tensors are not bit-identical
to the file's.
"""

import argparse
from pathlib import Path

import torch
from common import report
from safetensors.torch import load_file

from megatron_sppo.checkpoint.convert import model_from_hf
from megatron_sppo.rollout.export import iter_hf_buckets
from megatron_sppo.runtime import init_distributed


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("hf_dirs", nargs="+")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--bucket-bytes", type=int, default=64 << 10)
    args = parser.parse_args()
    init_distributed(args.tp, args.pp)
    for hf_dir in args.hf_dirs:
        expected = {}
        for path in sorted(Path(hf_dir).glob("*.safetensors")):
            expected.update(load_file(str(path)))
        arch, _, model = model_from_hf(hf_dir, tp=args.tp, pp=args.pp)
        for gather in (False, True):
            names, sizes, wrong = [], [], []
            for bucket in iter_hf_buckets(model, arch, args.bucket_bytes, gather_pipeline=gather):
                sizes.append([sum(t.numel() * t.element_size() for _, t in bucket), len(bucket)])
                for name, tensor in bucket:
                    names.append(name)
                    want = expected.get(name)
                    if (want is None or want.dtype != tensor.dtype or want.shape != tensor.shape
                            or not torch.equal(_bits(want), _bits(tensor))):
                        wrong.append(name)
            report({"hf": hf_dir, "gather": gather, "rank": torch.distributed.get_rank(),
                    "names": names, "bucket_sizes": sizes, "wrong": wrong,
                    "expected": sorted(expected)})


if __name__ == "__main__":
    main()
