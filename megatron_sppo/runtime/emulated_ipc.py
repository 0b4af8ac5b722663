"""CUDA IPC between processes on one emulated GPU node.

A CUDA tensor pickled with ``torch.multiprocessing`` (``ForkingPickler``) travels as an IPC
handle: ``reductions.reduce_tensor`` returns ``(rebuild_cuda_tensor, (tensor_cls, size,
stride, offset, storage_cls, dtype, storage_device, storage_handle, ...))`` and the
receiver maps the sender's memory (torch 2.14 ``torch/multiprocessing/reductions.py``).
SGLang sends the device's UUID in place of ``storage_device`` (its ``patch_torch.py``) and
maps it back to a local index when it rebuilds, because indices differ between processes
with different ``CUDA_VISIBLE_DEVICES``.

Here the same argument list carries a shared-memory file of the device tensor's host
storage (torch's ``file_system`` strategy) and the emulated GPU's UUID, so payloads pass
SGLang's unpickler allow-list unchanged. The receiver gets a device tensor that shares the
sender's memory, on its own index of that GPU; a handle opened on another GPU or node
fails, as CUDA IPC does. The sender must keep the tensor alive until the receiver is done,
as with CUDA IPC.
"""

from __future__ import annotations

import torch
from torch.multiprocessing import reductions

from megatron_sppo.runtime import emulated

_TAG = "megatron-sppo-emulated-cuda-ipc"
_ORIGINAL = {}


def reduce_device_tensor(tensor: "emulated.DeviceTensor"):
    """``reduce_tensor`` for a device tensor: torch's CUDA argument list, emulated handle."""
    if tensor.requires_grad and not tensor.is_leaf:
        raise RuntimeError("Cowardly refusing to serialize non-leaf tensor which requires_grad, "
                           "since autograd does not support crossing process boundaries.")
    elem = tensor.elem
    storage = elem.untyped_storage()
    manager, filename, size = storage._share_filename_cpu_()
    handle = (_TAG, manager, filename, emulated.devices().uuid(tensor.index))
    return (reductions.rebuild_cuda_tensor,
            (torch.Tensor, tuple(elem.size()), elem.stride(), elem.storage_offset(),
             torch.storage.UntypedStorage, elem.dtype, tensor.index, handle, size, 0,
             tensor.requires_grad, None, 0, None, False))


def _local_index(storage_device, uuid: str) -> int:
    """The receiver's index of the GPU the handle was made on; IPC across GPUs fails."""
    d = emulated.devices()
    visible = [d.uuid(i) for i in range(len(d.physical))]
    if isinstance(storage_device, str):  # SGLang's UUID patch
        if storage_device not in visible:
            raise RuntimeError(f"CUDA IPC: GPU {storage_device} is not visible in this process "
                               f"(visible: {', '.join(visible)})")
        return visible.index(storage_device)
    index = d.check(int(storage_device))
    if visible[index] != uuid:
        raise RuntimeError(f"CUDA error: invalid device context [emulated GPU: an IPC handle "
                           f"of {uuid} opened as cuda:{index} = {visible[index]}; send the "
                           "device UUID, as SGLang's patched reductions do]")
    return index


def rebuild_cuda_tensor(tensor_cls, tensor_size, tensor_stride, tensor_offset, storage_cls,
                        dtype, storage_device, storage_handle, storage_size_bytes,
                        storage_offset_bytes, requires_grad, *rest):
    """torch's ``rebuild_cuda_tensor`` for emulated handles (real ones go to torch's)."""
    if not (isinstance(storage_handle, tuple) and storage_handle[:1] == (_TAG,)):
        return _ORIGINAL["rebuild_cuda_tensor"](
            tensor_cls, tensor_size, tensor_stride, tensor_offset, storage_cls, dtype,
            storage_device, storage_handle, storage_size_bytes, storage_offset_bytes,
            requires_grad, *rest)
    _, manager, filename, uuid = storage_handle
    index = _local_index(storage_device, uuid)
    storage = torch.UntypedStorage._new_shared_filename_cpu(manager, filename,
                                                            storage_size_bytes)
    host = torch.empty(0, dtype=dtype).set_(storage, tensor_offset, tensor_size, tensor_stride)
    return emulated.DeviceTensor(host, index, requires_grad=requires_grad)


def install() -> None:
    """Register the reduction and the rebuild (idempotent)."""
    if _ORIGINAL:
        return
    from multiprocessing.reduction import ForkingPickler

    _ORIGINAL["rebuild_cuda_tensor"] = reductions.rebuild_cuda_tensor
    _ORIGINAL["reduce_tensor"] = reductions.reduce_tensor

    def reduce_tensor(tensor):
        if emulated.is_device_tensor(tensor):
            return reduce_device_tensor(tensor)
        return _ORIGINAL["reduce_tensor"](tensor)

    reductions.reduce_tensor = reduce_tensor
    # pickled by name as torch's own function, so receivers' allow-lists accept it; its
    # signature is torch's (inspect follows __wrapped__), what a stack check compares
    rebuild_cuda_tensor.__module__ = reductions.__name__
    rebuild_cuda_tensor.__wrapped__ = _ORIGINAL["rebuild_cuda_tensor"]
    reductions.rebuild_cuda_tensor = rebuild_cuda_tensor
    ForkingPickler.register(emulated.DeviceTensor, reduce_device_tensor)
