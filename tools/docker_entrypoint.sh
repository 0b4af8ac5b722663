#!/usr/bin/env bash
# Entrypoint of the megatron-sppo image (see the Dockerfile at the repository root).
#
# 1. runs NVIDIA's own entrypoint first when the base image has one (CUDA forward-compat
#    set-up and the NGC banner), which then calls this script again;
# 2. prints the versions of the stack (to stderr, so a command's stdout stays clean);
# 3. lists the GPUs (nvidia-smi -L) and runs a tiny matmul on CUDA, unless SPPO_SKIP_SMOKE=1;
# 4. execs the command (default: megatron-sppo --help).
#
# Environment: SPPO_SKIP_SMOKE=1 skips the GPU smoke check (e.g. on a machine without GPUs);
# SGLANG_VENV (default /opt/sglang-venv) is the SGLang virtual environment.
set -euo pipefail

NV_ENTRYPOINT=/opt/nvidia/nvidia_entrypoint.sh
if [[ -z "${SPPO_NV_ENTRYPOINT_DONE:-}" && -x "${NV_ENTRYPOINT}" ]]; then
    export SPPO_NV_ENTRYPOINT_DONE=1
    exec "${NV_ENTRYPOINT}" "$0" "$@"
fi

if [[ $# -eq 0 ]]; then
    set -- megatron-sppo --help
fi

SGLANG_VENV="${SGLANG_VENV:-/opt/sglang-venv}"

log() {
    printf '%s\n' "$*" >&2
}

log "== megatron-sppo image =="
python - >&2 <<'PY'
import importlib
import importlib.metadata as md
import importlib.util
import platform


def dist_version(*names):
    for name in names:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            pass
    return None


def module_version(module, *dists):
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return "absent"
    except Exception as e:  # noqa: BLE001  (a broken install is reported, not fatal)
        return f"broken ({type(e).__name__}: {e})"
    return getattr(mod, "__version__", None) or dist_version(*dists) or "present (version unknown)"


rows = [("python", platform.python_version())]
try:
    import torch

    cuda = torch.version.cuda or "none (CPU build)"
    rows += [("torch", torch.__version__), ("CUDA (torch build)", cuda),
             ("cuDNN", str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available()
              else "absent"),
             ("GPUs visible to torch", str(torch.cuda.device_count()))]
except ImportError:
    rows.append(("torch", "absent"))
rows += [
    ("megatron-core", dist_version("megatron-core", "megatron_core") or "absent"),
    ("transformer-engine", dist_version("transformer_engine", "transformer-engine")
     or module_version("transformer_engine", "transformer_engine")),
    ("apex", "absent" if importlib.util.find_spec("apex") is None
     else dist_version("apex") or "present"),
    ("transformers", dist_version("transformers") or "absent"),
    ("megatron_sppo", module_version("megatron_sppo", "megatron-sppo")),
]
width = max(len(name) for name, _ in rows)
for name, value in rows:
    print(f"{name:<{width}}  {value}")
PY

sglang_version="absent"
if [[ -x "${SGLANG_VENV}/bin/python" ]]; then
    sglang_version="$("${SGLANG_VENV}/bin/python" -c \
        'import importlib.metadata as m; print(m.version("sglang"))' 2>/dev/null || echo absent)"
fi
log "sglang (${SGLANG_VENV})  ${sglang_version}"

if command -v nvidia-smi > /dev/null 2>&1; then
    nvidia-smi -L >&2 || log "nvidia-smi -L failed (driver not reachable from the container?)"
else
    log "nvidia-smi: not found"
fi

if [[ "${SPPO_SKIP_SMOKE:-0}" != "1" ]]; then
    log "== GPU smoke check (set SPPO_SKIP_SMOKE=1 to skip) =="
    python - >&2 <<'PY'
import sys
import time

import torch

if not torch.cuda.is_available():
    sys.exit("GPU smoke check failed: torch.cuda.is_available() is False. Run the container "
             "with GPUs (docker run --gpus all ..., srun --gpus ...) or set SPPO_SKIP_SMOKE=1.")
torch.manual_seed(0)
a = torch.randn(512, 512)
b = torch.randn(512, 512)
start = time.perf_counter()
c = (a.cuda() @ b.cuda()).cpu()  # .cpu() waits for the kernel
elapsed = time.perf_counter() - start
expected = a.double() @ b.double()
rel = ((c.double() - expected).abs().max() / expected.abs().max()).item()
if not rel < 1e-2:  # TF32 rounding (~1e-3) passes; a wrong or NaN result does not
    sys.exit(f"GPU smoke check failed: a 512x512 matmul on cuda is off by {rel:.3g} (relative)")
print(f"ok: 512x512 matmul on {torch.cuda.get_device_name(0)}: {elapsed * 1e3:.0f} ms with "
      f"CUDA start-up, relative error {rel:.1g}")
PY
fi

exec "$@"
