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
