"""Rollout engines behind one interface (:mod:`.engine`): ``build_engine("local" | "sglang")``.

Engines are imported on demand, so importing the package (e.g. for the exporter) pulls in
neither transformers' model code nor the HTTP client.
"""

from __future__ import annotations

from megatron_sppo.errors import UserError
from megatron_sppo.rollout.engine import (EngineError, RolloutEngine, Sample, SamplingParams,
                                          sample_seed)

ENGINES = ("local", "sglang")

__all__ = ["ENGINES", "EngineError", "RolloutEngine", "Sample", "SamplingParams", "build_engine",
           "sample_seed"]


def build_engine(kind: str, **kwargs) -> RolloutEngine:
    """``local``: :class:`.local.LocalEngine(hf_path, ...)`; ``sglang``:
    :meth:`.sglang_engine.SGLangEngine.create(model_path, addresses=..., ...)`."""
    if kind == "local":
        from megatron_sppo.rollout.local import LocalEngine

        return LocalEngine(**kwargs)
    if kind == "sglang":
        from megatron_sppo.rollout.sglang_engine import SGLangEngine

        return SGLangEngine.create(**kwargs)
    raise UserError(f"unknown rollout engine {kind!r}: use one of {', '.join(ENGINES)}")
