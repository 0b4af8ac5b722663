"""Input checks shared by the algorithm library: one-line errors that say what to fix.

The error is both a ValueError (what a caller of a tensor-math function expects to catch) and
the project's UserError (so the CLI prints it as one ``error:`` line, not a traceback). The
trainer calls these through ``check_estimator`` / ``PolicyLossConfig`` while it validates its
config, so a bad name or option fails before any model is built.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from megatron_sppo.errors import UserError


class AlgorithmInputError(UserError, ValueError):
    """A bad name, option or tensor given to megatron_sppo.algorithms."""


def check_choice(what: str, value: str, valid: Iterable[str]) -> None:
    valid = list(valid)
    if value not in valid:
        raise AlgorithmInputError(f"unknown {what} {value!r}: use one of {', '.join(valid)}")


def check_binary(what: str, x: torch.Tensor) -> None:
    """The critic's BCE target is the verifier's 0/1 correctness, never a shaped reward."""
    bad = x[(x != 0) & (x != 1)]
    if bad.numel():
        raise AlgorithmInputError(
            f"{what} must be 0/1 correctness, got {bad[0].item()!r}: pass the verifier's 0/1 "
            "result as the critic target (shaped rewards belong in the advantage only)")


def check_shapes(shape: torch.Size | tuple[int, ...], **tensors: torch.Tensor | None) -> None:
    """Every tensor given (None = not given) must have exactly ``shape``."""
    for name, t in tensors.items():
        if t is not None and tuple(t.shape) != tuple(shape):
            raise AlgorithmInputError(
                f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}: pass one entry per "
                "sequence ([B]) or per response token ([B, T]) as documented")


def check_positive(**values: float | None) -> None:
    """Each hyperparameter given (None = feature off) must be > 0."""
    for name, v in values.items():
        if v is not None and not v > 0:
            raise AlgorithmInputError(f"{name}={v} must be > 0")
