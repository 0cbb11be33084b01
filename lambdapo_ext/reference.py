"""Plain PyTorch references of every lambdapo op, for tests and benchmarks.

They follow DESIGN.md section 2 literally and favour clarity over memory: the lambda
advantage reference forms the [P, G, G] pair tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lambdapo_ext.advantages import NORMALIZE_MODES
from lambdapo_ext.overlap import _as_sequences
from lambdapo_ext.policy_loss import clipped_ratio


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
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
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


def _padded(seqs, name: str, device=None) -> tuple[Tensor, Tensor]:
    """Any accepted token-sequence form as padded ids [B, L] (pad -1) and lengths [B]."""
    values, starts, lengths = _as_sequences(seqs, name, device)
    width = int(lengths.max()) if lengths.numel() else 0
    pos = torch.arange(width, device=values.device)
    inside = pos[None, :] < lengths[:, None]
    index = (starts[:, None] + pos[None, :]).clamp(max=max(values.numel() - 1, 0))
    ids = values[index] if values.numel() else torch.zeros_like(index)
    return torch.where(inside, ids, -1), lengths


def _gather_refs(cand, ref, ref_index):
    cand_ids, cand_len = _padded(cand, "cand")
    ref_ids, ref_len = _padded(ref, "ref", cand_ids.device)
    if ref_index is None:
        ref_index = torch.arange(cand_ids.shape[0], device=cand_ids.device)
    return cand_ids, cand_len, ref_ids[ref_index], ref_len[ref_index]


def _ngram_rows(ids: Tensor, lengths: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The valid n-grams of each row ([K, n]) and the row each belongs to ([K])."""
    if ids.shape[1] < n:
        return ids.new_zeros((0, n)), ids.new_zeros((0,))
    grams = ids.unfold(1, n, 1)                                   # [B, L-n+1, n]
    valid = torch.arange(grams.shape[1], device=ids.device)[None, :] < (lengths[:, None] - n + 1)
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(valid)
    return grams[valid], rows[valid]


def _row_ids(grams: Tensor) -> Tensor:
    """Dense ids of the rows of ``grams`` [K, n], equal iff the rows are equal: one column
    at a time, pairing the ids so far with the next column's (1-D torch.unique is much
    faster and leaner than torch.unique(dim=0) on the CPU)."""
    _, ids = torch.unique(grams[:, 0], return_inverse=True)
    for k in range(1, grams.shape[1]):
        _, column = torch.unique(grams[:, k], return_inverse=True)
        _, ids = torch.unique(ids * (int(column.max()) + 1) + column, return_inverse=True)
    return ids


def ngram_overlap(cand, ref, *, max_n: int = 4, ref_index: Tensor | None = None):
    """Reference of :func:`lambdapo_ext.ngram_overlap`, TensorBLEU-style: the batch's n-grams
    are numbered with ``torch.unique``, counted per (row, n-gram) with a second
    ``torch.unique``, and clipped counts matched by binary search."""
    cand_ids, cand_len, ref_ids, ref_len = _gather_refs(cand, ref, ref_index)
    batch = cand_ids.shape[0]
    matches = torch.zeros((batch, max_n), dtype=torch.int64, device=cand_ids.device)
    for n in range(1, max_n + 1):
        c_grams, c_rows = _ngram_rows(cand_ids, cand_len, n)
        r_grams, r_rows = _ngram_rows(ref_ids, ref_len, n)
        if c_grams.shape[0] == 0 or r_grams.shape[0] == 0:
            continue
        ids = _row_ids(torch.cat([c_grams, r_grams]))
        num = int(ids.max()) + 1
        c_keys, c_counts = torch.unique(c_rows * num + ids[: len(c_rows)], return_counts=True)
        r_keys, r_counts = torch.unique(r_rows * num + ids[len(c_rows):], return_counts=True)
        at = torch.searchsorted(r_keys, c_keys).clamp(max=len(r_keys) - 1)
        found = r_keys[at] == c_keys
        clipped = torch.where(found, torch.minimum(c_counts, r_counts[at]), 0)
        matches[:, n - 1].index_add_(0, c_keys // num, clipped)
    counts = lambda lengths: (lengths[:, None] - torch.arange(max_n, device=lengths.device)  # noqa: E731
                              ).clamp(min=0)
    return matches, counts(cand_len), counts(ref_len)


def lcs_length(cand, ref, *, ref_index: Tensor | None = None) -> Tensor:
    """Reference of :func:`lambdapo_ext.lcs_length`: the O(|c| |t|) dynamic programme, one
    candidate position at a time over the whole batch (row update = cummax)."""
    cand_ids, cand_len, ref_ids, ref_len = _gather_refs(cand, ref, ref_index)
    batch, width = ref_ids.shape
    prev = torch.zeros((batch, width + 1), dtype=torch.int64, device=cand_ids.device)
    zero = prev[:, :1]
    for i in range(cand_ids.shape[1]):
        match = (ref_ids == cand_ids[:, i:i + 1]) & (ref_ids >= 0)
        step = torch.where(match, prev[:, :-1] + 1, prev[:, 1:])
        row = torch.cat([zero, torch.cummax(step, dim=1).values], dim=1)
        prev = torch.where((i < cand_len)[:, None], row, prev)
    return prev.gather(1, ref_len[:, None]).squeeze(1)


def policy_loss(
    logprobs: Tensor,
    entropy: Tensor,
    targets: Tensor,
    advantages: Tensor,
    token_weights: Tensor,
    *,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    entropy_coef: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ignore_index: int = -100,
) -> Tensor:
    """The loss of :func:`lambdapo_ext.linear_policy_loss` from per-token log-probs and
    entropies (differentiable through them): torch's eager PPO-clip formula, summed with
    ``token_weights``; rows whose target is ``ignore_index`` contribute nothing. In the dtype
    of ``logprobs``."""
    dtype = logprobs.dtype
    old = logprobs.detach() if old_logprobs is None else old_logprobs.to(dtype)
    ratio = torch.exp(logprobs - old)
    adv = advantages.to(dtype)
    per_token = -torch.minimum(ratio * adv, clipped_ratio(ratio, clip_low, clip_high) * adv)
    if kl_coef != 0:
        d = ref_logprobs.to(dtype) - logprobs
        per_token = per_token + kl_coef * (torch.exp(d) - d - 1)
    if entropy_coef != 0:
        per_token = per_token - entropy_coef * entropy
    per_token = per_token * token_weights.to(dtype)
    return torch.where(targets != ignore_index, per_token, 0).sum()


def linear_policy_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    advantages: Tensor,
    token_weights: Tensor,
    *,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    entropy_coef: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    temperature: float = 1.0,
    bias: Tensor | None = None,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference of :func:`lambdapo_ext.linear_policy_loss` (same arguments, no chunking):
    the full logits matmul, :func:`token_logprobs` with entropy, then :func:`policy_loss`.
    Returns ``(loss, logprobs, entropy)``, the last two detached; float64 for float64
    inputs."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    lp, h = token_logprobs(logits, targets, temperature=temperature, ignore_index=ignore_index,
                           return_entropy=True)
    loss = policy_loss(lp, h, targets, advantages, token_weights, old_logprobs=old_logprobs,
                       ref_logprobs=ref_logprobs, kl_coef=kl_coef, entropy_coef=entropy_coef,
                       clip_low=clip_low, clip_high=clip_high, ignore_index=ignore_index)
    return loss, lp.detach(), h.detach()
