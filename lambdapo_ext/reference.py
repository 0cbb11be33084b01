"""Plain PyTorch references of every lambdapo op, for tests and benchmarks.

They follow DESIGN.md section 2 literally and favour clarity over memory: the lambda
advantage reference forms the [P, G, G] pair tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _ragged_to_dense(values: list[Tensor], group_ids: Tensor):
    """Pads ragged groups to [P, G_max]; returns the padded values, the mask and the
    (group, position) of each input element."""
    _, group = torch.unique(group_ids, return_inverse=True)
    num_groups = int(group.max()) + 1 if group.numel() else 0
    order = torch.argsort(group, stable=True)
    counts = torch.bincount(group, minlength=num_groups)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.empty_like(group)
    position[order] = torch.arange(group.numel(), device=group.device) - starts[group[order]]
    width = int(counts.max()) if group.numel() else 0
    padded = []
    for v in values:
        dense = v.new_zeros((num_groups, width))
        dense[group, position] = v
        padded.append(dense)
    mask = torch.zeros((num_groups, width), dtype=torch.bool, device=group_ids.device)
    mask[group, position] = True
    return padded, mask, group, position


def lambda_advantages(
    rewards: Tensor,
    scores: Tensor,
    *,
    mask: Tensor | None = None,
    group_ids: Tensor | None = None,
    beta: float = 1.0,
    normalize: str = "mean",
    eps: float = 1e-6,
) -> Tensor:
    """Reference of :func:`lambdapo_ext.lambda_advantages` (same arguments).

    Computes in float64 when an input is float64, else float32, and returns that dtype.
    Memory is O(P * G^2).
    """
    dtype = _compute_dtype(rewards, scores)
    r, s = rewards.to(dtype), scores.to(dtype)
    if group_ids is not None:
        (r, s, m), pad_mask, group, position = _ragged_to_dense(
            [r, s, (mask if mask is not None else torch.ones_like(r, dtype=torch.bool)).to(dtype)],
            group_ids)
        dense = lambda_advantages(r, s, mask=pad_mask & (m > 0), beta=beta,
                                  normalize=normalize, eps=eps)
        return dense[group, position]
    if normalize not in ("mean", "none", "std"):
        raise ValueError(f"normalize must be 'mean', 'none' or 'std', got {normalize!r}")
    valid = torch.ones_like(r, dtype=torch.bool) if mask is None else mask
    r = torch.where(valid, r, 0)
    s = torch.where(valid, s, 0)
    dr = r[:, :, None] - r[:, None, :]
    ds = s[:, :, None] - s[:, None, :]
    weight = 2 * torch.sigmoid(-beta * torch.sign(dr) * ds)
    pair_valid = valid[:, :, None] & valid[:, None, :]
    adv = torch.where(pair_valid, dr * weight, 0).sum(-1)
    n = valid.sum(-1, keepdim=True).to(dtype)
    if normalize in ("mean", "std"):
        adv = adv / (n - 1).clamp(min=1)
    if normalize == "std":
        mean = r.sum(-1, keepdim=True) / n.clamp(min=1)
        var = (torch.where(valid, r - mean, 0) ** 2).sum(-1, keepdim=True) / n.clamp(min=1)
        adv = adv / (var.sqrt() + eps)
    return torch.where(valid & (n >= 2), adv, 0)


def rloo_advantages(rewards: Tensor) -> Tensor:
    """Leave-one-out baseline A_i = r_i - mean_{j != i} r_j over dense groups [P, G]."""
    g = rewards.shape[-1]
    return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (g - 1)


def token_logprobs(
    logits: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Reference of :func:`lambdapo_ext.token_logprobs`: fp32 (fp64 for fp64 logits)
    log_softmax + gather, entropy from the softmax. Differentiable through autograd."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    log_p = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    ignored = targets == ignore_index
    safe_targets = torch.where(ignored, 0, targets).long()
    logprobs = log_p.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    logprobs = torch.where(ignored, 0, logprobs)
    if not return_entropy:
        return logprobs
    entropy = -(log_p.exp() * log_p).sum(-1)
    return logprobs, torch.where(ignored, 0, entropy)


def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Reference of :func:`lambdapo_ext.linear_token_logprobs`: the full logits matmul,
    then :func:`token_logprobs`."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return token_logprobs(logits, targets, temperature=temperature, ignore_index=ignore_index,
                          return_entropy=return_entropy)
