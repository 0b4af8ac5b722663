#!/usr/bin/env python
"""Benchmark HF <-> Megatron checkpoint conversion: wall time, throughput and peak host memory.

    .venv/bin/python tools/benchmark_conversion.py --params 1.0

What it does and measures:

1. Writes a random Hugging Face checkpoint of a Qwen2-shaped model with about ``--params``
   billion parameters (Qwen2.5-1.5B's proportions scaled: head_dim 128, 2 KV heads,
   intermediate = 35/6 x hidden, ~28 layers per 1536 hidden; vocabulary 32000, untied
   head) straight into safetensors shards of ~1 GiB plus ``model.safetensors.index.json``
   and a ``config.json``. No transformers model is built: the safetensors files are
   streamed one tensor, and one 16 Mi-element chunk of random numbers, at a time.
2. Runs ``python -m megatron_sppo convert hf-to-megatron`` (``--tp``/``--pp``) and then
   ``megatron-to-hf``, each in its own subprocess. For each it records the wall time and
   the peak host memory of the whole process tree (psutil, polled every 0.05 s, summing the
   RSS of the process and all its descendants: TP*PP > 1 spawns worker processes). Summed
   RSS counts shared library pages once per process and counts memory-mapped checkpoint
   pages that were touched, so the anonymous part (RSS minus file-backed/shared pages) is
   shown as well. The kernel's ``ru_maxrss`` (largest single process of the tree, from
   ``os.wait4``) is a cross-check; ``resource.getrusage(RUSAGE_CHILDREN)`` is printed at
   the end.
   A "baseline" row runs only the imports a conversion needs (torch, megatron-core,
   megatron_sppo) to show the fixed start-up time and memory included in every step.
3. Prints a table: step, model size S (GB = 1e9 bytes, the HF tensors' bytes), seconds,
   throughput S/seconds in GB/s, peak RSS in GB and peak RSS / S.
4. Checks that a sample of tensors (every 10th name plus the embedding; all with
   ``--verify-all``) is bit-identical between the generated and the round-tripped HF
   checkpoint, and that both hold the same tensor names.

The files are written to ``--workdir`` (default: a new temporary directory) and deleted at
the end, on errors and on Ctrl-C, unless ``--keep`` is given. Written files usually stay in
the page cache, so the conversions read warm files; ``--cold`` asks the kernel to drop each
step's input files from the page cache first. ``--json PATH`` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

try:
    from megatron_sppo.errors import UserError
except ImportError:  # run from a source checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from megatron_sppo.errors import UserError

REPO = Path(__file__).resolve().parents[1]
GB = 1e9
HEAD_DIM = 128
CHUNK_ELEMS = 1 << 24  # random numbers generated per chunk (64 MiB of float32)
POLL_S = 0.05
SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# The view used for a bitwise comparison of each dtype.
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=float, default=1.0,
                   help="model size in billions of parameters (default 1.0)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    p.add_argument("--tp", type=int, default=1, help="TP of the Megatron checkpoint (default 1)")
    p.add_argument("--pp", type=int, default=1, help="PP of the Megatron checkpoint (default 1)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default 32000)")
    p.add_argument("--tie-embeddings", action="store_true",
                   help="tie the output head to the embedding (default: separate lm_head)")
    p.add_argument("--shard-gib", type=float, default=1.0,
                   help="size of the generated safetensors shards in GiB (default 1)")
    p.add_argument("--max-shard-size", default=None,
                   help="passed to megatron-to-hf (default: the converter's own, 5GB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None,
                   help="where to write the checkpoints (default: a new temporary directory); "
                        "must be empty or absent")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints and logs")
    p.add_argument("--cold", action="store_true",
                   help="drop each step's input files from the page cache before the step")
    p.add_argument("--verify-all", action="store_true", help="compare every tensor, not a sample")
    p.add_argument("--no-baseline", action="store_true", help="skip the import-only baseline row")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    if args.params <= 0 or args.tp < 1 or args.pp < 1 or args.shard_gib <= 0:
        p.error("--params, --shard-gib must be > 0 and --tp, --pp >= 1")
    return args


# ---- model shape -------------------------------------------------------------------------


def _shape(hidden: int, layers: int, vocab: int, kv_heads: int, tie: bool) -> dict:
    ffn = max(128, round(hidden * 35 / 6 / 128) * 128)  # Qwen2.5-1.5B: 8960 / 1536
    heads = hidden // HEAD_DIM
    kv = kv_heads * HEAD_DIM
    per_layer = (hidden * hidden + hidden            # q_proj + bias
                 + 2 * (kv * hidden + kv)            # k_proj, v_proj + biases
                 + hidden * hidden                   # o_proj
                 + 3 * hidden * ffn                  # gate, up, down
                 + 2 * hidden)                       # two RMSNorms
    fixed = vocab * hidden * (1 if tie else 2) + hidden
    return {"hidden_size": hidden, "num_hidden_layers": layers, "intermediate_size": ffn,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "vocab_size": vocab, "tie_word_embeddings": tie,
            "params": fixed + layers * per_layer, "_per_layer": per_layer, "_fixed": fixed}


def choose_shape(params: float, vocab: int, tp: int, pp: int, tie: bool) -> dict:
    """Qwen2.5-1.5B (hidden 1536, 28 layers, ffn 8960, 12 heads, 2 KV heads) scaled to
    ``params`` billion parameters, keeping its depth/width ratio and a TP/PP-valid layout."""
    target = params * 1e9
    kv_heads = max(2, tp)
    step = HEAD_DIM * kv_heads * (tp // math.gcd(tp, kv_heads))  # heads divisible by kv and tp
    best = None
    for hidden in range(step, 16384 + 1, step):
        probe = _shape(hidden, 1, vocab, kv_heads, tie)
        ideal_layers = (target - probe["_fixed"]) / probe["_per_layer"]
        if ideal_layers < pp:
            break
        want = hidden * 28 / 1536
        score = abs(math.log(ideal_layers / want))
        if best is None or score < best[0]:
            best = (score, hidden, ideal_layers)
    if best is None:  # smaller than the embedding allows: the narrowest model, pp layers
        hidden, layers = step, pp
    else:
        _, hidden, ideal_layers = best
        layers = max(pp, round(ideal_layers / pp) * pp)
    shape = _shape(hidden, layers, vocab, kv_heads, tie)
    for key in ("_per_layer", "_fixed"):
        shape.pop(key)
    return shape


def hf_config(shape: dict, dtype: str) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": shape["hidden_size"],
        "intermediate_size": shape["intermediate_size"],
        "num_hidden_layers": shape["num_hidden_layers"],
        "num_attention_heads": shape["num_attention_heads"],
        "num_key_value_heads": shape["num_key_value_heads"],
        "vocab_size": shape["vocab_size"],
        "tie_word_embeddings": shape["tie_word_embeddings"],
        "max_position_embeddings": 32768,
        "max_window_layers": shape["num_hidden_layers"],
        "use_sliding_window": False,
        "sliding_window": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "use_cache": True,
        "torch_dtype": dtype,
    }


def tensor_specs(shape: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(HF name, shape, init) of every tensor, in the order transformers writes them."""
    h, ffn, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    q, kv = shape["num_attention_heads"] * HEAD_DIM, shape["num_key_value_heads"] * HEAD_DIM
    specs = [("model.embed_tokens.weight", (v, h), "w")]
    for i in range(shape["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        specs += [(pre + "input_layernorm.weight", (h,), "norm"),
                  (pre + "mlp.down_proj.weight", (h, ffn), "w"),
                  (pre + "mlp.gate_proj.weight", (ffn, h), "w"),
                  (pre + "mlp.up_proj.weight", (ffn, h), "w"),
                  (pre + "post_attention_layernorm.weight", (h,), "norm"),
                  (pre + "self_attn.k_proj.bias", (kv,), "w"),
                  (pre + "self_attn.k_proj.weight", (kv, h), "w"),
                  (pre + "self_attn.o_proj.weight", (h, q), "w"),
                  (pre + "self_attn.q_proj.bias", (q,), "w"),
                  (pre + "self_attn.q_proj.weight", (q, h), "w"),
                  (pre + "self_attn.v_proj.bias", (kv,), "w"),
                  (pre + "self_attn.v_proj.weight", (kv, h), "w")]
    specs.append(("model.norm.weight", (h,), "norm"))
    if not shape["tie_word_embeddings"]:
        specs.append(("lm_head.weight", (v, h), "w"))
    return specs


# ---- streaming safetensors writer --------------------------------------------------------


def _write_shard(path: Path, specs, dtype: torch.dtype, gen: torch.Generator,
                 bufs: tuple[torch.Tensor, torch.Tensor]) -> None:
    """One safetensors file, streamed: the header (offsets known from the shapes), then each
    tensor's bytes chunk by chunk, so memory stays at one chunk whatever the shard size."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _ in specs:
        nbytes = math.prod(shape) * itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment
    fp32, out = bufs
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, shape, init in specs:
            left = math.prod(shape)
            while left:
                n = min(left, CHUNK_ELEMS)
                chunk = fp32[:n].normal_(0.0, 0.02, generator=gen)
                if init == "norm":
                    chunk.add_(1.0)
                piece = out[:n]
                piece.copy_(chunk)
                f.write(piece.view(torch.uint8).numpy().data)
                left -= n
    os.chmod(path, 0o644)


def generate_checkpoint(out: Path, shape: dict, dtype_name: str, shard_bytes: int,
                        seed: int) -> int:
    """Write config.json, the shards and the index; return the tensors' total bytes."""
    dtype = DTYPES[dtype_name]
    itemsize = torch.empty((), dtype=dtype).element_size()
    specs = tensor_specs(shape)
    shards, current, size = [], [], 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * itemsize
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += nbytes
    shards.append(current)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    bufs = (torch.empty(CHUNK_ELEMS, dtype=torch.float32), torch.empty(CHUNK_ELEMS, dtype=dtype))
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(out / name, shard, dtype, gen, bufs)
        for tname, tshape, _ in shard:
            weight_map[tname] = name
            total += math.prod(tshape) * itemsize
        print(f"  wrote {name} ({(out / name).stat().st_size / GB:.2f} GB)", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(hf_config(shape, dtype_name), indent=2) + "\n")
    return total


# ---- measured subprocesses ---------------------------------------------------------------


def _tree_rss(root: psutil.Process) -> tuple[int, int, int]:
    """(summed RSS, summed anonymous RSS, process count) of ``root`` and its descendants."""
    try:
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        return 0, 0, 0
    rss = anon = count = 0
    for proc in procs:
        try:
            mem = proc.memory_info()  # /proc/PID/statm: cheap enough to poll
        except psutil.Error:
            continue
        rss += mem.rss
        anon += mem.rss - getattr(mem, "shared", 0)  # shared = file-backed + shmem pages
        count += 1
    return rss, anon, count


def _kill_tree(proc: subprocess.Popen) -> None:
    """Stop a measured step (started in its own session) and its workers."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if os.waitpid(proc.pid, os.WNOHANG)[0]:
                break
        except ChildProcessError:
            break
        time.sleep(0.1)
    else:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_measured(label: str, cmd: list[str], log: Path) -> dict:
    """Run ``cmd``; wall time, peak summed tree RSS (polled) and the kernel's ru_maxrss."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    print(f"[{label}] {' '.join(cmd[1:])}", flush=True)
    with open(log, "wb") as logf:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                cwd=REPO, start_new_session=True)
        root = psutil.Process(proc.pid)
        peak = peak_anon = procs = 0
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                rss, anon, count = _tree_rss(root)
                peak, peak_anon, procs = max(peak, rss), max(peak_anon, anon), max(procs, count)
                time.sleep(POLL_S)
        except BaseException:
            _kill_tree(proc)
            raise
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{label} failed with exit status {proc.returncode}:\n{tail}")
    return {"step": label, "seconds": seconds, "peak_rss_bytes": peak,
            "peak_anon_rss_bytes": peak_anon, "max_processes": procs,
            "ru_maxrss_bytes": usage.ru_maxrss * 1024}  # Linux reports KiB


def drop_page_cache(directory: Path) -> None:
    """Ask the kernel to forget the cached pages of every file under ``directory``."""
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# ---- round-trip check --------------------------------------------------------------------


def _weight_map(hf_dir: Path) -> dict[str, str]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    from safetensors import safe_open

    with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as f:
        return {k: "model.safetensors" for k in f.keys()}


def verify_round_trip(src: Path, dst: Path, verify_all: bool) -> dict:
    """Bitwise comparison of a sample of tensors (or all) between two HF checkpoints."""
    from safetensors import safe_open

    src_map, dst_map = _weight_map(src), _weight_map(dst)
    names = list(src_map)
    sample = names if verify_all else sorted(set(names[::10]) | {"model.embed_tokens.weight"},
                                             key=names.index)
    mismatched, missing = [], sorted(set(src_map) ^ set(dst_map))
    handles = {}

    def get(directory, weight_map, name):
        key = (directory, weight_map[name])
        if key not in handles:
            handles[key] = safe_open(str(directory / weight_map[name]), framework="pt")
        return handles[key].get_tensor(name)

    compared = 0
    for name in sample:
        if name not in dst_map:
            continue
        a, b = get(src, src_map, name), get(dst, dst_map, name)
        same = (a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype])))
        compared += 1
        if not same:
            mismatched.append(name)
    config_same = (src / "config.json").read_bytes() == (dst / "config.json").read_bytes()
    return {"compared": compared, "total_tensors": len(names), "mismatched": mismatched,
            "names_only_in_one": missing, "config_identical": config_same,
            "ok": not mismatched and not missing and compared > 0 and config_same}


# ---- report ------------------------------------------------------------------------------


def print_table(rows: list[dict], size: int) -> None:
    s_gb = size / GB
    header = ("step", "S (GB)", "seconds", "GB/s", "peak RSS (GB)", "RSS/S",
              "peak anon (GB)", "anon/S", "ru_maxrss (GB)", "procs")
    lines = []
    for r in rows:
        timed = r["step"] != "baseline (imports)"
        lines.append((r["step"], f"{s_gb:.2f}", f"{r['seconds']:.1f}",
                      f"{s_gb / r['seconds']:.3f}" if timed else "-",
                      f"{r['peak_rss_bytes'] / GB:.2f}", f"{r['peak_rss_bytes'] / size:.2f}",
                      f"{r['peak_anon_rss_bytes'] / GB:.2f}",
                      f"{r['peak_anon_rss_bytes'] / size:.2f}",
                      f"{r['ru_maxrss_bytes'] / GB:.2f}", str(r["max_processes"])))
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    print(fmt.format(*header))
    print("  ".join("-" * w for w in widths))
    for line in lines:
        print(fmt.format(*line))


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def benchmark(args: argparse.Namespace, work: Path) -> dict:
    from megatron_sppo.models.hf_config import arch_from_hf_config

    shape = choose_shape(args.params, args.vocab, args.tp, args.pp, args.tie_embeddings)
    arch = arch_from_hf_config(hf_config(shape, args.dtype))  # what the converter will accept
    arch.check_parallel(args.tp, args.pp)
    hf_in, meg, hf_out, logs = work / "hf", work / "megatron", work / "hf_roundtrip", work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"model: Qwen2-shaped, {shape['params'] / 1e9:.3f}B parameters: hidden "
          f"{shape['hidden_size']}, {shape['num_hidden_layers']} layers, ffn "
          f"{shape['intermediate_size']}, {shape['num_attention_heads']} heads / "
          f"{shape['num_key_value_heads']} KV heads, vocab {shape['vocab_size']}, "
          f"{'tied' if shape['tie_word_embeddings'] else 'untied'} head, {args.dtype}")
    print(f"workdir: {work}")
    start = time.perf_counter()
    size = generate_checkpoint(hf_in, shape, args.dtype, int(args.shard_gib * 1024**3), args.seed)
    gen_s = time.perf_counter() - start
    print(f"generated {size / GB:.2f} GB in {gen_s:.1f} s")

    py = sys.executable
    rows = []
    if not args.no_baseline:
        rows.append(run_measured("baseline (imports)", [py, "-c", (
            "import megatron_sppo.checkpoint.convert, megatron_sppo.models.builder, "
            "megatron.core.dist_checkpointing, megatron.core.models.gpt")], logs / "baseline.log"))
    if args.cold:
        drop_page_cache(hf_in)
    rows.append(run_measured(f"hf-to-megatron tp={args.tp} pp={args.pp}", [
        py, "-m", "megatron_sppo", "convert", "hf-to-megatron", "--hf-path", str(hf_in),
        "--megatron-path", str(meg), "--tp", str(args.tp), "--pp", str(args.pp),
        "--no-progress"], logs / "hf_to_megatron.log"))
    if args.cold:
        drop_page_cache(meg)
    m2h = [py, "-m", "megatron_sppo", "convert", "megatron-to-hf", "--megatron-path", str(meg),
           "--hf-path", str(hf_out), "--no-progress"]
    if args.max_shard_size:
        m2h += ["--max-shard-size", args.max_shard_size]
    rows.append(run_measured("megatron-to-hf", m2h, logs / "megatron_to_hf.log"))
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024

    print()
    print_table(rows, size)
    print(f"\nS = {size / GB:.3f} GB of HF tensors ({shape['params'] / 1e9:.3f}B params, "
          f"{args.dtype}); on disk: HF {_dir_bytes(hf_in) / GB:.2f} GB, Megatron "
          f"{_dir_bytes(meg) / GB:.2f} GB (vocab padded to {arch.padded_vocab_size}), "
          f"round-tripped HF {_dir_bytes(hf_out) / GB:.2f} GB")
    print("peak RSS: summed over the step's process tree (polled every 0.05 s); anon = RSS "
          "minus file-backed/shared pages; ru_maxrss: largest single process (kernel)")
    print(f"resource.getrusage(RUSAGE_CHILDREN).ru_maxrss over all steps: {children / GB:.2f} GB")
    check = verify_round_trip(hf_in, hf_out, args.verify_all)
    verdict = "OK, bit-identical" if check["ok"] else "FAILED"
    print(f"round trip: {verdict}: {check['compared']} of {check['total_tensors']} tensors "
          f"compared bitwise, {len(check['mismatched'])} differ, "
          f"{len(check['names_only_in_one'])} names in only one checkpoint, config.json "
          f"{'identical' if check['config_identical'] else 'DIFFERS'}")
    for name in check["mismatched"][:10]:
        print(f"  differs: {name}")
    return {"shape": shape, "dtype": args.dtype, "tp": args.tp, "pp": args.pp,
            "size_bytes": size, "generate_seconds": gen_s, "steps": rows,
            "rusage_children_maxrss_bytes": children, "round_trip": check,
            "cold": args.cold, "host": {"cpus": os.cpu_count(),
                                        "ram_bytes": psutil.virtual_memory().total}}


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    created = args.workdir is None or not args.workdir.exists()
    if args.workdir is None:
        work = Path(tempfile.mkdtemp(prefix="sppo-convert-bench-"))
    else:
        work = args.workdir.absolute()
        if work.exists() and (not work.is_dir() or any(work.iterdir())):
            print(f"error: --workdir {work} is not an empty directory", file=sys.stderr)
            return 2
        work.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM cleans up like Ctrl-C does
    status = 0
    try:
        result = benchmark(args, work)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")
            print(f"figures written to {args.json}")
        status = 0 if result["round_trip"]["ok"] else 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        status = 130
    except (RuntimeError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        status = 1
    finally:
        if args.keep:
            print(f"kept {work}")
        elif created:
            shutil.rmtree(work, ignore_errors=True)
        else:  # an existing empty --workdir: remove only what was written into it
            for sub in ("hf", "megatron", "hf_roundtrip", "logs"):
                shutil.rmtree(work / sub, ignore_errors=True)
            for partial in work.glob(".*.partial-*"):
                shutil.rmtree(partial, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
