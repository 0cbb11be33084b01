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

Rollout correction: the engine samples from its own copy of the policy (another kernel,
dtype or batch shape), so its log-probs ``mu`` differ from the trainer's ``pi_old``. The
surrogate of each token is multiplied by the truncated importance weight
``min(exp(pi_old - mu), cap)`` (token level) or, per response, by
``min(exp(mean_t(pi_old - mu)), cap)`` (sequence level; the mean, not the sum, so that
long responses are not clipped wholesale): truncated importance sampling as in Yao et
al. (2025) and verl's rollout correction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

import lambdapo_ext
from lambdapo_ext.policy_loss import AGG_MODES, aggregation_weights, clipped_ratio

from .padding import scatter_response

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


IS_LEVELS = ("token", "sequence", "none")


@torch.no_grad()
def rollout_is_weights(trainer_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, *,
                       level: str, cap: float) -> tuple[Tensor | None, dict[str, float]]:
    """Truncated importance weights of the trainer's policy over the engine's sampling
    distribution, and the mismatch between the two.

    Args:
        trainer_logprobs: [b, T] the trainer's log-probs of the sampled tokens (pi_old).
        rollout_logprobs: [b, T] the engine's log-probs of the same tokens (mu).
        mask: [b, T] 1 on response tokens.
        level: ``token``, ``sequence`` or ``none`` (no weights; mismatch still measured).
        cap: upper truncation of the weight (>= 1).

    Returns:
        (weights [b, T] (1 off the response) or None for ``none``, metrics:
        ``mismatch/abs_mean`` and ``mismatch/abs_max`` of |pi_old - mu| over response
        tokens, ``mismatch/is_mean`` the mean weight, ``mismatch/is_clipped`` the share of
        tokens (token level) or responses (sequence level) whose weight was truncated).

    Raises:
        ValueError: unknown ``level``, mismatched shapes.
    """
    if level not in IS_LEVELS:
        raise ValueError(f"rollout_is {level!r} is not one of {IS_LEVELS}")
    if trainer_logprobs.shape != rollout_logprobs.shape or trainer_logprobs.shape != mask.shape:
        raise ValueError(f"rollout_is_weights: trainer_logprobs {tuple(trainer_logprobs.shape)}, "
                         f"rollout_logprobs {tuple(rollout_logprobs.shape)} and mask "
                         f"{tuple(mask.shape)} must have one shape")
    mask = mask.bool()
    delta = (trainer_logprobs.float() - rollout_logprobs.float()).masked_fill(~mask, 0.0)
    tokens = max(int(mask.sum()), 1)
    metrics = {"mismatch/abs_mean": float(delta.abs().sum()) / tokens,
               "mismatch/abs_max": float(delta.abs().max()) if delta.numel() else 0.0}
    if level == "none":
        return None, metrics
    if level == "token":
        log_w = delta
        clipped = (log_w > math.log(cap)) & mask
        metrics["mismatch/is_clipped"] = float(clipped.sum()) / tokens
    else:
        log_w = (delta.sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(delta)
        has_tokens = mask.any(-1)
        clipped = (log_w[:, 0] > math.log(cap)) & has_tokens
        metrics["mismatch/is_clipped"] = float(clipped.sum()) / max(int(has_tokens.sum()), 1)
    weights = torch.exp(log_w.clamp(max=math.log(cap))).masked_fill(~mask, 1.0)
    metrics["mismatch/is_mean"] = float((weights * mask).sum()) / tokens
    return weights, metrics


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                clip_low: float, clip_high: float, agg_mode: str, totals: BatchTotals,
                ref_logprobs: Tensor | None = None, kl_coef: float = 0.0,
                is_weights: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
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
        is_weights: [b, T] rollout-correction weights (no grad) multiplying each token's
            surrogate (see :func:`rollout_is_weights`); the KL term is not weighted.

    Returns:
        (loss share, metric sums over this micro-batch's tokens: ``clipped``, ``kl``,
        ``ratio``, ``tokens``).
    """
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs")
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages.to(logprobs.dtype).unsqueeze(-1)
    unclipped = ratio * adv
    clipped = clipped_ratio(ratio, clip_low, clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    if is_weights is not None:
        per_token = per_token * is_weights.to(per_token.dtype)
    if kl_coef > 0:
        per_token = per_token + kl_coef * k3_kl(logprobs, ref_logprobs)
    loss = aggregate(per_token, mask, agg_mode, totals)
    metrics = surrogate_metrics(logprobs.detach(), old_logprobs, advantages.unsqueeze(-1), mask,
                                clip_low=clip_low, clip_high=clip_high,
                                ref_logprobs=ref_logprobs if kl_coef > 0 else None)
    return loss, metrics


@torch.no_grad()
def surrogate_metrics(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                      *, clip_low: float, clip_high: float,
                      ref_logprobs: Tensor | None = None) -> dict[str, float]:
    """Metric sums over the tokens of ``mask`` (every argument broadcast to its shape):
    ``clipped`` (tokens whose clipped surrogate is the smaller), ``ratio`` (pi / pi_old),
    ``tokens``, and with ``ref_logprobs`` ``kl`` (k3)."""
    mask_f = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages.to(logprobs.dtype)
    unclipped, clipped = ratio * adv, clipped_ratio(ratio, clip_low, clip_high) * adv
    metrics = {}
    if ref_logprobs is not None:
        metrics["kl"] = float((k3_kl(logprobs, ref_logprobs) * mask_f).sum())
    metrics["clipped"] = float(((clipped < unclipped).to(mask_f.dtype) * mask_f).sum())
    metrics["ratio"] = float((ratio * mask_f).sum())
    metrics["tokens"] = float(mask_f.sum())
    return metrics


def fused_policy_loss(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                      mask: Tensor, advantages: Tensor, old_logprobs: Tensor | None, *,
                      temperature: float, clip_low: float, clip_high: float, agg_mode: str,
                      totals: BatchTotals, ref_logprobs: Tensor | None = None,
                      kl_coef: float = 0.0, is_weights: Tensor | None = None
                      ) -> tuple[Tensor, Tensor, Tensor, dict[str, float]]:
    """:func:`policy_loss` of one micro-batch fused with its linear lm-head
    (``lambdapo_ext.linear_policy_loss``): the same loss share, gradients and metrics,
    without the ``[N, V]`` logits and with three matmuls instead of four. The aggregation
    becomes per-token weights and the rollout-correction weights multiply the advantages.

    Args:
        hidden: [N, H] the head's inputs at the response tokens of ``mask`` (row-major).
        weight, bias: the head's [V, H] weight and [V] bias (or None).
        targets: [N] the response tokens.
        mask: [b, T] bool, 1 on response tokens (N of them).
        advantages: [b] one advantage per response.
        old_logprobs: [b, T] pi_old, or None for the on-policy ratio 1 (pi_old the
            log-probs themselves).
        temperature: the sampling temperature the log-probs are taken at.
        clip_low, clip_high, agg_mode, totals, ref_logprobs, kl_coef, is_weights: as
            :func:`policy_loss`'s.

    Returns:
        (loss share, log-probs [b, T], entropies [b, T] (float32, no grad, 0 off the
        mask), the metric sums of :func:`policy_loss`).
    """
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs")
    mask = mask.bool()
    token_weights = aggregation_weights(mask, agg_mode, tokens=totals.tokens,
                                        sequences=totals.sequences,
                                        max_new_tokens=totals.max_new_tokens)[mask]
    token_advantages = advantages.float().unsqueeze(-1).expand(mask.shape)
    if is_weights is not None:
        token_advantages = token_advantages * is_weights.float()
    old = None if old_logprobs is None else old_logprobs[mask]
    ref = ref_logprobs[mask] if kl_coef > 0 else None
    loss, logprobs, entropy = lambdapo_ext.linear_policy_loss(
        hidden, weight, targets, token_advantages[mask], token_weights, old_logprobs=old,
        ref_logprobs=ref, kl_coef=kl_coef, clip_low=clip_low, clip_high=clip_high,
        temperature=temperature, bias=bias)
    metrics = surrogate_metrics(logprobs, logprobs if old is None else old,
                                advantages.float().unsqueeze(-1).expand(mask.shape)[mask],
                                torch.ones_like(logprobs), clip_low=clip_low,
                                clip_high=clip_high, ref_logprobs=ref)
    return loss, scatter_response(logprobs, mask), scatter_response(entropy, mask), metrics
