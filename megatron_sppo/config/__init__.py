"""The YAML training config: schema with defaults, overrides, validation before any model."""

from megatron_sppo.config.loader import to_dict, write_yaml_atomic
from megatron_sppo.config.schema import (AlgorithmConfig, Config, CriticConfig, DataConfig,
                                         ModelConfig, RewardConfig, RolloutConfig, SGLangConfig,
                                         TrainerConfig, load_config)

__all__ = ["AlgorithmConfig", "Config", "CriticConfig", "DataConfig", "ModelConfig",
           "RewardConfig", "RolloutConfig", "SGLangConfig", "TrainerConfig", "load_config",
           "to_dict", "write_yaml_atomic"]
