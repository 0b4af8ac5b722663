"""Single-process checks of the emulated accelerator, run in a fresh interpreter with
MEGATRON_SPPO_EMULATE_GPU=1 (the layer patches torch for the whole process).

Usage: emulated_checks.py contract | moves | memory BYTES | ipc-send | ipc-recv
Prints RESULT lines with what each check observed; the tests assert on them.
"""

import io
import sys

import torch
from common import report

from megatron_sppo.runtime import enable_cpu_megatron


def attempt(fn):
    try:
        return {"ok": fn()}
    except (RuntimeError, TypeError) as e:
        return {"error": str(e)}


def made_on_host():
    return torch.ones(2)


def contract():
    enable_cpu_megatron()
    report({
        "mixed": attempt(lambda: (torch.ones(2, device="cuda") + made_on_host()).tolist()),
        "device": attempt(lambda: (torch.ones(2, device="cuda")
                                   + torch.ones(2, device="cuda")).tolist()),
        "copied_back": attempt(lambda: (torch.ones(2, device="cuda").cpu()
                                        + torch.ones(2)).tolist()),
        "scalar": attempt(lambda: (torch.ones(2, device="cuda") + torch.tensor(2.0)).tolist()),
        "other_gpu": attempt(lambda: (torch.ones(2, device="cuda:0")
                                      + torch.ones(2, device="cuda:1")).tolist()),
        "numpy": attempt(lambda: torch.ones(2, device="cuda").numpy().tolist()),
        "host_index": attempt(lambda: torch.arange(4.0, device="cuda")[torch.tensor([1, 3])]
                              .tolist()),
        "reads_0dim": attempt(lambda: torch.tensor([torch.ones((), device="cuda")] * 2)
                              .device.type),
        "type": torch.ones(2, device="cuda").type(),
        "is_cuda": torch.ones(2, device="cuda").is_cuda,
        "available": torch.cuda.is_available(),
    })


def moves():
    """Module moves keep megatron's parameter attributes; gradients stay on the device."""
    enable_cpu_megatron()
    layer = torch.nn.Linear(3, 2)
    layer.weight.tensor_model_parallel = True
    layer.cuda()
    x = torch.randn(4, 3, device="cuda", requires_grad=True)
    layer(x).sum().backward()
    host = torch.randn(3, requires_grad=True)
    (host.cuda() * 2).sum().backward()
    seen = {"weight": str(layer.weight.device), "attr": layer.weight.tensor_model_parallel,
            "x_grad": str(x.grad.device), "w_grad": str(layer.weight.grad.device),
            "host_grad": str(host.grad.device)}
    p = layer.weight
    fired = []  # megatron's DDP accumulates gradients through a hook like this one
    accumulator = p.expand_as(p).grad_fn.next_functions[0][0]
    accumulator.register_hook(lambda *grads: fired.append(True))
    p.data = p.data.cpu()  # megatron's optimizer offload
    offloaded = (p.device.type, getattr(p, "tensor_model_parallel", None))
    p.data = p.data.cuda()
    layer(x).sum().backward()
    report({**seen, "offloaded": offloaded, "hook_after_restore": bool(fired),
            "restored": (str(p.device), p.tensor_model_parallel,
                         isinstance(p, torch.nn.Parameter))})


def memory(nbytes: int):
    """Allocate, free, resize and empty the cache; report what torch.cuda says at each."""
    enable_cpu_megatron()
    seen = {"start": torch.cuda.memory_allocated()}
    t = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    seen["allocated"] = torch.cuda.memory_allocated()
    t.untyped_storage().resize_(0)
    seen["resized_to_0"] = torch.cuda.memory_allocated()
    seen["reserved_after_resize"] = torch.cuda.memory_reserved()
    t.untyped_storage().resize_(nbytes)
    del t
    seen["freed"] = torch.cuda.memory_allocated()
    seen["reserved_after_free"] = torch.cuda.memory_reserved()
    torch.cuda.empty_cache()
    seen["reserved_after_empty_cache"] = torch.cuda.memory_reserved()
    hold = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    seen["free_total"] = list(torch.cuda.mem_get_info())
    report(seen)
    sys.stdin.read()  # hold the memory until the test closes stdin
    del hold


def ipc_send():
    """A device tensor, pickled as the trainer pickles SGLang payloads, on stdout."""
    enable_cpu_megatron()
    from megatron_sppo.rollout.sglang_weights import serialize_for_ipc

    tensor = torch.arange(6, dtype=torch.float32, device="cuda").view(2, 3)
    print(serialize_for_ipc({"flattened_tensor": tensor}), flush=True)
    sys.stdin.read()  # keep the tensor alive until the receiver is done (as with CUDA IPC)
    report({"after_receiver_wrote": tensor.tolist()})


def ipc_recv():
    """Unpickle with SGLang's allow-list (the stand-in's copy); write into the tensor."""
    import base64

    enable_cpu_megatron()
    from sglang.launch_server import SafeUnpickler

    data = base64.b64decode(sys.stdin.readline())
    try:
        tensor = SafeUnpickler(io.BytesIO(data)).load()["flattened_tensor"]
    except RuntimeError as e:
        report({"error": str(e)})
        return
    received = {"device": str(tensor.device), "values": tensor.tolist()}
    tensor.fill_(7.0)
    report(received)


if __name__ == "__main__":
    name = sys.argv[1].replace("-", "_")
    globals()[name](*map(int, sys.argv[2:]))
