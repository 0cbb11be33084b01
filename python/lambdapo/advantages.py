"""Group advantage estimators, registered by name (:func:`register_estimator`), all with one
signature: ``estimator(rewards [P, G], scores [P, G], settings) -> advantages [P, G]``
(float32), ``settings`` the method's :class:`~lambdapo.method.LambdaSettings`.

* ``lambdapo``: the pairwise lambda advantage (DESIGN.md section 2) through
  ``lambdapo_ext.lambda_advantages``; scores are the responses' confidence (mean or sum of
  their sampled-token log-probs).
* ``grpo``: (r - mean) / (std + eps), the sample std of the group (as TRL and verl).
* ``dr_grpo``: r - mean (Dr. GRPO drops the std scaling).
* ``rloo``: r_i - mean of the others = G / (G - 1) * (r_i - mean).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

import lambdapo_ext

from .method import SCORE_MODES, LambdaSettings

EPS = 1e-6


def _check(rewards: Tensor, scores: Tensor) -> None:
    if rewards.dim() != 2 or rewards.shape != scores.shape:
        raise ValueError(f"rewards and scores must both be [P, G], got {tuple(rewards.shape)} "
                         f"and {tuple(scores.shape)}")
    if rewards.shape[1] < 2:
        raise ValueError(f"a group needs >= 2 responses, got G={rewards.shape[1]}")


@dataclass(frozen=True)
class Estimator:
    """An advantage estimator: ``fn(rewards [P, G], scores [P, G], settings) -> [P, G]``;
    ``uses_scores``: whether it reads the confidence scores (the trainer then needs the
    behaviour policy's log-probs before the update)."""
    name: str
    fn: Callable[[Tensor, Tensor, LambdaSettings], Tensor]
    uses_scores: bool


ESTIMATORS: dict[str, Estimator] = {}
"""Every estimator by name; ``algorithm.adv_estimator`` is validated against it."""


def register_estimator(name: str, *, uses_scores: bool = False):
    """Decorator adding ``fn`` to :data:`ESTIMATORS` under ``name`` (like verl's
    ``register_adv_est``): a new estimator is one decorated function.

    Raises:
        ValueError: ``name`` is taken.
    """
    def add(fn: Callable[[Tensor, Tensor, LambdaSettings], Tensor]):
        if name in ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ESTIMATORS[name] = Estimator(name, fn, uses_scores)
        return fn
    return add


@register_estimator("lambdapo", uses_scores=True)
def lambdapo(rewards: Tensor, scores: Tensor, settings: LambdaSettings) -> Tensor:
    return lambdapo_ext.lambda_advantages(rewards.float(), scores.float(), beta=settings.beta,
                                          normalize=settings.normalize)


@register_estimator("grpo")
def grpo(rewards: Tensor, scores: Tensor, settings: LambdaSettings) -> Tensor:
    r = rewards.float()
    return (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + EPS)


@register_estimator("dr_grpo")
def dr_grpo(rewards: Tensor, scores: Tensor, settings: LambdaSettings) -> Tensor:
    r = rewards.float()
    return r - r.mean(1, keepdim=True)


@register_estimator("rloo")
def rloo(rewards: Tensor, scores: Tensor, settings: LambdaSettings) -> Tensor:
    r = rewards.float()
    g = r.shape[1]
    return (r - r.mean(1, keepdim=True)) * (g / (g - 1))


def compute_advantages(rewards: Tensor, scores: Tensor, estimator: str,
                       settings: LambdaSettings = LambdaSettings()) -> Tensor:
    """Advantages [P, G] of the estimator named ``estimator``.

    Args:
        rewards: [P, G] total reward of each response (P prompts, G responses each).
        scores: [P, G] confidence of each response (used by ``lambdapo`` only).
        estimator: a name in :data:`ESTIMATORS`.
        settings: the lambda advantage's settings (beta, normalize).

    Raises:
        ValueError: unknown estimator, mismatched shapes or G < 2.
    """
    _check(rewards, scores)
    if estimator not in ESTIMATORS:
        raise ValueError(f"adv_estimator {estimator!r} is not one of {sorted(ESTIMATORS)}")
    with torch.no_grad():
        return ESTIMATORS[estimator].fn(rewards, scores, settings)


def sequence_scores(logprobs: Tensor, mask: Tensor, how: str) -> Tensor:
    """Confidence of each response: mean (or sum) of its tokens' log-probs. [B, T] -> [B].

    Raises:
        ValueError: ``how`` is not one of :data:`SCORE_MODES`.
    """
    total = (logprobs * mask).sum(-1)
    if how == "sum":
        return total
    if how == "mean":
        return total / mask.sum(-1).clamp(min=1)
    raise ValueError(f"lambda_score: {how!r} is not one of {SCORE_MODES}")
