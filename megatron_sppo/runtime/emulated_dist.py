"""Process groups under the emulated accelerator: NCCL's rules, gloo's wires.

Every group is created with gloo underneath, but keeps the backend it was asked for
(``get_backend`` reports it, object collectives pick its device) and enforces that
backend's rules the way torch's c10d and NCCL do (read from torch 2.14
``distributed_c10d.py`` and ``ProcessGroupNCCL.cpp``):

* a host tensor in a collective of an NCCL-only group raises "No backend type associated
  with device type cpu"; ``"cpu:gloo,cuda:nccl"`` groups take host and device tensors;
* the first device-tensor collective of a group with NCCL checks that no two of its ranks
  use the same GPU (node and physical GPU id), as NCCL's communicator set-up does
  ("Duplicate GPU detected"): two processes on one GPU cannot share an NCCL communicator.

Device tensors are handed to gloo as their host storage (in-place results land in them).
Groups made with ``_new_process_group_helper`` directly (SGLang's
``init_custom_process_group``, the trainer's weight-update group) follow the same rules.
"""

from __future__ import annotations

import functools
import inspect
import sys

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from megatron_sppo.runtime import emulated

_DECLARED: dict[int, str] = {}  # id(process group) -> the backend it was created with
_CHECKED: set[int] = set()  # groups whose GPUs were checked for duplicates
_ORIGINAL: dict[str, object] = {}
# Collectives with a torch function mode active hand themselves back to ``c10d.<name>`` (this
# wrapper) through handle_torch_function, with the host tensors already prepared: that second
# pass goes straight through (per thread, per collective).


def _backend_devices(backend: str | None) -> set[str]:
    """Device types a backend string serves: "nccl" cuda only; gloo both (as torch's gloo
    runs CUDA tensors through the host); "cpu:gloo,cuda:nccl" both."""
    text = str(backend or "undefined").lower()
    if text in ("undefined", "gloo"):
        return {"cpu", "cuda"}
    if ":" in text:
        return {pair.split(":")[0] for pair in text.split(",")}
    return {"cuda"} if text == "nccl" else {"cpu", "cuda"}


def _uses_nccl(backend: str | None) -> bool:
    text = str(backend or "undefined").lower()
    return "nccl" in text or text == "undefined"


def declared_backend(group=None) -> str:
    group = group if group is not None else c10d._get_default_group()
    return _DECLARED.get(id(group), "gloo")


def _new_process_group_helper(group_size, group_rank, global_ranks_in_group, backend, store,
                              group_name, backend_options=None, timeout=None, pg_tag=None,
                              device_id=None, group_desc=None, **kwargs):
    """Create the group over gloo and remember the backend it was asked for."""
    pg, prefix_store = _ORIGINAL["_new_process_group_helper"](
        group_size, group_rank, global_ranks_in_group, "gloo", store, group_name,
        None, timeout, pg_tag, None, group_desc, **kwargs)
    if pg is not c10d.GroupMember.NON_GROUP_MEMBER:
        declared = str(backend)
        _DECLARED[id(pg)] = declared
        c10d._world.pg_map[pg] = (declared, prefix_store)
    return pg, prefix_store


def _object_coll_device(group=None) -> str:
    """torch's rule for object collectives, on the declared backend: its one device, or
    the host when it serves both."""
    devices = _backend_devices(declared_backend(group))
    return "cpu" if "cpu" in devices else "cuda"


def _pg_default_device(group=None) -> torch.device:
    device = _object_coll_device(group)
    return torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else \
        torch.device("cpu")


def _check_distinct_gpus(group, index: int) -> None:
    """NCCL's communicator set-up: every rank of the group on its own GPU."""
    d = emulated.devices()
    mine = (d.node, d.physical[index])
    everyone = [None] * group.size()
    _ORIGINAL["all_gather_object"](everyone, mine, group=group)
    seen: dict[tuple, int] = {}
    for rank, gpu in enumerate(map(tuple, everyone)):
        if gpu in seen:
            raise RuntimeError(
                f"NCCL error: invalid usage (run with NCCL_DEBUG=WARN for details), NCCL "
                f"version 2.x: Duplicate GPU detected : rank {rank} and rank {seen[gpu]} "
                f"both on CUDA device {gpu[1]} of node {gpu[0]} [emulated GPU: two processes "
                f"of one NCCL group share a GPU]")
        seen[gpu] = rank


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _prepare(value, group, what: str):
    """Check each tensor against the group's backend; device tensors -> their host data."""
    declared = declared_backend(group)
    serves = _backend_devices(declared)
    for t in _tensors(value):
        if emulated.is_device_tensor(t):
            if "cuda" not in serves:
                raise RuntimeError(f"No backend type associated with device type cuda "
                                   f"[emulated GPU: {what} on a {declared} group]")
            if _uses_nccl(declared) and id(group) not in _CHECKED:
                _CHECKED.add(id(group))
                _check_distinct_gpus(group, t.index)
        elif "cpu" not in serves:
            raise RuntimeError(
                f"No backend type associated with device type cpu [emulated GPU: {what} on a "
                f"{declared} group got a host tensor (shape {list(t.shape)}, {t.dtype}) "
                f"created by {emulated._origin(t)}; use a device tensor or a gloo group]")
    return emulated._unwrap(value)


def _collective(name: str, tensor_args: tuple[str, ...]):
    original = getattr(c10d, name)
    _ORIGINAL[name] = original
    signature = inspect.signature(original)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        group = bound.arguments.get("group")
        group = group if group is not None else c10d._get_default_group()
        for arg in tensor_args:
            if arg in bound.arguments:
                bound.arguments[arg] = _prepare(bound.arguments[arg], group, name)
        # some collectives re-dispatch through torch-function handling to their public
        # name (this wrapper); the checked host tensors must not come back here
        with torch._C.DisableTorchFunction():
            return original(*bound.args, **bound.kwargs)

    return wrapper


_COLLECTIVES = {
    "all_reduce": ("tensor",), "broadcast": ("tensor",), "reduce": ("tensor",),
    "all_gather": ("tensor_list", "tensor"),
    "all_gather_into_tensor": ("output_tensor", "input_tensor"),
    "reduce_scatter": ("output", "input_list"),
    "reduce_scatter_tensor": ("output", "input"),
    "all_to_all_single": ("output", "input"),
    "all_to_all": ("output_tensor_list", "input_tensor_list"),
    "gather": ("tensor", "gather_list"), "scatter": ("tensor", "scatter_list"),
    "send": ("tensor",), "recv": ("tensor",), "isend": ("tensor",), "irecv": ("tensor",),
    "all_reduce_coalesced": ("tensors",),
}


def _batch_isend_irecv(p2p_op_list):
    """Each P2P op checked and unwrapped, then sent as torch sends a batch a backend cannot
    coalesce: one isend/irecv per op."""
    works = []
    for op in p2p_op_list:
        send = op.op is c10d.isend
        tensor = _prepare(op.tensor, op.group, "batch_isend_irecv")
        works.append(_ORIGINAL["isend" if send else "irecv"](
            tensor, group=op.group, tag=op.tag,
            **{"group_dst" if send else "group_src": op.group_peer}))
    return works


def install() -> None:
    """Patch torch.distributed (idempotent), and re-point aliases megatron-core took at import."""
    if _ORIGINAL:
        return
    replacements = {name: _collective(name, args) for name, args in _COLLECTIVES.items()}
    _ORIGINAL["all_gather_object"] = c10d.all_gather_object
    _ORIGINAL["_new_process_group_helper"] = c10d._new_process_group_helper
    replacements.update(batch_isend_irecv=_batch_isend_irecv,
                        _new_process_group_helper=_new_process_group_helper,
                        _get_object_coll_device=_object_coll_device,
                        _get_pg_default_device=_pg_default_device)
    originals = {id(getattr(c10d, name)): new for name, new in replacements.items()}
    for name, new in replacements.items():
        setattr(c10d, name, new)
        if hasattr(dist, name):
            setattr(dist, name, new)
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith("megatron"):
            continue
        for attr, value in list(vars(module).items()):
            new = originals.get(id(value))
            if new is not None:
                setattr(module, attr, new)
