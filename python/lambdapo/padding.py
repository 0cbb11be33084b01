"""Token-id lists as padded tensors, the position ids of left-padded rows, and per-token
values back into their padded rows."""

from __future__ import annotations

import torch
from torch import Tensor


def left_padded(sequences: list, pad_id: int) -> tuple[Tensor, Tensor]:
    """``sequences`` (token id lists, at least one) left-padded to the longest, L:
    (ids [n, L] long, mask [n, L] long, 1 on the tokens), so that every row ends in the
    last column."""
    lengths = [len(s) for s in sequences]
    width = max(lengths)
    ids = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in sequences])
    mask = (torch.arange(width) >= width - torch.tensor(lengths).unsqueeze(1)).long()
    return ids, mask


def right_padded(sequences: list, pad, dtype: torch.dtype = torch.long) -> tuple[Tensor, Tensor]:
    """``sequences`` right-padded with ``pad`` to the longest, T (at least 1): (values
    [n, T] of ``dtype``, mask [n, T] bool, True on the values)."""
    width = max(max((len(s) for s in sequences), default=1), 1)
    values = torch.tensor([list(s) + [pad] * (width - len(s)) for s in sequences], dtype=dtype)
    lengths = torch.tensor([len(s) for s in sequences])
    return values, torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)


def positions_of(mask: Tensor) -> Tensor:
    """Position ids [..., L] of left-padded rows from their attention ``mask``: 0 at each
    row's first real token, counting real tokens only (0 on the padding too)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def scatter_response(values: Tensor, mask: Tensor) -> Tensor:
    """Per-token ``values`` [N] (the tokens of the bool ``mask`` [b, T] in row-major order)
    back to ``[b, T]`` float32, zero off ``mask``."""
    out = torch.zeros(mask.shape, dtype=torch.float32, device=values.device)
    return out.masked_scatter(mask, values.float())
