#!/usr/bin/env python
"""Check a GPU node before the first real job (megatron_sppo.cluster.gpu_check): the stack's
versions, Transformer Engine against the local layer spec, one FP8 step per supported recipe,
SGLang colocated with the trainer (generation, CUDA-IPC weight sync, log-prob mismatch,
memory hand-over) and the weight-sync time of a ~1B model. About 5-10 minutes on one
H100/H200; writes gpu_check.json and gpu_check.md.

    python tools/gpu_check.py --output-dir outputs/gpu_check
    python tools/gpu_check.py --output-dir /tmp/gc --sglang-python /opt/sglang-venv/bin/python

Exit status 0 when no check failed (skipped ones say why), 1 otherwise.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_sppo.cluster import gpu_check  # noqa: E402
from megatron_sppo.rollout.sglang_launcher import DEFAULT_SGLANG_PYTHON  # noqa: E402

SIZES = {"1b": gpu_check.ONE_B, "small": gpu_check.SMALL, "tiny": gpu_check.TINY}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", required=True, type=Path,
                   help="where the models, runs and the report go")
    p.add_argument("--sglang-python", default=DEFAULT_SGLANG_PYTHON,
                   help=f"the SGLang environment's python (default {DEFAULT_SGLANG_PYTHON})")
    p.add_argument("--sync-model", choices=SIZES, default="1b",
                   help="policy size for the weight-sync timing (default 1b: ~1.03B params)")
    p.add_argument("--check-model", choices=SIZES, default="small",
                   help="model for the TE, FP8 and SGLang checks (default small: ~4M params)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds each training run may take (default 600)")
    args = p.parse_args()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    opts = gpu_check.Options(output_dir=args.output_dir.resolve(),
                             sglang_python=args.sglang_python,
                             sync_model=SIZES[args.sync_model],
                             check_model=SIZES[args.check_model], timeout_s=args.timeout)
    results = gpu_check.run_checks(opts)
    report = gpu_check.write_report(results, opts.output_dir)
    print(gpu_check.summary_markdown(results))
    print(f"report: {report}")
    return 1 if any(c.status == "failed" for c in results) else 0


if __name__ == "__main__":
    sys.exit(main())
