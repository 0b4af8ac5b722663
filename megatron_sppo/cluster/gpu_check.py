"""The first thing to run on a new GPU node: does this stack work here, and how fast?

Checks, each reported as passed / failed / skipped with its figures (``tools/gpu_check.py``):

* ``environment``: GPU, CUDA, Transformer Engine, and both Python stacks (the trainer's and
  SGLang's torch, CUDA and NCCL).
* ``te_vs_local``: the Transformer Engine layer spec against megatron-core's local spec on the
  same HF weights in bf16: logits and every parameter's gradient.
* ``fp8_<recipe>``: one training step per FP8 recipe this GPU supports, against bf16.
* ``sglang_colocated``: ``megatron-sppo train`` for two steps with SGLang on the trainer's GPU
  (memory saver, CUDA-IPC tensor sync): rollouts, the log-prob mismatch between SGLang and
  Megatron after each sync (bf16), and the memory hand-over between the two.
* ``weight_sync``: the same for a ~1B-parameter policy: the sync time and its rate.

Under the emulated accelerator (``MEGATRON_SPPO_EMULATE_GPU=1``, the test suite, with the
SGLang stand-in) everything runs except what needs Transformer Engine, which is skipped with
its reason, so this script cannot go stale on CPU.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# bf16 tolerances: two kernels summing in different orders differ by a few bf16 ulps
# (2^-8 relative) per op; over a few layers that stays within 2% of the logit scale.
TE_LOGIT_TOL = 2e-2  # max |TE - local| / max |local| over the logits
TE_GRAD_COSINE = 0.99  # cosine similarity of every parameter's gradient
FP8_LOSS_TOL = 0.05  # |loss_fp8 - loss_bf16| / |loss_bf16|
MISMATCH_MEAN_TOL = 0.05  # mean |SGLang log-prob - Megatron log-prob| on sampled tokens (bf16)

# ~1.03B parameters with the character tokenizer: 20 layers of hidden 2048, FFN 5632
ONE_B = dict(hidden_size=2048, num_layers=20, num_heads=16, num_kv_heads=8,
             intermediate_size=5632)
SMALL = dict(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=704)
TINY = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)


@dataclass
class Check:
    name: str
    status: str = "passed"
    figures: dict = field(default_factory=dict)
    reason: str = ""

    def fail(self, reason: str) -> "Check":
        self.status, self.reason = "failed", reason
        return self

    def skip(self, reason: str) -> "Check":
        self.status, self.reason = "skipped", reason
        return self


@dataclass
class Options:
    output_dir: Path
    sglang_python: str
    sync_model: dict
    check_model: dict
    timeout_s: float = 600.0


def _model(root: Path, name: str, sizes: dict, dtype) -> Path:
    """A random Qwen2-shaped HF checkpoint (character tokenizer), built once per run."""
    from megatron_sppo.models.tiny import make_tiny_hf_model

    out = root / name
    if not (out / "config.json").is_file():
        make_tiny_hf_model(out, family="qwen2", dtype=dtype, **sizes)
    return out


# ---- environment ---------------------------------------------------------------------------

def check_environment(opts: Options) -> Check:
    import torch

    from megatron_sppo.quant.fp8_train import detect_environment
    from megatron_sppo.rollout.sglang_stack import report_stacks

    check = Check("environment")
    if not torch.cuda.is_available():
        return check.fail("no CUDA GPU is visible: check the driver, CUDA_VISIBLE_DEVICES and "
                          "that the job asked for GPUs (--gpus-per-node)")
    env = detect_environment()
    props = torch.cuda.get_device_properties(0)
    check.figures.update(gpu=props.name, capability=list(env.capability or ()),
                         memory_gb=round(props.total_memory / 2**30, 1),
                         gpus=torch.cuda.device_count(), cuda=env.cuda_version,
                         transformer_engine=env.te_version if env.te_installed else None,
                         stacks=report_stacks(opts.sglang_python))
    return check


# ---- Transformer Engine against the local spec ---------------------------------------------

def _te_missing() -> str | None:
    from megatron_sppo.models.builder import use_transformer_engine

    return None if use_transformer_engine() else (
        "Transformer Engine is not installed or no real GPU is present: run inside the NGC "
        "PyTorch container on a GPU node")


# the local spec's separate norms under TE's fused names (as their sharded_state_dicts map them)
_LOCAL_TO_TE = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
                "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}


def _te_name(local_name: str) -> str:
    for local, te in _LOCAL_TO_TE.items():
        if local_name.endswith(local):
            return local_name[: -len(local)] + te
    return local_name


def _forward_backward(model, ids):
    """Logits and {TE-style name: gradient} of a fixed next-token loss."""
    import torch

    from megatron_sppo.models.inputs import causal_inputs

    model.zero_grad()
    logits = model(ids, *causal_inputs(ids))
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1),
                                             ids[:, 1:].flatten())
    loss.backward()
    grads = {_te_name(n): p.grad.float() for n, p in model.named_parameters()
             if p.grad is not None}
    return logits.float().detach(), grads


def check_te_vs_local(opts: Options) -> Check:
    import torch

    from megatron_sppo.checkpoint.convert import model_from_hf

    check = Check("te_vs_local")
    if reason := _te_missing():
        return check.skip(reason)
    hf = _model(opts.output_dir / "models", "check", opts.check_model, torch.bfloat16)
    ids = torch.randint(0, 100, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
    outs = {}
    for use_te in (False, True):
        _, _, model = model_from_hf(hf, params_dtype=torch.bfloat16, use_te=use_te)
        outs[use_te] = _forward_backward(model, ids)
        del model
    (ref, ref_grads), (te, te_grads) = outs[False], outs[True]
    logit_err = ((te - ref).abs().max() / ref.abs().max()).item()
    cosines = {n: torch.nn.functional.cosine_similarity(te_grads[n].flatten(),
                                                        g.flatten(), dim=0).item()
               for n, g in ref_grads.items() if n in te_grads}
    worst = min(cosines, key=cosines.get)
    check.figures.update(logit_rel_err=logit_err, grad_cosine_min=cosines[worst],
                         grad_cosine_worst_param=worst, params_compared=len(cosines),
                         params_local=len(ref_grads), tolerances={
                             "logit_rel_err": TE_LOGIT_TOL, "grad_cosine": TE_GRAD_COSINE})
    if len(cosines) != len(ref_grads):
        return check.fail(f"{len(ref_grads) - len(cosines)} local-spec parameters have no TE "
                          "counterpart")
    if logit_err > TE_LOGIT_TOL or cosines[worst] < TE_GRAD_COSINE:
        return check.fail("TE and local spec disagree beyond bf16 tolerance")
    return check


# ---- FP8 ----------------------------------------------------------------------------------

def _one_step_loss(hf: Path, fp8) -> float:
    """The loss of one training step of ``hf`` in bf16 with ``fp8`` settings (TE spec)."""
    import torch

    from megatron_sppo.config import ModelConfig
    from megatron_sppo.models.inputs import causal_inputs
    from megatron_sppo.trainer.models import build_trained_model

    model = build_trained_model("policy", ModelConfig(
        checkpoint=str(hf), params_dtype="bfloat16", lr=1e-5, fp8=fp8), str(hf), 10)
    ids = torch.randint(0, 100, (4, 128), generator=torch.Generator().manual_seed(1)).cuda()
    model.zero_grad()
    logits = model.ddp(ids, *causal_inputs(ids))
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1),
                                             ids[:, 1:].flatten())
    loss.backward()
    applied, _ = model.step()
    if not applied:
        raise RuntimeError("the optimizer skipped the step (non-finite gradients)")
    return loss.item()


def check_fp8(opts: Options) -> list[Check]:
    import torch

    from megatron_sppo.errors import UserError
    from megatron_sppo.quant.fp8_train import (RECIPES, FP8Settings, check_fp8_support,
                                               detect_environment)

    checks = [Check(f"fp8_{recipe}") for recipe in RECIPES]
    if reason := _te_missing():
        return [c.skip(reason) for c in checks]
    hf = _model(opts.output_dir / "models", "check", opts.check_model, torch.bfloat16)
    bf16 = _one_step_loss(hf, FP8Settings())
    env = detect_environment()
    for check, recipe in zip(checks, RECIPES):
        settings = FP8Settings(format="hybrid", recipe=recipe)
        try:
            check_fp8_support(settings, env)
        except UserError as e:
            check.skip(str(e))
            continue
        loss = _one_step_loss(hf, settings)
        check.figures.update(loss=loss, loss_bf16=bf16, rel_diff=abs(loss - bf16) / abs(bf16),
                             tolerance=FP8_LOSS_TOL)
        if check.figures["rel_diff"] > FP8_LOSS_TOL:
            check.fail(f"FP8 {recipe} loss is {check.figures['rel_diff']:.1%} off bf16")
    return checks


# ---- SGLang with the trainer ----------------------------------------------------------------

def _train(opts: Options, name: str, hf: Path, steps: int, prompts: int) -> list[dict]:
    """``megatron-sppo train`` for ``steps`` steps with SGLang colocated on this GPU; the
    metrics of each step."""
    from megatron_sppo.runtime.distributed import free_port

    out = opts.output_dir / name
    config = {
        "policy": {"checkpoint": str(hf), "params_dtype": "bfloat16", "lr": 1e-6},
        "critic": {"params_dtype": "bfloat16", "lr": 1e-6},
        "rollout": {"engine": "sglang", "n": 1, "temperature": 1.0, "max_prompt_length": 64,
                    "max_response_length": 32,
                    "sglang": {"python": opts.sglang_python, "colocated": True,
                               "enable_memory_saver": True, "mem_fraction_static": 0.5,
                               "dtype": "bfloat16", "port": free_port(),
                               "sync_master_port": free_port()}},
        "data": {"train_files": ["builtin:arithmetic"]},
        "reward": {"function": "arithmetic"},
        "trainer": {"output_dir": str(out), "total_steps": steps, "prompts_per_step": prompts,
                    "max_tokens_per_microbatch": 4096, "progress": False,
                    "tensorboard": False},
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.input.yaml"
    path.write_text(yaml.safe_dump(config))
    log = out / "train.log"
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, "-m", "megatron_sppo", "train", "--config",
                               str(path)], stdout=f, stderr=subprocess.STDOUT,
                              timeout=opts.timeout_s)
    if proc.returncode:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"train exited with {proc.returncode} (log {log}): "
                           + " | ".join(tail))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


_MEMORY_KEYS = ("memory/train_allocated_gb", "memory/rollout_allocated_gb",
                "memory/rollout_free_gb", "memory/train_free_gb")


def check_sglang_colocated(opts: Options) -> Check:
    import torch

    check = Check("sglang_colocated")
    hf = _model(opts.output_dir / "models", "check", opts.check_model, torch.bfloat16)
    metrics = _train(opts, "sglang_colocated", hf, steps=2, prompts=16)
    last = metrics[-1]
    check.figures.update(
        steps=len(metrics), rollout_s=last["time_rollout"], sync_s=last["time_sync"],
        logprob_mismatch_mean=max(m["logprob_mismatch_mean"] for m in metrics),
        logprob_mismatch_max=max(m["logprob_mismatch_max"] for m in metrics),
        tolerance_mean=MISMATCH_MEAN_TOL,
        **{k.split("/")[1]: last[k] for k in _MEMORY_KEYS if k in last})
    if check.figures["logprob_mismatch_mean"] > MISMATCH_MEAN_TOL:
        return check.fail("SGLang's log-probs differ from Megatron's after the sync: the "
                          "weights did not arrive, or the engines compute differently")
    missing = [k for k in _MEMORY_KEYS if k not in last]
    if missing:
        return check.fail(f"the trainer reported no {', '.join(missing)}")
    if last["memory/rollout_allocated_gb"] >= last["memory/train_allocated_gb"]:
        return check.fail("Megatron kept its training memory while SGLang generated")
    return check


def check_weight_sync(opts: Options) -> Check:
    import torch

    check = Check("weight_sync")
    hf = _model(opts.output_dir / "models", "sync", opts.sync_model, torch.bfloat16)
    params = _parameter_count(hf)
    metrics = _train(opts, "weight_sync", hf, steps=1, prompts=8)
    seconds = metrics[-1]["time_sync"]
    check.figures.update(params_b=params / 1e9, sync_s=seconds,
                         gb_per_s=2 * params / 1e9 / max(seconds, 1e-9),
                         logprob_mismatch_mean=metrics[-1]["logprob_mismatch_mean"])
    return check


def _parameter_count(hf: Path) -> int:
    from safetensors import safe_open

    count = 0
    for path in hf.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            count += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return count


# ---- running and reporting ------------------------------------------------------------------

def run_checks(opts: Options) -> list[Check]:
    """Every check, each in isolation: one that raises is reported failed, the rest run."""
    from megatron_sppo.runtime import init_distributed

    init_distributed(1, 1)
    results: list[Check] = []
    steps = [("environment", check_environment), ("te_vs_local", check_te_vs_local),
             ("fp8", check_fp8), ("sglang_colocated", check_sglang_colocated),
             ("weight_sync", check_weight_sync)]
    for name, fn in steps:
        start = time.perf_counter()
        try:
            out = fn(opts)
        except Exception as e:  # a broken check is a result, not the end of the report
            out = Check(name).fail(f"{type(e).__name__}: {e}")
            out.figures["traceback"] = traceback.format_exc(limit=4)
        for check in out if isinstance(out, list) else [out]:
            check.figures.setdefault("seconds", round(time.perf_counter() - start, 2))
            results.append(check)
            print(f"{check.name:<18} {check.status:<8} {check.reason}", flush=True)
    return results


def summary_markdown(results: list[Check]) -> str:
    lines = ["| check | status | figures | reason |", "|---|---|---|---|"]
    for c in results:
        figures = ", ".join(f"{k}={_fmt(v)}" for k, v in c.figures.items()
                            if k not in ("traceback", "stacks"))
        lines.append(f"| {c.name} | {c.status} | {figures} | {c.reason} |")
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_report(results: list[Check], output_dir: Path) -> Path:
    """``gpu_check.json`` and ``gpu_check.md`` in ``output_dir``, each written atomically."""
    report = {"emulated": os.environ.get("MEGATRON_SPPO_EMULATE_GPU") == "1",
              "checks": [c.__dict__ for c in results]}
    for name, text in (("gpu_check.json", json.dumps(report, indent=2, default=str)),
                       ("gpu_check.md", summary_markdown(results))):
        tmp = output_dir / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(output_dir / name)
    return output_dir / "gpu_check.json"
