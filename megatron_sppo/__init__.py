"""megatron_sppo: Sequence-Level PPO (SPPO) and its baselines on megatron-core."""

__version__ = "0.1.0"

from megatron_sppo.runtime import log_filters as _log_filters  # noqa: E402,F401
