"""Session fixtures: the tiny HF model zoo (built once, offline) and in-process megatron."""

from __future__ import annotations

import pytest
from helpers import ZOO


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict:
    """name -> directory of a tiny random HF checkpoint (see helpers.ZOO)."""
    from megatron_sppo.models.tiny import make_tiny_hf_model

    root = tmp_path_factory.mktemp("zoo")
    return {name: make_tiny_hf_model(root / name, seed=i, **kw)
            for i, (name, kw) in enumerate(ZOO.items())}


@pytest.fixture()
def megatron_tp1():
    """Single-process megatron-core (TP=1, PP=1) on the CPU layer, torn down afterwards."""
    from megatron.core import parallel_state

    from megatron_sppo.runtime import init_distributed

    init_distributed(1, 1)
    yield
    parallel_state.destroy_model_parallel()


@pytest.fixture(scope="session")
def small_builtin(tmp_path_factory):
    """builtin:tiny-arithmetic built with a few SFT steps into a private cache:
    (cache directory for MEGATRON_SPPO_CACHE, the model's path)."""
    from megatron_sppo.demo import builtin

    cache = tmp_path_factory.mktemp("cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("MEGATRON_SPPO_CACHE", str(cache))
    patch.setitem(builtin.SFT, "records", 256)
    patch.setitem(builtin.SFT, "steps", 3)
    patch.setitem(builtin.SFT, "batch_size", 8)
    try:
        path = builtin.ensure_builtin_model(progress=False)
    finally:
        patch.undo()
    return cache, path
