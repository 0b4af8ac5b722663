"""Cluster-side helpers that need no GPU: Slurm job scripts and per-GPU memory estimates."""
