"""FP8 training settings -> megatron-core TransformerConfig keywords, checked against the GPU.

megatron-core 0.19 runs FP8 through Transformer Engine: ``TransformerConfig.fp8`` (format
``e4m3`` or ``hybrid``: e4m3 forward, e5m2 gradients), ``fp8_recipe`` (``delayed``,
``tensorwise``, ``blockwise``, ``mxfp8``), ``fp8_amax_history_len`` and
``fp8_amax_compute_algo`` (delayed scaling only), and ``first_last_layers_bf16`` with
``num_layers_at_start_in_bf16`` / ``num_layers_at_end_in_bf16`` (not with delayed scaling;
at most num_layers / pp each; both checked by TransformerConfig itself, repeated here so the
user gets a config-key error before any model is built).

What each recipe needs, from Transformer Engine's own checks (``transformer_engine/pytorch/
quantization.py``: ``_compute_fp8_support``, ``_compute_fp8_block_scaling_support``,
``_compute_mxfp8_support``) and megatron-core's recipe selection (``fp8_utils.get_fp8_recipe``):

* delayed, tensorwise: compute capability >= 9.0 (Hopper), or 8.9 (Ada) with CUDA >= 12.1;
  tensorwise needs TE >= 2.2.
* blockwise: capability >= 9.0 and CUDA >= 12.9; TE >= 2.3.
* mxfp8: capability 10.x or 11.x (Blackwell; TE does not support 12.x yet); TE >= 2.1.

Token alignment: FP8 GEMMs need the token dimension in multiples of 16, 32 for MXFP8
(megatron-core ``fp8_utils.get_fp8_align_size``, TE ``get_align_size_for_quantization``).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import math

from packaging.version import Version

from megatron_sppo.errors import UserError

FORMATS = ("e4m3", "hybrid")
RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
AMAX_ALGOS = ("most_recent", "max")
_MIN_TE = {"tensorwise": "2.2.0.dev0", "blockwise": "2.3.0.dev0", "mxfp8": "2.1.0"}


@dataclasses.dataclass(frozen=True)
class FP8Settings:
    """FP8 training of one model. ``format`` None trains in bf16 and ignores the rest.
    The amax history (TE's delayed-scaling default: 1024 steps, max) applies to delayed
    scaling only; the other recipes compute scales from the current tensor."""

    format: str | None = None
    recipe: str = "delayed"
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"
    first_last_layers_bf16: bool = False
    num_layers_at_start_in_bf16: int = 1
    num_layers_at_end_in_bf16: int = 1

    def check(self, num_layers: int | None = None, pipeline_parallel_size: int = 1,
              prefix: str = "fp8") -> None:
        """Choices, and the bf16 layer counts when ``num_layers`` is known (no GPU needed)."""
        if self.format is None:
            return
        for key, value, options in (("format", self.format, FORMATS),
                                    ("recipe", self.recipe, RECIPES),
                                    ("amax_compute_algo", self.amax_compute_algo, AMAX_ALGOS)):
            if value not in options:
                raise UserError(f"config key {prefix}.{key}={value!r}: choose one of "
                                f"{', '.join(options)}")
        if self.amax_history_len < 1:
            raise UserError(f"config key {prefix}.amax_history_len must be >= 1")
        if not self.first_last_layers_bf16:
            return
        if self.recipe == "delayed":
            raise UserError(f"config key {prefix}.first_last_layers_bf16=true does not work with "
                            f"delayed scaling (megatron-core refuses it): set {prefix}.recipe to "
                            "tensorwise, blockwise or mxfp8")
        if num_layers is None:
            return
        per_stage = num_layers // pipeline_parallel_size
        for key in ("num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"):
            value = getattr(self, key)
            if not 0 <= value <= per_stage:
                raise UserError(f"config key {prefix}.{key}={value} must be between 0 and the "
                                f"{per_stage} layers of a pipeline stage")

    def transformer_config_kwargs(self, num_layers: int, pipeline_parallel_size: int = 1,
                                  prefix: str = "fp8") -> dict:
        """The TransformerConfig fields for these settings (``{}`` when FP8 is off)."""
        self.check(num_layers, pipeline_parallel_size, prefix)
        if self.format is None:
            return {}
        kwargs = {"fp8": self.format, "fp8_recipe": self.recipe,
                  "fp8_amax_history_len": self.amax_history_len,
                  "fp8_amax_compute_algo": self.amax_compute_algo,
                  "first_last_layers_bf16": self.first_last_layers_bf16}
        if self.first_last_layers_bf16:
            kwargs["num_layers_at_start_in_bf16"] = self.num_layers_at_start_in_bf16
            kwargs["num_layers_at_end_in_bf16"] = self.num_layers_at_end_in_bf16
        return kwargs


@dataclasses.dataclass(frozen=True)
class GPUEnvironment:
    """What FP8 support depends on. ``capability`` None: no CUDA GPU; ``te_version`` None
    with ``te_installed``: a Transformer Engine build without package metadata."""

    capability: tuple[int, int] | None
    cuda_version: str | None
    te_installed: bool
    te_version: str | None = None


def detect_environment() -> GPUEnvironment:
    """This process's GPU 0, CUDA runtime and installed Transformer Engine (no TE import)."""
    import torch

    capability = torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None
    te_installed = importlib.util.find_spec("transformer_engine") is not None
    te_version = None
    if te_installed:
        try:
            te_version = importlib.metadata.version("transformer_engine")
        except importlib.metadata.PackageNotFoundError:
            pass
    return GPUEnvironment(capability, torch.version.cuda, te_installed, te_version)


def check_fp8_support(settings: FP8Settings, env: GPUEnvironment, prefix: str = "fp8") -> None:
    """Refuse a recipe the GPU, CUDA or Transformer Engine found cannot run, in one line."""
    if settings.format is None:
        return
    recipe = settings.recipe
    if not env.te_installed:
        raise UserError(f"{prefix}.format={settings.format} needs Transformer Engine, which is "
                        "not installed: run in the NGC PyTorch container (or pip install "
                        f"transformer-engine[pytorch]), or unset {prefix}.format")
    if env.capability is None:
        raise UserError(f"{prefix}.format={settings.format} needs a CUDA GPU and none was found")
    cc = env.capability
    cuda = Version(env.cuda_version) if env.cuda_version else None
    name = f"compute capability {cc[0]}.{cc[1]}"
    if recipe == "mxfp8" and not (10, 0) <= cc < (12, 0):
        raise UserError(f"{prefix}.recipe=mxfp8 needs a Blackwell GPU (compute capability 10.x/"
                        f"11.x), this one has {name}: use recipe tensorwise or blockwise on "
                        "Hopper")
    if recipe == "blockwise" and (cc < (9, 0) or (cuda is not None and cuda < Version("12.9"))):
        raise UserError(f"{prefix}.recipe=blockwise needs compute capability >= 9.0 and CUDA >= "
                        f"12.9, found {name}, CUDA {env.cuda_version}: use delayed or tensorwise")
    if recipe in ("delayed", "tensorwise"):
        ada_ok = cc == (8, 9) and (cuda is None or cuda >= Version("12.1"))
        if cc < (9, 0) and not ada_ok:
            raise UserError(f"{prefix}.recipe={recipe} needs compute capability >= 9.0 (Hopper; "
                            f"8.9 with CUDA >= 12.1), this GPU has {name}: train in bf16 "
                            f"(unset {prefix}.format)")
    minimum = _MIN_TE.get(recipe)
    if minimum and env.te_version and Version(env.te_version) < Version(minimum):
        raise UserError(f"{prefix}.recipe={recipe} needs Transformer Engine >= "
                        f"{minimum.removesuffix('.dev0')}, found {env.te_version}: use a newer "
                        "NGC container or recipe delayed")


def check_fp8_runtime(models: dict[str, FP8Settings]) -> None:
    """``{config prefix: settings}`` of the models to be trained: refuse, before anything is
    built, an FP8 recipe this machine cannot run."""
    wanted = {prefix: s for prefix, s in models.items() if s.format}
    if wanted:
        env = detect_environment()
        for prefix, settings in wanted.items():
            check_fp8_support(settings, env, f"{prefix}.fp8")


def fp8_align_size(recipe: str) -> int:
    """Token multiple FP8 GEMMs need: 32 for MXFP8 (32-element scaling blocks), else 16."""
    if recipe not in RECIPES:
        raise UserError(f"unknown FP8 recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    return 32 if recipe == "mxfp8" else 16


def sequence_multiple(recipe: str | None, tp: int = 1, sequence_parallel: bool = False,
                      cp: int = 1) -> int:
    """What every (packed) sequence length must be a multiple of: the FP8 alignment (if
    ``recipe``), the TP size under sequence parallelism (the sequence is split over TP ranks),
    and 2 * cp under context parallelism (each rank takes two load-balanced chunks)."""
    multiple = fp8_align_size(recipe) if recipe else 1
    if sequence_parallel:
        multiple = math.lcm(multiple, tp)
    if cp > 1:
        multiple = math.lcm(multiple, 2 * cp)
    return multiple


def pad_packed_lengths(lengths: list[int], multiple: int) -> tuple[list[int], list[int]]:
    """Padded lengths of the sequences of a pack and their cumulative offsets (THD
    ``cu_seqlens_padded``, starting at 0): each sequence rounded up to ``multiple``, so
    the pack's total is a multiple too. Real lengths stay the ``cu_seqlens``."""
    if multiple < 1 or any(n < 0 for n in lengths):
        raise ValueError(f"bad lengths {lengths} or multiple {multiple}")
    padded = [-(-n // multiple) * multiple for n in lengths]
    offsets = [0]
    for n in padded:
        offsets.append(offsets[-1] + n)
    return padded, offsets
