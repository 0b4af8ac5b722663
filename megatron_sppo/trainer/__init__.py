"""The RL loop and its Megatron steps."""
