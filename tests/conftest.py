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
