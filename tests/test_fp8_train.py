"""FP8 training settings: the TransformerConfig keywords (accepted by megatron-core's own
TransformerConfig on CPU), the per-recipe GPU/CUDA/Transformer Engine checks with given
capabilities, and the FP8 token-alignment padding (against megatron-core's numbers)."""

from __future__ import annotations

import warnings

import pytest
import torch

from megatron_sppo.errors import UserError
from megatron_sppo.quant.fp8_train import (RECIPES, FP8Settings, GPUEnvironment,
                                           check_fp8_support, detect_environment, fp8_align_size,
                                           pad_packed_lengths, sequence_multiple)

H100 = GPUEnvironment((9, 0), "12.9", True, "2.8.0")
B200 = GPUEnvironment((10, 0), "12.9", True, "2.8.0")


def test_off_means_no_keywords_and_no_checks():
    off = FP8Settings(recipe="nonsense")
    assert off.transformer_config_kwargs(num_layers=4) == {}
    check_fp8_support(off, GPUEnvironment(None, None, False))


def test_keywords_are_accepted_by_megatron_core():
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = dict(num_layers=4, hidden_size=64, num_attention_heads=4,
                pipeline_model_parallel_size=2, pipeline_dtype=torch.bfloat16)
    cases = [FP8Settings(format="hybrid"),
             FP8Settings(format="e4m3", recipe="tensorwise", amax_history_len=16,
                         amax_compute_algo="most_recent"),
             FP8Settings(format="hybrid", recipe="blockwise", first_last_layers_bf16=True,
                         num_layers_at_start_in_bf16=2, num_layers_at_end_in_bf16=0),
             FP8Settings(format="e4m3", recipe="mxfp8", first_last_layers_bf16=True)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for settings in cases:
            kwargs = settings.transformer_config_kwargs(num_layers=4, pipeline_parallel_size=2)
            config = TransformerConfig(**base, **kwargs)
            for key, value in kwargs.items():
                assert getattr(config, key) == value
        # the combination we refuse up front is one megatron-core refuses too
        with pytest.raises(ValueError, match="Delayed scaling does not support"):
            TransformerConfig(**base, fp8="e4m3", fp8_recipe="delayed",
                              first_last_layers_bf16=True)


@pytest.mark.parametrize("settings,message", [
    (FP8Settings(format="e5m2"), "policy.fp8.format='e5m2'"),
    (FP8Settings(format="e4m3", recipe="nvfp4"), "policy.fp8.recipe='nvfp4'"),
    (FP8Settings(format="e4m3", amax_compute_algo="mean"), "amax_compute_algo"),
    (FP8Settings(format="e4m3", amax_history_len=0), "amax_history_len must be >= 1"),
    (FP8Settings(format="e4m3", first_last_layers_bf16=True), "does not work with delayed"),
    (FP8Settings(format="e4m3", recipe="tensorwise", first_last_layers_bf16=True,
                 num_layers_at_end_in_bf16=3), "between 0 and the 2 layers of a pipeline stage"),
])
def test_config_errors_name_the_key(settings, message):
    with pytest.raises(UserError, match=message) as err:
        settings.transformer_config_kwargs(num_layers=4, pipeline_parallel_size=2,
                                           prefix="policy.fp8")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("recipe,env", [
    ("delayed", H100), ("tensorwise", H100), ("blockwise", H100),
    ("delayed", GPUEnvironment((8, 9), "12.4", True, "2.8.0")),  # Ada, as TE allows
    ("delayed", B200), ("blockwise", B200), ("mxfp8", B200),
    ("mxfp8", GPUEnvironment((10, 3), None, True, None)),  # version unknown: not refused
])
def test_supported_recipes(recipe, env):
    check_fp8_support(FP8Settings(format="hybrid", recipe=recipe), env)


@pytest.mark.parametrize("recipe,env,message", [
    ("delayed", GPUEnvironment((9, 0), "12.9", False), "needs Transformer Engine"),
    ("delayed", GPUEnvironment(None, None, True, "2.8.0"), "needs a CUDA GPU"),
    ("delayed", GPUEnvironment((8, 0), "12.9", True, "2.8.0"), "compute capability >= 9.0"),
    ("tensorwise", GPUEnvironment((8, 9), "12.0", True, "2.8.0"), "compute capability >= 9.0"),
    ("blockwise", GPUEnvironment((8, 9), "12.9", True, "2.8.0"), "blockwise needs compute"),
    ("blockwise", GPUEnvironment((9, 0), "12.4", True, "2.8.0"), "CUDA >= 12.9"),
    ("mxfp8", H100, "needs a Blackwell GPU"),
    ("mxfp8", GPUEnvironment((12, 0), "12.9", True, "2.8.0"), "needs a Blackwell GPU"),
    ("tensorwise", GPUEnvironment((9, 0), "12.9", True, "2.1.0"), "Transformer Engine >= 2.2.0"),
    ("blockwise", GPUEnvironment((9, 0), "12.9", True, "2.3.0.dev0+abc"), None),
    ("blockwise", GPUEnvironment((9, 0), "12.9", True, "2.2.1"), "Transformer Engine >= 2.3.0"),
])
def test_unsupported_recipes_are_refused(recipe, env, message):
    settings = FP8Settings(format="e4m3", recipe=recipe)
    if message is None:
        check_fp8_support(settings, env)
        return
    with pytest.raises(UserError, match=message) as err:
        check_fp8_support(settings, env)
    assert "\n" not in str(err.value)


def test_detect_environment_on_this_machine():
    env = detect_environment()
    if not torch.cuda.is_available():
        assert env.capability is None
        with pytest.raises(UserError):
            check_fp8_support(FP8Settings(format="e4m3"), env)


def test_align_sizes_match_megatron_core():
    from megatron.core.enums import Fp8Recipe
    from megatron.core.fp8_utils import get_fp8_align_size

    for recipe in RECIPES:
        assert fp8_align_size(recipe) == get_fp8_align_size(Fp8Recipe(recipe))
    assert fp8_align_size("mxfp8") == 32 and fp8_align_size("delayed") == 16


def test_sequence_multiple():
    assert sequence_multiple(None) == 1
    assert sequence_multiple("tensorwise") == 16
    assert sequence_multiple("mxfp8", tp=8, sequence_parallel=True) == 32
    assert sequence_multiple("delayed", tp=3, sequence_parallel=True) == 48
    assert sequence_multiple("delayed", tp=4, sequence_parallel=False, cp=2) == 16
    assert sequence_multiple(None, tp=2, sequence_parallel=True, cp=3) == 6
    assert sequence_multiple("delayed", cp=16) == 32


def test_pad_packed_lengths():
    padded, offsets = pad_packed_lengths([1, 16, 17, 0, 40], 16)
    assert padded == [16, 16, 32, 0, 48]
    assert offsets == [0, 16, 32, 64, 64, 112]
    assert all(n % 16 == 0 for n in padded) and offsets[-1] % 16 == 0
    padded, _ = pad_packed_lengths([33, 64], sequence_multiple("mxfp8"))
    assert padded == [64, 64]
    with pytest.raises(ValueError):
        pad_packed_lengths([3], 0)
