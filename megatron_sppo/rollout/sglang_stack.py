"""The two torch stacks of one container: the trainer's (the NGC image's torch) and SGLang's
(its own pinned torch in ``rollout.sglang.python``'s environment).

They meet in two places, and each transport needs its own agreement:

* CUDA IPC (colocated, ``/update_weights_from_tensor``): the trainer pickles CUDA tensors with
  its ``torch.multiprocessing.reductions.reduce_tensor`` and the server rebuilds them with its
  own ``rebuild_cuda_tensor``, positionally; the argument lists must match. torch 2.14's has
  15 parameters (tensor_cls ... event_sync_required); SGLang patches index 6, the device.
* NCCL (servers on their own GPUs, ``/update_weights_from_distributed``): rank 0 of the trainer
  and the servers' ranks form one communicator with the NCCL each torch loads; NCCL supports
  one version across a communicator (mismatches fail at init or hang). The PyPI torch 2.14.1
  that SGLang 0.5.23 pins bundles nvidia-nccl-cu13 2.30.7; an NGC image's torch is built
  against the image's own NCCL, so the two differ unless the image is chosen to match.

:func:`check_stacks` runs at start-up, before a server is launched, and refuses a mismatch in
one line; :func:`torch_stack` is what ``tools/gpu_check.py`` reports for both environments.
"""

from __future__ import annotations

import json
import subprocess

from megatron_sppo.errors import UserError

# Runs in either environment (imports torch only, never sglang).
_VERSIONS = r"""
def versions():
    import inspect, sys, torch
    from torch.multiprocessing import reductions
    try:
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:  # a CPU-only torch build has no NCCL
        nccl = None
    return {"python": sys.executable, "torch": torch.__version__, "cuda": torch.version.cuda,
            "nccl": nccl, "rebuild_cuda_tensor": list(inspect.signature(
                reductions.rebuild_cuda_tensor).parameters)}
"""


def torch_stack(python: str | None = None, timeout_s: float = 300.0) -> dict:
    """torch, CUDA and NCCL versions and the ``rebuild_cuda_tensor`` parameters of the
    environment of ``python`` (this process when None)."""
    if python is None:
        scope: dict = {}
        exec(_VERSIONS, scope)  # noqa: S102  (our own constant)
        return scope["versions"]()
    probe = _VERSIONS + "\nimport json\nprint(json.dumps(versions()))\n"
    try:
        out = subprocess.run([python, "-c", probe], capture_output=True, text=True,
                             timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"rollout.sglang.python={python} does not run ({e}): point it at the "
                        "SGLang environment's python") from None
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"rollout.sglang.python={python} cannot import torch ({tail}): point "
                        "it at the SGLang environment's python")
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_stacks(trainer: dict, server: dict, sync: str) -> None:
    """Refuse what the chosen transport cannot bridge (``sync``: "tensor" or "distributed")."""
    where = (f"the trainer's torch {trainer['torch']} ({trainer['python']}) and SGLang's torch "
             f"{server['torch']} ({server['python']})")
    if sync == "tensor" and trainer["rebuild_cuda_tensor"] != server["rebuild_cuda_tensor"]:
        raise UserError(f"{where} pickle CUDA tensors differently (rebuild_cuda_tensor "
                        f"{trainer['rebuild_cuda_tensor']} vs {server['rebuild_cuda_tensor']}): "
                        "the colocated weight sync would rebuild garbage; install matching "
                        "torch versions or set rollout.sglang.colocated=false")
    if sync == "distributed" and trainer["nccl"] != server["nccl"]:
        raise UserError(f"{where} load NCCL {trainer['nccl']} and {server['nccl']}: one NCCL "
                        "communicator needs one NCCL version; run SGLang colocated "
                        "(rollout.sglang.colocated=true, CUDA IPC, no NCCL between them) or "
                        "give rollout.sglang.python an environment whose NCCL matches")


def report_stacks(sglang_python: str) -> dict:
    """Both stacks, for tools/gpu_check.py: ``{"trainer": {...}, "sglang": {...}}``."""
    return {"trainer": torch_stack(), "sglang": torch_stack(sglang_python)}
