"""Streaming reads and writes of Hugging Face safetensors checkpoints.

Reading opens every shard lazily (memory-mapped) and loads one tensor at a time; writing
buffers tensors up to ``max_shard_bytes`` and flushes a shard, so converting a model of S
bytes never holds much more than S (plus one shard) in host memory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megatron_sppo.errors import UserError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_SHARD_BYTES = 5 * 1024**3


class HFCheckpointReader:
    """Tensors of an HF checkpoint directory by name, with the files validated up front.

    Each read opens its shard, copies one tensor out and closes the shard again: a handle
    kept open would keep every page it touched mapped, which counts towards the process's
    memory (for a 1B model, doubling the converter's peak RSS).
    """

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / INDEX_NAME
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (self.dir / SINGLE_NAME).is_file():
            files = [SINGLE_NAME]
        else:
            raise UserError(f"no {SINGLE_NAME} or {INDEX_NAME} in {self.dir}: convert .bin "
                            "checkpoints to safetensors first (save_pretrained(safe_serialization=True))")
        missing = [f for f in files if not (self.dir / f).is_file()]
        if missing:
            raise UserError(f"missing safetensors shard {missing[0]} in {self.dir} "
                            f"({len(missing)} of {len(files)} missing): re-download the checkpoint")
        self.weight_map: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for filename in files:
            with self._open(filename) as handle:
                for name in handle.keys():
                    self.weight_map[name] = filename
                    self._shapes[name] = tuple(handle.get_slice(name).get_shape())

    def _open(self, filename: str):
        path = self.dir / filename
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as e:
            raise UserError(f"cannot read {path} ({e}): the shard is truncated or corrupt, "
                            "re-download it")

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise UserError(f"tensor {name} missing from {self.dir}: the checkpoint does not "
                            "match its config.json")
        with self._open(self.weight_map[name]) as handle:
            try:
                return handle.get_tensor(name)
            except SafetensorError as e:
                raise UserError(f"cannot read {name} from {self.weight_map[name]} ({e}): "
                                "the shard is truncated or corrupt, re-download it")

    def check_shapes(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Every tensor config.json implies exists with that shape (before any heavy work)."""
        for name, shape in expected.items():
            if name not in self.weight_map:
                raise UserError(f"tensor {name} is missing from {self.dir} although config.json "
                                "implies it: the weights do not match the config")
            found = self.shape(name)
            if found != tuple(shape):
                raise UserError(f"config/weight shape mismatch: {name} is {list(found)} in the "
                                f"safetensors but config.json implies {list(shape)}: fix config.json")


class HFShardWriter:
    """Write tensors into ``model-XXXXX-of-YYYYY.safetensors`` shards plus the index."""

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor.contiguous()
        self._buffer_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        path = self.dir / f"shard-{len(self._shards)}.tmp"
        save_file(self._buffer, str(path), metadata={"format": "pt"})
        os.chmod(path, 0o644)  # safetensors creates 0600 files; served models need 0644
        self._shards.append(list(self._buffer))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> list[str]:
        """Flush, name the shards by their final count, write the index; returns file names."""
        if self._buffer or not self._shards:
            self._flush()
        count = len(self._shards)
        if count == 1:
            os.replace(self.dir / "shard-0.tmp", self.dir / SINGLE_NAME)
            return [SINGLE_NAME]
        names, weight_map = [], {}
        for i, tensors in enumerate(self._shards):
            name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.dir / f"shard-{i}.tmp", self.dir / name)
            names.append(name)
            weight_map.update({t: name for t in tensors})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return names


def copy_non_weight_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy config.json, tokenizer and generation files unchanged (bytes, not re-serialised:
    transformers 5 would drop 4.x keys such as rope_theta)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in sorted(src.iterdir()):
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and path.name != INDEX_NAME:
            shutil.copy2(path, dst / path.name)
            copied.append(path.name)
    return copied
