"""The strict CPU rehearsal of a GPU node: an emulated accelerator (``MEGATRON_SPPO_EMULATE_GPU=1``).

The relaxed layer (:mod:`megatron_sppo.runtime.cpu`) makes "cuda" the host, so a batch never
moved to the device, a host tensor in an NCCL collective, or two ranks of one NCCL group on
one GPU all pass on CPU and crash on the first GPU step. Here host and device are apart:

* Tensors created on "cuda" (``device="cuda"``, ``"cuda:i"``, an index, ``.cuda()``,
  ``.to("cuda")``, ``Module.cuda()``) are :class:`DeviceTensor`: host storage underneath,
  ``cuda:i`` to Python (``.device``, ``.is_cuda``, ``.type()``), ``cpu:i+1`` to the C++ core
  (so the autograd engine never looks for a CUDA driver). Every op on one is checked the way
  CUDA checks it: a host tensor with dimensions (0-dim host tensors pass, as on CUDA) or a
  tensor on another device raises CUDA's RuntimeError, naming the op and the function that
  created the host tensor; ``.numpy()`` needs ``.cpu()`` first.
* ``torch.cuda`` reports the devices (``CUDA_VISIBLE_DEVICES``, else
  ``MEGATRON_SPPO_EMULATE_GPU_COUNT``, default 8), their memory (``memory_allocated`` counts
  this process's live device storages; ``mem_get_info`` subtracts what every process on the
  same emulated GPU holds, ``MEGATRON_SPPO_EMULATE_GPU_MEMORY`` bytes per GPU, default 80 GiB),
  a device RNG per GPU, and no-op streams and events.
* Process groups are emulated by :mod:`megatron_sppo.runtime.emulated_dist`.

Which physical GPU a process uses is ``CUDA_VISIBLE_DEVICES[current device]``; processes
publish their device memory under ``MEGATRON_SPPO_EMULATE_GPU_DIR`` (made by the first
process and inherited by its children), so a server started on a GPU sees the trainer's
memory there, as SGLang's start-up memory check does on a real node.

What it does not emulate: kernels (everything computes on the host, in the host's
precision), CUDA graphs, asynchronous streams (no race is ever visible), Transformer Engine
and FP8, and the NCCL wire protocol (gloo carries the data).
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import sys
import tempfile
import threading
import warnings
import weakref
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from megatron_sppo.runtime.cpu import NoOpEvent, NoOpStream

ENV = "MEGATRON_SPPO_EMULATE_GPU"
ENV_COUNT = "MEGATRON_SPPO_EMULATE_GPU_COUNT"
ENV_MEMORY = "MEGATRON_SPPO_EMULATE_GPU_MEMORY"
ENV_DIR = "MEGATRON_SPPO_EMULATE_GPU_DIR"
ENV_NODE = "MEGATRON_SPPO_EMULATE_NODE"

_HOST = torch.device("cpu")
_PUBLISH_EVERY = 1 << 20  # bytes of change between two memory publications


def requested() -> bool:
    """Whether the environment asks for the emulated accelerator."""
    return os.environ.get(ENV) == "1"


# ---- the emulated devices of this process --------------------------------------------------

class _Devices:
    """Visible devices, the current one, per-device RNG, and memory as PyTorch's caching
    allocator shows it: ``allocated`` is live device storage (creation, release and
    ``resize_`` followed exactly); ``reserved`` keeps freed memory until ``empty_cache()``,
    and only reserved memory is what other processes see as taken."""

    def __init__(self):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None and visible.strip():
            self.physical = [int(v) for v in visible.split(",") if v.strip()]
        else:
            self.physical = list(range(int(os.environ.get(ENV_COUNT, "8"))))
        self.budget = int(float(os.environ.get(ENV_MEMORY, str(80 << 30))))
        self.node = os.environ.get(ENV_NODE) or socket.gethostname()
        self.current = 0
        self.rng = [torch.Generator().manual_seed(0) for _ in self.physical]
        self.live: dict[int, list] = {}  # storage impl address -> [device, bytes, wrappers]
        n = len(self.physical)
        self.allocated, self.reserved, self.peak, self.published = [0] * n, [0] * n, [0] * n, [0] * n
        self.lock = threading.RLock()
        root = os.environ.get(ENV_DIR)
        if not root:  # one directory per session (torchrun's ranks), inherited by children
            root = os.path.join(tempfile.gettempdir(),
                                f"megatron-sppo-emulated-gpus-{os.getuid()}-{os.getsid(0)}")
            os.environ[ENV_DIR] = root
        self.root = Path(root)

    def check(self, index: int) -> int:
        if not 0 <= index < len(self.physical):
            raise RuntimeError(f"CUDA error: invalid device ordinal (device {index} of "
                               f"{len(self.physical)} emulated devices)")
        return index

    def uuid(self, index: int) -> str:
        return f"GPU-emulated-{self.node}-{self.physical[self.check(index)]}"

    # memory ---------------------------------------------------------------------------

    def track(self, tensor: "DeviceTensor") -> None:
        """Count the device tensor's storage (once, however many tensors view it)."""
        storage = tensor.elem.untyped_storage()
        key = storage._cdata
        with self.lock:
            entry = self.live.get(key)
            if entry is None:
                entry = self.live[key] = [tensor.index, storage.nbytes(), 0]
                self._change(tensor.index, entry[1])
            entry[2] += 1
        tensor.__dict__["_emulated_release"] = weakref.finalize(tensor, self._untrack, key)

    def _untrack(self, key: int) -> None:
        with self.lock:
            entry = self.live.get(key)
            if entry is None:
                return
            entry[2] -= 1
            if entry[2] == 0:
                del self.live[key]
                self._change(entry[0], -entry[1])

    def resized(self, storage, nbytes: int) -> None:
        """A tracked storage changed size (megatron frees grad buffers with resize_(0))."""
        with self.lock:
            entry = self.live.get(storage._cdata)
            if entry is not None:
                self._change(entry[0], nbytes - entry[1])
                entry[1] = nbytes

    def _change(self, index: int, nbytes: int) -> None:
        self.allocated[index] += nbytes
        self.peak[index] = max(self.peak[index], self.allocated[index])
        if self.allocated[index] > self.reserved[index]:
            self.reserved[index] = self.allocated[index]
            if self.reserved[index] - self.published[index] >= _PUBLISH_EVERY:
                self.publish(index)

    def empty_cache(self) -> None:
        """Reserved memory back to what is allocated, as seen by other processes too."""
        with self.lock:
            for index in range(len(self.physical)):
                self.reserved[index] = self.allocated[index]
                if self.published[index] != self.reserved[index]:
                    self.publish(index)

    def _file(self, index: int, pid: int | None = None) -> Path:
        return self.root / f"{self.node}-gpu{self.physical[index]}" / str(pid or os.getpid())

    def publish(self, index: int) -> None:
        """Write this process's reserved memory where other processes on the GPU read it."""
        path = self._file(index)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(str(self.reserved[index]))
        os.replace(tmp, path)
        self.published[index] = self.reserved[index]

    def used_by_all(self, index: int) -> int:
        """Device memory reserved on this GPU by every live process (this one exactly)."""
        total = self.reserved[index]
        for path in self._file(index).parent.glob("[0-9]*"):
            pid = int(path.name) if path.name.isdigit() else None
            if pid is None or pid == os.getpid():
                continue
            try:
                os.kill(pid, 0)
                total += int(path.read_text() or 0)
            except (ProcessLookupError, ValueError, FileNotFoundError):
                continue
        return total


_DEVICES: _Devices | None = None


def devices() -> _Devices:
    if _DEVICES is None:
        raise RuntimeError("the emulated accelerator is not enabled in this process")
    return _DEVICES


def enabled() -> bool:
    return _DEVICES is not None


# ---- where host tensors come from (for error messages) ------------------------------------

_SKIP = (os.path.dirname(torch.__file__), os.path.dirname(__file__) + os.sep + "emulated")


def _caller() -> str:
    """The first frame outside torch and this layer: ``file:line in function``."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_SKIP):
        frame = frame.f_back
    if frame is None:
        return "an unknown place"
    code = frame.f_code
    path = code.co_filename
    for root in sys.path:
        if root and path.startswith(root.rstrip(os.sep) + os.sep):
            path = path[len(root.rstrip(os.sep)) + 1:]
            break
    return f"{code.co_name}() at {path}:{frame.f_lineno}"


def _origin(tensor: torch.Tensor) -> str:
    return tensor.__dict__.get("_emulated_origin", "an untracked place")


# ---- the device tensor --------------------------------------------------------------------

def _host_device(index: int) -> torch.device:
    return torch.device("cpu", index + 1)


def _index_of(device) -> int | None:
    """The emulated device index a device argument names, None for the host."""
    if device is None:
        return None
    if isinstance(device, int):
        return devices().check(device)
    device = torch.device(device)
    if device.type == "cuda":
        return devices().check(devices().current if device.index is None else device.index)
    if device.type == "cpu" and device.index:  # a DeviceTensor's C++ device
        return device.index - 1
    if device.type in ("cpu", "meta"):
        return None
    raise RuntimeError(f"emulated GPU: device {device} is not emulated")


class DeviceTensor(torch.Tensor):
    """A tensor on an emulated GPU: ``elem`` holds its data on the host. ``index`` None: a
    device tensor whose data was moved to the host through ``.data`` (megatron's optimizer
    offload): it behaves as a host tensor but keeps its identity, so the autograd hooks
    megatron's DDP registered on it survive, as a CUDA tensor's do when it changes device."""

    elem: torch.Tensor
    index: int | None

    @staticmethod
    def __new__(cls, elem: torch.Tensor, index: int, requires_grad: bool = False):
        if isinstance(elem, DeviceTensor):
            raise TypeError("DeviceTensor wraps host tensors only")
        self = torch.Tensor._make_wrapper_subclass(
            cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(),
            dtype=elem.dtype, layout=elem.layout, device=_host_device(index),
            requires_grad=requires_grad)
        self.elem, self.index = elem, index
        devices().track(self)
        return self

    def __repr__(self, *, tensor_contents=None):
        text = repr(self.elem)
        if self.index is None or not text.endswith(")"):
            return text
        return f"{text[:-1]}, device='cuda:{self.index}')"

    # what Python code asks a CUDA tensor ------------------------------------------------

    @property
    def device(self) -> torch.device:
        return _HOST if self.index is None else torch.device("cuda", self.index)

    @property
    def is_cuda(self) -> bool:
        return self.index is not None

    @property
    def is_cpu(self) -> bool:
        return self.index is None

    def get_device(self) -> int:
        return -1 if self.index is None else self.index

    def type(self, dtype=None, non_blocking=False, **kwargs):
        if self.index is None:
            return self.elem.type(dtype, non_blocking, **kwargs)
        if dtype is None and not kwargs:
            return self.elem.type().replace("torch.", "torch.cuda.", 1)
        if isinstance(dtype, str) and not dtype.startswith("torch.cuda."):
            return self.cpu().type(dtype)
        dtype = dtype.replace("torch.cuda.", "torch.") if isinstance(dtype, str) else dtype
        return _to_device(self.cpu().type(dtype), self.index)

    def numpy(self, *args, **kwargs):
        if self.index is None:
            return self.elem.numpy(*args, **kwargs)
        raise TypeError(f"can't convert cuda:{self.index} device type tensor to numpy. Use "
                        "Tensor.cpu() to copy the tensor to host memory first.")

    def tolist(self):
        return self.elem.tolist()

    def data_ptr(self) -> int:
        return self.elem.data_ptr()

    def untyped_storage(self):
        return self.elem.untyped_storage()

    def pin_memory(self, *args, **kwargs):
        raise RuntimeError("cannot pin 'torch.cuda.FloatTensor' only dense CPU tensors can be "
                           "pinned")

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


def is_device_tensor(x) -> bool:
    """On an emulated GPU now (a parked device tensor is on the host)."""
    return isinstance(x, DeviceTensor) and x.index is not None


def _device_of(x) -> int | None:
    return x.index if isinstance(x, DeviceTensor) else None


# ---- .data and storage resizes across host and device --------------------------------------

_DATA = torch._C.TensorBase.data
_RESIZE = torch.UntypedStorage.resize_


def _get_data(self):
    if isinstance(self, DeviceTensor):
        return self.elem.detach() if self.index is None else DeviceTensor(self.elem.detach(),
                                                                          self.index)
    return _DATA.__get__(self)


def _set_data(self, value):
    """``t.data = v``: v's data under t's identity, also between host and device (megatron's
    optimizer offload does ``p.data = p.data.cpu()`` and back). A device tensor moved to the
    host is parked (see :class:`DeviceTensor`) and its memory released."""
    if not isinstance(self, DeviceTensor) and not isinstance(value, DeviceTensor):
        return _DATA.__set__(self, value)
    if not isinstance(self, DeviceTensor):
        raise RuntimeError("emulated GPU: a host tensor cannot take a device tensor's .data "
                           "in place here; build it on the device, or move it with .to()")
    if is_device_tensor(self):
        self.__dict__["_emulated_release"]()
    if isinstance(value, DeviceTensor):
        with torch._C.DisableTorchFunctionSubclass():
            _DATA.__set__(self, value)
        self.elem, self.index = value.elem, value.index
        if value.index is not None:
            devices().track(self)
        return None
    if value.shape != self.shape or value.dtype != self.dtype:
        raise RuntimeError(f"emulated GPU: .data of a {list(self.shape)} {self.dtype} device "
                           f"tensor set to a {list(value.shape)} {value.dtype} host tensor")
    self.elem, self.index = value.detach(), None
    return None


def _resize(self, size):
    out = _RESIZE(self, size)
    if _DEVICES is not None:
        _DEVICES.resized(self, self.nbytes())
    return out


# ---- dispatch: device checks, host compute, re-wrapping -----------------------------------

_aten = torch.ops.aten
# Ops CUDA runs with any mix of devices (copies), or with host index tensors.
_COPIES = {_aten.copy_.default, _aten._to_copy.default, _aten._copy_from.default,
           _aten._copy_from_and_resize.default}
_HOST_INDICES = {_aten.index.Tensor, _aten.index_put_.default, _aten.index_put.default,
                 _aten._index_put_impl_.default, _aten._unsafe_index.Tensor}
_schemas: dict = {}


def _schema(func):
    """(written-arg positions each output aliases, name of a generator argument or None)."""
    cached = _schemas.get(func)
    if cached is None:
        args = func._schema.arguments
        returns = []
        for ret in func._schema.returns:
            alias = ret.alias_info
            pos = None
            if alias is not None and alias.is_write:
                pos = next((i for i, a in enumerate(args) if a.alias_info is not None
                            and a.alias_info.is_write
                            and set(a.alias_info.before_set) & set(alias.before_set)), None)
            returns.append(pos)
        generator = next((a.name for a in args if a.name == "generator"), None)
        cached = _schemas[func] = (returns, generator, [a.name for a in args])
    return cached


def _mixed_devices(func, index: int, other: str, host: torch.Tensor | None) -> RuntimeError:
    where = ""
    if host is not None:
        shape = list(host.shape)
        where = (f" [emulated GPU: {func} got a host tensor (shape {shape}, {host.dtype}) "
                 f"created by {_origin(host)}; move it to the device first]")
    else:
        where = f" [emulated GPU: {func} mixed two devices]"
    return RuntimeError(f"Expected all tensors to be on the same device, but found at least two "
                        f"devices, cuda:{index} and {other}!{where}")


def _check_devices(func, args, kwargs) -> int | None:
    """The one emulated device the op runs on; raises on a mix CUDA would refuse."""
    found: int | None = None
    host: torch.Tensor | None = None
    skip_nested = func in _HOST_INDICES

    def visit(x, nested: bool):
        nonlocal found, host
        if is_device_tensor(x):
            if found is not None and found != x.index:
                raise _mixed_devices(func, found, f"cuda:{x.index}", None)
            found = x.index
        elif isinstance(x, torch.Tensor):
            if x.dim() > 0 and x.device.type == "cpu" and not (nested and skip_nested):
                host = host if host is not None else x
        elif isinstance(x, (list, tuple)) and not nested:
            for y in x:
                visit(y, True)

    for a in args:
        visit(a, False)
    for a in kwargs.values():
        visit(a, False)
    if found is not None and host is not None and func not in _COPIES:
        raise _mixed_devices(func, found, "cpu", host)
    return found


def _unwrap(x):
    """Device tensors (also inside lists and tuples) as their host data."""
    if isinstance(x, DeviceTensor):
        return x.elem
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(y) for y in x)
    return x


def _wrap(x, index: int):
    if isinstance(x, DeviceTensor) or not isinstance(x, torch.Tensor):
        return x
    return DeviceTensor(x, index)


def _dispatch(func, args, kwargs):
    index = _check_devices(func, args, kwargs)
    if "device" in kwargs:  # the op names its output device (factories, _to_copy, new_*)
        target = _index_of(kwargs["device"])
        kwargs = {**kwargs, "device": _HOST}
        kwargs.pop("pin_memory", None)
    else:
        target = index
    returns, generator, _ = _schema(func)
    if generator is not None and kwargs.get(generator) is None and index is not None:
        kwargs = {**kwargs, generator: devices().rng[index]}
    if func is _aten.copy_.default:  # host <-> device copies keep the destination's kind
        _unwrap(args[0]).copy_(_unwrap(args[1]), *args[2:], **kwargs)
        return args[0]
    out = func(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()})
    if func is _aten._local_scalar_dense.default:
        return out
    # in-place and out= ops return the very tensor they wrote
    if isinstance(out, (list, tuple)):
        return type(out)(args[pos] if pos is not None and pos < len(args) else
                         (o if target is None else _wrap(o, target))
                         for o, pos in zip(out, returns + [None] * len(out)))
    if returns and returns[0] is not None and returns[0] < len(args):
        return args[returns[0]]
    return out if target is None else _wrap(out, target)


# ---- moving tensors and modules -------------------------------------------------------------

class _ToDevice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, index: int):
        return DeviceTensor(x.detach().clone(), index)

    @staticmethod
    def backward(ctx, grad):
        return _to_host(grad), None


class _ToHost(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: "DeviceTensor"):
        ctx.index = x.index
        return x.elem.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        return _to_device(grad, ctx.index)


def _to_device(x: torch.Tensor, index: int) -> torch.Tensor:
    """A copy on emulated device ``index`` (gradients flow back to the source)."""
    if isinstance(x, DeviceTensor):
        if x.index == index:
            return x
        x = _to_host(x)
    if x.requires_grad:
        return _ToDevice.apply(x, index)
    return DeviceTensor(x.detach().clone(), index)


def _to_host(x: torch.Tensor) -> torch.Tensor:
    """A host copy (gradients flow back to the device tensor as device tensors)."""
    if not isinstance(x, DeviceTensor):
        return x
    if x.index is None:  # parked: its data is on the host already
        return x.elem
    if x.requires_grad:
        return _ToHost.apply(x)
    return x.elem.clone()


_TENSOR_TO = torch.Tensor.to


def _tensor_to(self: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``Tensor.to``: device moves here, dtype/layout changes through torch (dispatch keeps a
    device tensor on its device)."""
    copy = kwargs.pop("copy", False)
    device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
    index = _device_of(self)
    if device is None or _index_of(device) == index:  # no move: no device argument to torch
        return _TENSOR_TO(self, dtype=dtype or self.dtype, non_blocking=non_blocking, copy=copy,
                          memory_format=memory_format or torch.preserve_format)
    index = _index_of(device)
    moved = _to_host(self) if index is None else _to_device(self, index)
    return moved if dtype is None or dtype == moved.dtype else _TENSOR_TO(moved, dtype)


def module_to(module: torch.nn.Module, index: int | None) -> torch.nn.Module:
    """Move a module's parameters and buffers to an emulated device (or the host), keeping
    every attribute megatron-core sets on its parameters (``tensor_model_parallel``,
    ``partition_dim``, ...). Shared parameters stay shared."""
    moved: dict[int, torch.Tensor] = {}

    def convert(t, param: bool):
        if t is None:
            return None
        done = moved.get(id(t))
        if done is not None:
            return done
        inner = _to_host(t.detach()) if index is None else _to_device(t.detach(), index)
        if param:
            new = torch.nn.Parameter(inner, requires_grad=t.requires_grad)
            for key, value in t.__dict__.items():
                if key not in ("elem", "index") and not key.startswith("_emulated"):
                    setattr(new, key, value)
        else:
            new = inner
        moved[id(t)] = new
        return new

    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and _device_of(p) != index:
                m._parameters[name] = convert(p, True)
        for name, b in list(m._buffers.items()):
            if b is not None and _device_of(b) != index:
                m._buffers[name] = convert(b, False)
    return module


def _module_cuda(self, device=None):
    return module_to(self, _index_of(device if device is not None else "cuda"))


def _module_cpu(self):
    return module_to(self, None)


_module_to_original = torch.nn.Module.to


def _module_to(self, *args, **kwargs):
    device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
    if dtype is not None:
        self = _module_to_original(self, dtype=dtype)
    if device is None:
        return self
    return module_to(self, _index_of(device))


# ---- the function mode: factories on "cuda", host-tensor origins --------------------------

_FROM_DATA = ("tensor", "as_tensor", "asarray")


def _create(func, args, kwargs):
    """Call a function that takes ``device=``: on the host, then onto the emulated device
    it names (``requires_grad`` applies to the device tensor)."""
    device = kwargs.get("device")
    if getattr(func, "__name__", "") in _FROM_DATA and args:
        if device is None and isinstance(args[0], DeviceTensor):  # a copy stays on its device
            device = args[0].device
        args = (_unwrap(args[0]), *args[1:])  # CUDA reads 0-dim device values back
    index = _index_of(device)
    if index is None:
        return func(*args, **kwargs)
    kwargs = {**kwargs, "device": _HOST}
    kwargs.pop("pin_memory", None)
    grad = kwargs.pop("requires_grad", False)
    out = func(*args, **kwargs)
    return DeviceTensor(out.detach() if grad else out, index, requires_grad=grad)


# Patched on the torch module itself, not only through the function mode: Python modes are
# not active inside autograd's backward, where megatron-core also creates tensors on
# ``grad.device``.
_FACTORIES = ("empty", "zeros", "ones", "full", "arange", "range", "tensor", "as_tensor",
              "asarray", "rand", "randn", "randint", "randperm", "linspace", "logspace", "eye",
              "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like",
              "randint_like", "empty_strided", "scalar_tensor", "tril_indices", "triu_indices",
              "frombuffer")


def _factory(func):
    @functools.wraps(func)
    def create(*args, **kwargs):
        return _create(func, args, kwargs)

    return create


def _new_like(func):
    """``Tensor.new_*``: on self's device unless ``device=`` names another."""
    @functools.wraps(func)
    def create(self, *args, **kwargs):
        if "device" not in kwargs and isinstance(self, DeviceTensor):
            return func(self, *args, **kwargs)  # dispatch keeps it on self's device
        if "device" not in kwargs:
            return func(self, *args, **kwargs)
        host = self.elem if isinstance(self, DeviceTensor) else self
        return _create(functools.partial(func, host), args, kwargs)

    return create


def _tensor_cuda(self, device=None, non_blocking=False, **kwargs):
    return _to_device(self, _index_of(device if device is not None else "cuda"))


def _tensor_cpu(self, *args, **kwargs):
    return _to_host(self)


def _patch_factories() -> None:
    # torch's device context managers (``with torch.device("meta")``, which transformers
    # builds models under) recognise factories by identity: cache the originals first
    from torch.utils._device import _device_constructors

    _device_constructors()
    for name in _FACTORIES:
        setattr(torch, name, _factory(getattr(torch, name)))
    for name in ("new_empty", "new_zeros", "new_ones", "new_full", "new_tensor"):
        setattr(torch.Tensor, name, _new_like(getattr(torch.Tensor, name)))
    torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu = _tensor_to, _tensor_cuda, _tensor_cpu


_NOT_FACTORIES = {torch._C._nn._parse_to}


class _EmulationMode(TorchFunctionMode):
    """Any other function given ``device=`` creates on the emulated device it names; host
    tensors remember the function that created them (for the errors above)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        factory = (kwargs.get("device") is not None and func not in _NOT_FACTORIES
                   and not any(isinstance(a, torch.Tensor) for a in args))
        out = _create(func, args, kwargs) if factory else func(*args, **kwargs)
        if (isinstance(out, torch.Tensor) and not isinstance(out, DeviceTensor)
                and "_emulated_origin" not in out.__dict__):
            source = next((a for a in args if isinstance(a, torch.Tensor)
                           and "_emulated_origin" in a.__dict__), None)
            try:
                out._emulated_origin = (source._emulated_origin if source is not None
                                        else _caller())
            except (AttributeError, RuntimeError):  # e.g. a tensor without a __dict__
                pass
        return out


# ---- torch.cuda ---------------------------------------------------------------------------

class _Props:
    def __init__(self, index: int):
        d = devices()
        self.name = "Emulated GPU (MEGATRON_SPPO_EMULATE_GPU)"
        self.total_memory = d.budget
        self.major, self.minor = 9, 0
        self.multi_processor_count = 132
        self.uuid = d.uuid(index)
        self.index = index


class _Stream(NoOpStream):
    """``torch.cuda.Stream`` on the current emulated device (work is synchronous here)."""

    def __init__(self, *args, **kwargs):
        self.device = torch.device("cuda", devices().current)


class _DeviceContext:
    """``torch.cuda.device(i)``: the current device inside the block."""

    def __init__(self, device):
        self.index = _index_of(device) if device is not None else None

    def __enter__(self):
        self.prev = devices().current
        if self.index is not None:
            devices().current = self.index

    def __exit__(self, *exc):
        devices().current = self.prev
        return False


def _device_arg(device) -> int:
    return devices().current if device is None else _index_of(device)


def _set_device(device) -> None:
    devices().current = devices().check(_index_of(device) if not isinstance(device, int)
                                        else device)


def _mem_get_info(device=None) -> tuple[int, int]:
    d, index = devices(), _device_arg(device)
    return max(d.budget - d.used_by_all(index), 0), d.budget


def _patch_cuda() -> None:
    cuda, d = torch.cuda, devices()
    cuda.is_available = lambda: True
    cuda.is_initialized = lambda: True
    cuda.init = lambda: None
    cuda._lazy_init = lambda: None
    cuda.device_count = lambda: len(d.physical)
    cuda.current_device = lambda: d.current
    cuda.set_device = _set_device
    cuda.device = _DeviceContext
    cuda.get_device_properties = lambda device=None: _Props(_device_arg(device))
    cuda.get_device_name = lambda device=None: _Props(_device_arg(device)).name
    cuda.get_device_capability = lambda device=None: (9, 0)
    cuda.synchronize = lambda device=None: None
    cuda.empty_cache = d.empty_cache
    cuda.ipc_collect = lambda: None
    cuda.Stream = cuda.ExternalStream = _Stream
    cuda.Event = NoOpEvent
    cuda.current_stream = cuda.default_stream = lambda device=None: _Stream()
    cuda.stream = lambda stream=None: contextlib.nullcontext(stream)
    cuda.set_stream = lambda stream: None
    cuda.is_current_stream_capturing = lambda: False
    cuda.memory_allocated = lambda device=None: d.allocated[_device_arg(device)]
    cuda.max_memory_allocated = lambda device=None: d.peak[_device_arg(device)]
    cuda.memory_reserved = lambda device=None: d.reserved[_device_arg(device)]
    cuda.max_memory_reserved = cuda.max_memory_allocated
    cuda.mem_get_info = _mem_get_info

    def reset_peak(device=None):
        i = _device_arg(device)
        d.peak[i] = d.allocated[i]

    cuda.reset_peak_memory_stats = cuda.reset_max_memory_allocated = reset_peak
    cuda.memory_stats = lambda device=None: {
        "allocated_bytes.all.current": d.allocated[_device_arg(device)],
        "allocated_bytes.all.peak": d.peak[_device_arg(device)],
        "reserved_bytes.all.current": d.reserved[_device_arg(device)]}
    cuda.get_rng_state = lambda device="cuda": d.rng[_device_arg(device)].get_state()
    cuda.set_rng_state = lambda new_state, device="cuda": d.rng[_device_arg(device)].set_state(
        new_state)
    cuda.get_rng_state_all = lambda: [g.get_state() for g in d.rng]
    cuda.set_rng_state_all = lambda states: [g.set_state(s) for g, s in zip(d.rng, states)]
    cuda.manual_seed = lambda seed: d.rng[d.current].manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: [g.manual_seed(int(seed)) for g in d.rng]
    cuda.initial_seed = lambda: d.rng[d.current].initial_seed()
    for name in ("get_rng_state", "set_rng_state", "manual_seed", "manual_seed_all",
                 "get_rng_state_all", "set_rng_state_all", "initial_seed"):
        setattr(cuda.random, name, getattr(cuda, name))
    cuda.nvtx.range_push = lambda msg: 0
    cuda.nvtx.range_pop = lambda: 0
    cuda.nvtx.range = lambda msg, *a, **k: contextlib.nullcontext()
    acc = torch.accelerator  # torch's device-generic API, used by torch.optim
    acc.current_device_index = acc.current_device_idx = lambda: d.current
    acc.set_device_index = acc.set_device_idx = _set_device
    acc.current_stream = lambda device=None: _Stream()
    acc.synchronize = lambda device=None: None
    torch.Tensor.data = property(_get_data, _set_data)
    torch.UntypedStorage.resize_ = _resize
    torch.nn.Module.cuda = _module_cuda
    torch.nn.Module.cpu = _module_cpu
    torch.nn.Module.to = _module_to


def _patch_megatron_rng() -> None:
    try:
        from megatron.core.tensor_parallel import random as mcore_random
    except ImportError:
        return
    mcore_random._set_cuda_rng_state = (
        lambda new_state, device=-1, graph_safe=False: torch.cuda.set_rng_state(new_state))


def enable() -> None:
    """Install the emulated accelerator (idempotent). Main thread; before megatron-core is
    imported where possible (module aliases taken at import are re-pointed anyway)."""
    global _DEVICES
    if _DEVICES is not None:
        return
    _DEVICES = _Devices()
    # expected: megatron-core falls back to its pure-PyTorch multi-tensor kernels
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    warnings.filterwarnings("ignore", message="Apex is not installed")
    _patch_cuda()
    _patch_factories()
    from megatron_sppo.runtime import emulated_dist, emulated_ipc

    emulated_dist.install()
    emulated_ipc.install()
    _patch_megatron_rng()
    _EmulationMode().__enter__()  # global for the main thread; never exited
