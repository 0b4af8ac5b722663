"""FP8: block-quantised weights for SGLang rollouts, and megatron-core FP8 training settings."""
