"""Prompt data, batching and packing."""
