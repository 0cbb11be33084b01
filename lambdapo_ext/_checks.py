"""Trace-time argument checks that the fake kernels of several op families share."""

from __future__ import annotations

import torch
from torch import Tensor


def check_same_device(op: str, first: tuple[str, Tensor], *others: tuple[str, Tensor | None]):
    """Fake-kernel check (trace time) that every given tensor is on ``first``'s device.

    Args:
        op: the op's name, which starts the error message.
        first: ``(name, tensor)`` whose device the others must share.
        others: ``(name, tensor)`` pairs; a None tensor (an absent optional input) is skipped.

    Raises:
        RuntimeError: (through ``torch._check``) naming the first tensor on another device.
    """
    name, tensor = first
    for other_name, other in others:
        if other is not None:
            torch._check(other.device == tensor.device,
                         lambda: f"{op}: {other_name} is on {other.device} but {name} is on "
                                 f"{tensor.device}")


def check_tensors(op: str, **arguments: object) -> None:
    """Eager check that each named argument is a tensor (or None, for optional ones), so
    that a Python list gets an error naming it rather than an attribute error.

    Raises:
        TypeError: ``"{op}: {name} must be a torch.Tensor, got {type}"``.
    """
    for name, value in arguments.items():
        if value is not None and not isinstance(value, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got "
                            f"{type(value).__name__} (torch.as_tensor(...) makes one)")
