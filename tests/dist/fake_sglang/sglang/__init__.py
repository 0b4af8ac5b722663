"""A stand-in ``sglang`` package for CPU tests: only ``python -m sglang.launch_server``."""
