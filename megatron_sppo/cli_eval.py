"""`megatron-sppo eval`: the paper's math benchmarks (local files) with any rollout engine.

    megatron-sppo eval --model DIR --benchmark aime24=aime24.jsonl --benchmark math500=... \\
        --output-dir DIR [--k 16 --temperature 0.6 --top-p 0.95] [--engine sglang]

``--model`` is an HF directory, or a Megatron checkpoint (exported to HF first, into the
output directory). Writes ``eval.json`` and ``eval.md`` and, unless ``--no-tensorboard``,
the scalars under ``<output-dir>/tensorboard`` at ``--step``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_sppo.errors import UserError


def _benchmark(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: write NAME=FILE, e.g. aime24=data/aime24.jsonl")
    return name, path


def add_eval_command(commands) -> None:
    from megatron_sppo.evaluation import BENCHMARKS, PAPER_SAMPLING

    p = commands.add_parser(
        "eval", help="avg@k / pass@k on AIME24/25, AMC23, MATH500, Minerva-Math (local files)",
        description="Sample k responses per problem with a rollout engine, check them with the "
                    "math reward, write eval.json and eval.md (and TensorBoard scalars).",
        epilog="benchmarks: " + ", ".join(BENCHMARKS) + ". Paper setting: --k 16 "
               "--temperature 0.6 --top-p 0.95 (the defaults).")
    p.add_argument("--model", required=True, help="HF model directory or Megatron checkpoint")
    p.add_argument("--benchmark", action="append", type=_benchmark, required=True,
                   metavar="NAME=FILE", help="a benchmark and its local file (repeatable)")
    p.add_argument("--output-dir", required=True, help="where eval.json/eval.md go")
    p.add_argument("--k", type=int, default=PAPER_SAMPLING.n, help="samples per problem")
    p.add_argument("--temperature", type=float, default=PAPER_SAMPLING.temperature)
    p.add_argument("--top-p", type=float, default=PAPER_SAMPLING.top_p)
    p.add_argument("--max-new-tokens", type=int, default=PAPER_SAMPLING.max_new_tokens)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reward", default="math",
                   help="reward function deciding correctness (math, math_answer, math_auto, "
                   "pkg.mod:fn)")
    p.add_argument("--engine", choices=("local", "sglang"), default="local",
                   help="local: transformers on this machine; sglang: servers (see --address)")
    p.add_argument("--address", action="append", default=[],
                   help="running SGLang server (repeatable); without it servers are launched")
    p.add_argument("--sglang-tp", type=int, default=1, help="tensor parallel size of launched "
                   "SGLang servers")
    p.add_argument("--step", type=int, default=0, help="TensorBoard step of the scalars")
    p.add_argument("--no-tensorboard", action="store_true")
    p.set_defaults(func=run_eval_command)


def _hf_model(model: str, out: Path) -> Path:
    """An HF directory for ``model``: itself, or its export from a Megatron checkpoint."""
    path = Path(model)
    if (path / "config.json").is_file():
        return path
    if not path.exists():
        raise UserError(f"--model {model} does not exist: give an HF directory or a Megatron "
                        "checkpoint")
    from megatron_sppo.checkpoint.convert import megatron_to_hf

    hf = out / "hf_model"
    megatron_to_hf(path, hf, overwrite=True)
    return hf


def run_eval_command(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from megatron_sppo.config import RewardConfig
    from megatron_sppo.evaluation import evaluate, flat_metrics, load_benchmarks, write_report
    from megatron_sppo.rewards import RewardScorer
    from megatron_sppo.rollout import SamplingParams, build_engine

    problems = load_benchmarks(dict(args.benchmark))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = _hf_model(args.model, out)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    engine = (build_engine("local", hf_path=hf, load_weights=True) if args.engine == "local"
              else build_engine("sglang", model_path=str(hf), addresses=args.address,
                                tp_size=args.sglang_tp, log_dir=str(out)))
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p,
                              max_new_tokens=args.max_new_tokens, n=args.k, seed=args.seed)
    try:
        with RewardScorer(RewardConfig(function=args.reward)) as scorer:
            results = evaluate(engine, problems, tokenizer, k=args.k, sampling=sampling,
                               scorer=scorer)
    finally:
        engine.shutdown()
    json_path, md_path = write_report(results, out)
    if not args.no_tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(out / "tensorboard")) as writer:
            for key, value in flat_metrics(results).items():
                writer.add_scalar(key, value, args.step)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
