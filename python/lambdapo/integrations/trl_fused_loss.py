"""TRL's GRPO loss through ``lambdapo_ext.linear_policy_loss`` (the PPO-clip loss fused with
the lm-head: three matmuls, no ``[B, T, V]`` logits), for ``LambdaPOTrainer`` with
``LambdaPOConfig(lambdapo_fused_loss=True)``. This module does not import TRL, so the loss
can be checked without it.

TRL's per-token loss ``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)`` (times vLLM's
importance-sampling weight when TRL corrects for it) ``+ beta * k3`` is aggregated per
``loss_type``; every supported aggregation is a choice of per-token weights:

* ``grpo``: ``mask / |y_i| / B / accumulation``;
* ``bnpo``: ``mask / sum(mask) / accumulation``;
* ``dr_grpo``: ``mask / (B * max_completion_length) / accumulation``;
* ``dapo``: ``mask / normalizer`` (TRL's normalizer of the batch's items).

Not supported (:func:`unsupported_settings` names them): the other loss types (cispo, sapo,
vespo, luspo), a sequence-level importance ratio, the two-sided clip ``delta``, the
off-policy mask, the entropy mask (``top_entropy_quantile`` < 1), an entropy bonus, the
bias-corrected KL (TRL's default ``use_bias_correction_kl``: set it False with ``beta``),
and vision inputs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import lambdapo_ext

from ..padding import scatter_response

FUSED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def unsupported_settings(args: Any) -> list[str]:
    """The settings of a TRL ``GRPOConfig`` (``args``) that the fused loss does not
    implement, as ``name=value`` strings; empty when it serves."""
    checks = [
        ("loss_type", lambda v: v not in FUSED_LOSS_TYPES),
        ("importance_sampling_level", lambda v: v != "token"),
        ("delta", lambda v: v is not None),
        ("off_policy_mask_threshold", lambda v: v is not None),
        ("top_entropy_quantile", lambda v: v is not None and v < 1.0),
        ("entropy_coef", lambda v: bool(v)),
        ("use_adaptive_entropy", lambda v: bool(v)),
    ]
    found = [f"{name}={getattr(args, name)!r}" for name, bad in checks
             if hasattr(args, name) and bad(getattr(args, name))]
    if getattr(args, "beta", 0.0) and getattr(args, "use_bias_correction_kl", False):
        found.append("use_bias_correction_kl=True with beta != 0")
    return found


def grpo_token_weights(mask: Tensor, loss_type: str, *, accumulation: float = 1.0,
                       max_completion_length: int | None = None,
                       normalizer: Tensor | float | None = None) -> Tensor:
    """Per-token weights [B, T] (float32) whose weighted sum of per-token losses is TRL's
    aggregation for ``loss_type`` (module docstring).

    Args:
        mask: [B, T] completion mask (0/1).
        loss_type: one of ``FUSED_LOSS_TYPES``.
        accumulation: TRL's gradient-accumulation divisor (grpo, bnpo, dr_grpo).
        max_completion_length: dr_grpo's constant.
        normalizer: dapo's divisor (TRL's items of the batch per accumulation window).

    Raises:
        ValueError: an unknown ``loss_type``, or a missing ``max_completion_length``
            (dr_grpo) or ``normalizer`` (dapo).
    """
    m = mask.to(torch.float32)
    if loss_type == "grpo":
        return m / m.sum(-1, keepdim=True).clamp(min=1.0) / m.shape[0] / accumulation
    if loss_type == "bnpo":
        return m / m.sum().clamp(min=1.0) / accumulation
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("grpo_token_weights: dr_grpo needs max_completion_length")
        return m / (m.shape[0] * max_completion_length) / accumulation
    if loss_type == "dapo":
        if normalizer is None:
            raise ValueError("grpo_token_weights: dapo needs normalizer")
        return m / normalizer
    raise ValueError(f"grpo_token_weights: loss_type {loss_type!r} is not one of "
                     f"{FUSED_LOSS_TYPES}")


def fused_grpo_loss(hidden: Tensor, weight: Tensor, completion_ids: Tensor, mask: Tensor,
                    advantages: Tensor, token_weights: Tensor, *,
                    old_logprobs: Tensor | None = None, ref_logprobs: Tensor | None = None,
                    is_ratio: Tensor | None = None, beta: float = 0.0,
                    epsilon_low: float = 0.2, epsilon_high: float = 0.2,
                    temperature: float = 1.0, bias: Tensor | None = None
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """TRL's GRPO loss of a batch of completions from the lm-head's inputs.

    Args:
        hidden: [B, T, H] the head's inputs at the positions that predict the completion
            tokens.
        weight, bias: the lm-head's [V, H] weight and [V] bias (or None).
        completion_ids: [B, T] the completion tokens.
        mask: [B, T] completion mask (0/1); tokens off it cost no work.
        advantages: [B] (or [B, T]) advantages.
        token_weights: [B, T] the aggregation (:func:`grpo_token_weights`).
        old_logprobs: [B, T] pi_old (TRL's ``old_per_token_logps``), None: on-policy.
        ref_logprobs: [B, T] the reference's log-probs; needed when ``beta != 0``.
        is_ratio: [B, T] or [B, 1] vLLM importance-sampling weights (>= 0) multiplying the
            surrogate, or None.
        beta: KL coefficient (k3).
        epsilon_low, epsilon_high: the clip range.
        temperature: TRL's sampling temperature.

    Returns:
        (loss, per-token log-probs [B, T], entropies [B, T]); the last two float32, no
        grad, 0 off the mask.

    Raises:
        ValueError: ``beta != 0`` without ``ref_logprobs``.
    """
    if beta != 0.0 and ref_logprobs is None:
        raise ValueError("fused_grpo_loss: beta != 0 needs ref_logprobs")
    keep = mask.bool()
    token_advantages = advantages.float()
    if token_advantages.dim() == 1:
        token_advantages = token_advantages.unsqueeze(-1)
    token_advantages = token_advantages.expand(keep.shape)
    if is_ratio is not None:
        token_advantages = token_advantages * is_ratio.float()
    rows = keep.flatten().nonzero().squeeze(1)   # index_select: a cheap backward
    loss, logprobs, entropy = lambdapo_ext.linear_policy_loss(
        hidden.flatten(0, 1).index_select(0, rows), weight, completion_ids[keep], token_advantages[keep],
        token_weights.float()[keep],
        old_logprobs=None if old_logprobs is None else old_logprobs.float()[keep],
        ref_logprobs=ref_logprobs.float()[keep] if beta != 0.0 else None, kl_coef=beta,
        clip_low=epsilon_low, clip_high=epsilon_high, temperature=temperature, bias=bias)
    return loss, scatter_response(logprobs, keep), scatter_response(entropy, keep)
