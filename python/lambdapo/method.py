"""LambdaPO's own settings, named and checked in one place for every front end.

The thin loop (``algorithm.lambda_*``, ``reward.lambda_sd`` and ``reward.sd_*``), TRL's
:class:`~lambdapo.integrations.trl.LambdaPOConfig` (``lambda_*``, ``semantic_density_*``)
and verl's algorithm config (``algorithm.lambda_*``) name the same few settings. Each front
end builds a :class:`LambdaSettings` and a :class:`SemanticDensitySettings` here with its
own field names, so that the rules and the messages are the same everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from lambdapo_ext.advantages import NORMALIZE_MODES
from lambdapo_ext.overlap import SEMANTIC_METRICS

SCORE_MODES = ("mean", "sum")
"""How a response's confidence score is formed from its sampled tokens' log-probs."""

LAMBDA_FIELDS = {"beta": "lambda_beta", "score": "lambda_score",
                 "normalize": "lambda_normalize"}
SEMANTIC_DENSITY_FIELDS = {"weight": "lambda_sd", "metric": "sd_metric", "max_n": "sd_max_n"}


@dataclass(frozen=True)
class LambdaSettings:
    """The pairwise lambda advantage's settings (docs/design.md).

    * ``beta`` >= 0: sharpness of the confidence weighting of each pair; 0 gives RLOO. A
      negative beta would weight most the pairs the policy already ranks right, the
      opposite of the method, so it is refused.
    * ``score``: a response's confidence, the ``mean`` or ``sum`` of its sampled tokens'
      log-probs under the behaviour policy.
    * ``normalize``: ``mean`` (divide by n - 1), ``none``, or ``std`` (``mean``, then
      divide by the group's reward spread).
    """
    beta: float = 1.0
    score: str = "mean"
    normalize: str = "mean"

    @classmethod
    def checked(cls, beta: float, score: str, normalize: str, *,
                names: Mapping[str, str] = LAMBDA_FIELDS) -> "LambdaSettings":
        """The settings, after checking each value.

        Args:
            names: how the calling front end names ``beta``, ``score`` and ``normalize``
                (used in the messages).

        Raises:
            ValueError: naming the first invalid setting by its front-end name.
        """
        beta = _non_negative(beta, names["beta"], "0: RLOO; a negative beta would favour the "
                                                  "pairs the policy already ranks right")
        if score not in SCORE_MODES:
            raise ValueError(f"{names['score']}: {score!r} is not one of {SCORE_MODES}")
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"{names['normalize']}: {normalize!r} is not one of "
                             f"{NORMALIZE_MODES}")
        return cls(beta, score, normalize)


@dataclass(frozen=True)
class SemanticDensitySettings:
    """The semantic-density reward's settings: ``weight`` (lambda_sd) >= 0 (0: off),
    ``metric`` ``rouge_n`` (mean F of n = 1..``max_n``) or ``rouge_l``."""
    weight: float = 0.1
    metric: str = "rouge_n"
    max_n: int = 2

    @classmethod
    def checked(cls, weight: float, metric: str, max_n: int, *,
                names: Mapping[str, str] = SEMANTIC_DENSITY_FIELDS
                ) -> "SemanticDensitySettings":
        """The settings, after checking each value.

        Raises:
            ValueError: naming the first invalid setting by its front-end name
                (``names`` maps ``weight``, ``metric`` and ``max_n`` to those).
        """
        weight = _non_negative(weight, names["weight"], "0: off")
        if metric not in SEMANTIC_METRICS:
            raise ValueError(f"{names['metric']}: {metric!r} is not one of {SEMANTIC_METRICS}")
        if isinstance(max_n, bool) or not isinstance(max_n, int) or max_n < 1:
            raise ValueError(f"{names['max_n']}: must be an integer >= 1, got {max_n!r}")
        return cls(weight, metric, max_n)


def _non_negative(value, name: str, meaning: str) -> float:
    """``value`` as a finite float >= 0; ValueError naming ``name`` (with ``meaning`` of the
    bound) otherwise."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number, got {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name}: must be a finite number >= 0 ({meaning}), got {number}")
    return number
