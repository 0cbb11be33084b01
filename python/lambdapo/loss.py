"""The PPO clipped surrogate with LambdaPO's aggregation modes (DESIGN.md section 2).

Per token t of response i, with rho = exp(logp - old_logp):

    l_t = -min(rho * A_i, clip(rho, 1 - clip_low, 1 + clip_high) * A_i)  [+ kl_coef * k3]

Aggregation (over a whole mini-batch, even when it is split into micro-batches for
gradient accumulation: each micro-batch returns its share, so the shares sum to the
mini-batch loss):

* ``token-mean``: sum of l_t over all response tokens / number of those tokens;
* ``seq-mean-token-mean``: mean over responses of (mean over its tokens);
* ``seq-mean-token-sum-norm``: mean over responses of (sum over its tokens / max_new_tokens),
  Dr. GRPO's constant normaliser.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclass
class BatchTotals:
    """Sizes of the whole mini-batch, so that micro-batch shares add up to its loss."""
    tokens: int
    sequences: int
    max_new_tokens: int


def aggregate(per_token: Tensor, mask: Tensor, mode: str, totals: BatchTotals) -> Tensor:
    """This micro-batch's share of the mini-batch loss. per_token, mask: [b, T]."""
    mask = mask.to(per_token.dtype)
    if mode == "token-mean":
        return (per_token * mask).sum() / max(totals.tokens, 1)
    if mode == "seq-mean-token-mean":
        per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return per_seq.sum() / max(totals.sequences, 1)
    if mode == "seq-mean-token-sum-norm":
        per_seq = (per_token * mask).sum(-1) / totals.max_new_tokens
        return per_seq.sum() / max(totals.sequences, 1)
    raise ValueError(f"loss_agg_mode {mode!r} is not one of {AGG_MODES}")


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per token: exp(d) - d - 1, d = ref - logp."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                clip_low: float, clip_high: float, agg_mode: str, totals: BatchTotals,
                ref_logprobs: Tensor | None = None, kl_coef: float = 0.0,
                ) -> tuple[Tensor, dict[str, float]]:
    """Clipped surrogate of one micro-batch.

    Args:
        logprobs: [b, T] current policy's log-probs of the response tokens (with grad).
        old_logprobs: [b, T] behaviour policy's log-probs (no grad).
        advantages: [b] one advantage per response.
        mask: [b, T] 1 on response tokens, 0 on padding.
        clip_low, clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high].
        agg_mode: one of ``AGG_MODES``.
        totals: sizes of the mini-batch this micro-batch belongs to.
        ref_logprobs: [b, T] frozen reference's log-probs, needed when ``kl_coef > 0``.
        kl_coef: weight of the k3 KL term.

    Returns:
        (loss share, metric sums over this micro-batch's tokens: ``clipped``, ``kl``,
        ``ratio``, ``tokens``).
    """
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs")
    mask_f = mask.to(logprobs.dtype)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    adv = advantages.to(logprobs.dtype).unsqueeze(-1)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    metrics = {}
    if kl_coef > 0:
        kl = k3_kl(logprobs, ref_logprobs)
        per_token = per_token + kl_coef * kl
        metrics["kl"] = float((kl.detach() * mask_f).sum())
    loss = aggregate(per_token, mask, agg_mode, totals)
    with torch.no_grad():
        metrics["clipped"] = float(((clipped < unclipped).to(mask_f.dtype) * mask_f).sum())
        metrics["ratio"] = float((ratio * mask_f).sum())
        metrics["tokens"] = float(mask_f.sum())
    return loss, metrics
