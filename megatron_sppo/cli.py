"""The `megatron-sppo` command.

    megatron-sppo convert hf-to-megatron --hf-path DIR --megatron-path DIR [--tp N] [--pp N]
    megatron-sppo convert megatron-to-hf --megatron-path DIR --hf-path DIR
    megatron-sppo convert verify --megatron-path DIR --hf-path DIR
    megatron-sppo convert hf-to-block-fp8 --hf-path DIR --out DIR
    megatron-sppo train --config FILE.yaml [--resume auto] [key=value ...]
    megatron-sppo sft --model DIR --data FILE.jsonl --output DIR
    megatron-sppo demo --output-dir DIR [key=value ...]
    megatron-sppo eval --model DIR --benchmark NAME=FILE --output-dir DIR

Bad input prints one ``error:`` line and
exits with status 2.
"""

from __future__ import annotations

import argparse
import sys

from megatron_sppo import __version__
from megatron_sppo.errors import UserError

_DTYPES = ("float32", "bfloat16", "float16")


def _size(text: str) -> int:
    """'5GB', '512MB', '1048576' -> bytes."""
    units = {"KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * factor)
    try:
        return int(upper)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 5GB or 512MB")


def _add_hf_to_megatron_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hf-path", required=True,
                   help="Hugging Face model directory (config.json, *.safetensors, tokenizer)")
    p.add_argument("--megatron-path", required=True,
                   help="output: Megatron-LM checkpoint root (latest_checkpointed_iteration.txt, "
                        "iter_0000000/ in torch_dist format)")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel size to write the checkpoint at (default 1; it loads "
                        "at any TP/PP)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    p.add_argument("--decoder-first-pipeline-num-layers", type=int, metavar="N",
                   help="layers of the first pipeline stage (Megatron-LM's flag; the stages "
                        "not given share the rest evenly). Default when --pp does not divide "
                        "the layers: every stage L//pp, the first one the remainder too")
    p.add_argument("--decoder-last-pipeline-num-layers", type=int, metavar="N",
                   help="layers of the last pipeline stage (Megatron-LM's flag)")
    p.add_argument("--dtype", choices=_DTYPES,
                   help="parameter dtype of the checkpoint (default: the HF config's dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --megatron-path")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_megatron_to_hf_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--megatron-path", required=True,
                   help="Megatron checkpoint root (with latest_checkpointed_iteration.txt) or "
                        "one iter_XXXXXXX directory: written by megatron-sppo, by Megatron-LM "
                        "(any iteration, optimizer state ignored) or by Megatron-Bridge")
    p.add_argument("--hf-path", required=True,
                   help="output: HF directory (sharded safetensors + index, config, tokenizer)")
    p.add_argument("--hf-config",
                   help="HF config.json + tokenizer directory, for checkpoints whose own "
                        "hf_config/ (or the HF directory Megatron-LM's --tokenizer-model or "
                        "Bridge's hf_model_id names) is missing")
    p.add_argument("--max-shard-size", type=_size, default="5GB",
                   help="largest safetensors shard (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --hf-path")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_hf_to_megatron(args: argparse.Namespace) -> None:
    from megatron_sppo.checkpoint.convert import hf_to_megatron

    from megatron_sppo.checkpoint.interop import extra_megatron_lm_flags

    arch = hf_to_megatron(args.hf_path, args.megatron_path, tp=args.tp, pp=args.pp,
                          overwrite=args.overwrite, dtype=args.dtype,
                          show_progress=not args.no_progress,
                          first_stage_layers=args.decoder_first_pipeline_num_layers,
                          last_stage_layers=args.decoder_last_pipeline_num_layers)
    print(f"wrote {args.megatron_path} ({arch.family}, {arch.num_layers} layers, "
          f"tp={args.tp} pp={args.pp}, {arch.dtype}); Megatron-LM loads it with --load "
          f"{args.megatron_path} --use-checkpoint-args {' '.join(extra_megatron_lm_flags(arch))}")


def run_megatron_to_hf(args: argparse.Namespace) -> None:
    from megatron_sppo.checkpoint.convert import megatron_to_hf

    arch = megatron_to_hf(args.megatron_path, args.hf_path, overwrite=args.overwrite,
                          hf_config=args.hf_config, max_shard_bytes=args.max_shard_size,
                          show_progress=not args.no_progress)
    print(f"wrote {args.hf_path} ({arch.family}, {arch.dtype})")


def run_verify(args: argparse.Namespace) -> None:
    from megatron_sppo.checkpoint.verify import compare_logits

    result = compare_logits(args.megatron_path, args.hf_path, seq_len=args.seq_len)
    print(f"max |logits_megatron - logits_hf| = {result['max_abs_diff']:.3g} over "
          f"{result['tokens']} tokens (largest |logit| {result['max_abs_logit']:.3g}); "
          f"padded vocabulary unused: {result['padded_vocab_unused']}")
    if result["max_abs_diff"] > args.tolerance or not result["padded_vocab_unused"]:
        raise UserError(f"logits differ by {result['max_abs_diff']:.3g} > --tolerance "
                        f"{args.tolerance}: the checkpoint does not match {args.hf_path}")


def run_hf_to_block_fp8(args: argparse.Namespace) -> None:
    import os
    import shutil
    from pathlib import Path

    from megatron_sppo.quant.fp8_block import write_block_fp8_checkpoint

    src, out = Path(args.hf_path), Path(args.out)
    if not (src / "config.json").is_file():
        raise UserError(f"--hf-path {src} has no config.json: give an HF model directory")
    if out.exists() and not args.overwrite:
        raise UserError(f"--out {out} exists: pass --overwrite to replace it")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    write_block_fp8_checkpoint(src, tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"wrote {out} (128x128 block FP8, e4m3)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-sppo",
        description="Sequence-Level PPO (SPPO) and RL baselines for reasoning LLMs on "
                    "megatron-core.",
        epilog="Run `megatron-sppo COMMAND --help` for the options of one command.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    convert = commands.add_parser(
        "convert", help="convert checkpoints between Hugging Face and Megatron formats",
        description="Convert checkpoints between Hugging Face safetensors and Megatron-LM's "
                    "dist-checkpoint layout (Llama, Qwen2, Qwen3, Mistral dense decoders).")
    direction = convert.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    h2m = direction.add_parser(
        "hf-to-megatron", help="HF -> Megatron (any TP/PP)",
        description="HF -> Megatron-LM dist checkpoint. A single process spawns tp*pp CPU "
                    "workers; under torchrun launch exactly tp*pp ranks.")
    _add_hf_to_megatron_args(h2m)
    h2m.set_defaults(func=run_hf_to_megatron)
    m2h = direction.add_parser("megatron-to-hf", help="Megatron -> HF safetensors",
                               description="Megatron dist checkpoint (any TP/PP) -> HF safetensors"
                                           " that transformers.from_pretrained loads.")
    _add_megatron_to_hf_args(m2h)
    m2h.set_defaults(func=run_megatron_to_hf)
    verify = direction.add_parser(
        "verify", help="compare a Megatron checkpoint's logits with an HF model's",
        description="Run the same random tokens through the Megatron checkpoint (TP=1, fp32) "
                    "and the HF model; fail if the logits differ by more than --tolerance.")
    verify.add_argument("--megatron-path", required=True, help="Megatron checkpoint root")
    verify.add_argument("--hf-path", required=True, help="HF model directory")
    verify.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest allowed max-abs logit difference (default 1e-4, fp32)")
    verify.add_argument("--seq-len", type=int, default=32, help="tokens per sequence")
    verify.set_defaults(func=run_verify)
    fp8 = direction.add_parser(
        "hf-to-block-fp8", help="HF -> 128x128 block-FP8 HF copy for FP8 SGLang rollouts",
        description="Quantise every projection weight to e4m3 with one scale per 128x128 block "
                    "(weight_scale_inv, the DeepSeek-V3 / Qwen3-FP8 layout SGLang loads) and "
                    "write config.json's quantization_config. Point rollout.sglang.model_path at "
                    "the result; the weight sync then pushes the same format.")
    fp8.add_argument("--hf-path", required=True, help="bf16/fp32 HF model directory")
    fp8.add_argument("--out", required=True, help="output HF directory")
    fp8.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    fp8.set_defaults(func=run_hf_to_block_fp8)
    from megatron_sppo.cli_train import add_train_commands

    add_train_commands(commands)
    from megatron_sppo.cli_eval import add_eval_command

    add_eval_command(commands)
    return parser


def run_tool(func, args: argparse.Namespace) -> int:
    """Run one command; a UserError becomes one ``error:`` line and exit status 2."""
    try:
        func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        # first, before the parser's imports (seconds): a stop signal during start-up is kept
        from megatron_sppo.trainer.preemption import stop_request

        stop_request()
    parser = build_parser()
    # key=value overrides may come before or after --resume: collect those argparse left over
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(a.startswith("-") for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return run_tool(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
