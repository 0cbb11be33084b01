"""LambdaPO in verl: the ``lambdapo`` advantage estimator and semantic-density rewards.

After ``pip install 'lambdapo[verl]'`` verl loads this module through its plugin entry point
(group ``verl.plugins``) whenever ``verl`` is imported, so a GRPO run switches with one key::

    python -m verl.trainer.main_ppo ... algorithm.adv_estimator=lambdapo \\
        +algorithm.lambda_beta=1.0 +algorithm.lambda_score=mean +algorithm.lambda_normalize=mean

(``examples/verl/lambdapo_gsm8k.yaml`` is a complete config.) The estimator reads
``lambda_beta``, ``lambda_score`` (mean | sum) and ``lambda_normalize`` (mean | none | std)
from the algorithm config (defaults 1.0, mean, mean).

**Log-probs.** verl calls a registered estimator with the token-level rewards, the
response mask, the group index and the config, but not with log-probs, which LambdaPO needs
as confidence scores. This module therefore wraps verl's ``compute_advantage`` (in
``verl.trainer.ppo.ray_trainer``, the function both of verl's trainers call) as that module
is imported: for ``adv_estimator=lambdapo`` the wrapper hands the batch's
``rollout_log_probs`` (the rollout engine's, when ``actor_rollout_ref.rollout.
calculate_log_probs=True``) or else its ``old_log_probs`` (the actor's recomputation) to
the estimator, then runs verl's code unchanged. Called without them (another caller, or
``VERL_USE_EXTERNAL_PLUGINS`` excluding this plugin) the estimator warns and uses beta = 0,
i.e. RLOO. To do it by hand, wrap the call in :func:`rollout_log_probs`.

**Rewards.** :func:`compute_score` is a custom reward function for verl's per-sample
reward managers (``reward.custom_reward_function.path`` = this file's path, ``name`` =
``compute_score``) and :func:`compute_score_batch` its batched form for a batch reward
manager: verl's rule-based score of the data source (e.g. GSM8K) plus ``lambda_sd`` x
semantic density of the response against the reference solution in
``extra_info[solution_key]`` (verl's GSM8K preprocessing keeps the worked solution in
``extra_info["answer"]``), tokenized with ``tokenizer`` (a path or name given in
``reward_kwargs``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.abc
import importlib.util
import logging
import sys
import warnings
from enum import Enum
from typing import Any

import numpy as np
import torch
from torch import Tensor

import lambdapo_ext

from ..advantages import sequence_scores
from ..method import LambdaSettings, SemanticDensitySettings
from ..rewards import semantic_density_to_texts

logger = logging.getLogger(__name__)

ESTIMATOR = "lambdapo"
# Where verl's trainers compute advantages; its v1 trainer imports the function from here.
_TRAINER_MODULE = "verl.trainer.ppo.ray_trainer"
_LOG_PROBS: contextvars.ContextVar[Tensor | None] = contextvars.ContextVar(
    "lambdapo_verl_log_probs", default=None)


def _setting(config: Any, key: str, default: Any) -> Any:
    if config is None:
        return default
    if hasattr(config, "get"):
        value = config.get(key, default)
    else:
        value = getattr(config, key, default)
    return default if value is None else value


@contextlib.contextmanager
def rollout_log_probs(log_probs: Tensor | None):
    """Within this block the ``lambdapo`` estimator scores responses with ``log_probs``
    ([B, T] per-token log-probs of the responses, aligned with the response mask)."""
    token = _LOG_PROBS.set(log_probs)
    try:
        yield
    finally:
        _LOG_PROBS.reset(token)


def compute_lambdapo_advantage(token_level_rewards: Tensor, response_mask: Tensor,
                               index: np.ndarray | None = None, config: Any = None,
                               log_probs: Tensor | None = None, **_: Any
                               ) -> tuple[Tensor, Tensor]:
    """verl advantage estimator ``lambdapo``: pairwise lambda advantages within each group.

    Args:
        token_level_rewards: [B, T] rewards; a response's reward is their sum (outcome).
        response_mask: [B, T] 1 on response tokens.
        index: [B] group id of each response (verl's ``uid``); None: one group.
        config: verl's algorithm config (``lambda_beta``, ``lambda_score``,
            ``lambda_normalize``).
        log_probs: [B, T] per-token log-probs of the responses; default: the ones the
            wrapped ``compute_advantage`` (or :func:`rollout_log_probs`) provides. Without
            any, beta falls back to 0 (RLOO) with a warning.

    Returns:
        (advantages, returns), both [B, T]: each response's advantage on its tokens.

    Raises:
        ValueError: invalid settings in ``config``; log-probs of another shape.
    """
    settings = LambdaSettings.checked(
        _setting(config, "lambda_beta", 1.0), _setting(config, "lambda_score", "mean"),
        _setting(config, "lambda_normalize", "mean"),
        names={key: f"algorithm.lambda_{key}" for key in ("beta", "score", "normalize")})
    beta, how, normalize = settings.beta, settings.score, settings.normalize
    mask = response_mask.float()
    rewards = token_level_rewards.float().sum(dim=-1)
    log_probs = log_probs if log_probs is not None else _LOG_PROBS.get()
    if log_probs is None:
        if beta != 0:
            warnings.warn("lambdapo advantage: no log-probs reached the estimator (verl's "
                          "compute_advantage was not wrapped by lambdapo.integrations.verl); "
                          "using beta=0, i.e. RLOO", RuntimeWarning, stacklevel=2)
        beta, scores = 0.0, torch.zeros_like(rewards)
    else:
        if log_probs.shape != response_mask.shape:
            raise ValueError(f"lambdapo advantage: log-probs {tuple(log_probs.shape)} do not "
                             f"match response_mask {tuple(response_mask.shape)}")
        scores = sequence_scores(log_probs.float().to(mask.device), mask, how)
    if index is None:
        group_ids = torch.zeros(len(rewards), dtype=torch.long)
    else:
        ids: dict[Any, int] = {}
        group_ids = torch.tensor([ids.setdefault(uid, len(ids)) for uid in index],
                                 dtype=torch.long)
    advantages = lambdapo_ext.lambda_advantages(
        rewards, scores, group_ids=group_ids.to(rewards.device), beta=beta,
        normalize=normalize)
    advantages = advantages.unsqueeze(-1) * mask
    return advantages, advantages


def _with_log_probs(compute_advantage):
    """verl's ``compute_advantage``, handing the batch's log-probs to the lambdapo estimator."""
    if getattr(compute_advantage, "__lambdapo_wrapped__", False):
        return compute_advantage

    @functools.wraps(compute_advantage)
    def wrapper(data, adv_estimator, *args, **kwargs):
        name = adv_estimator.value if isinstance(adv_estimator, Enum) else adv_estimator
        if name != ESTIMATOR:
            return compute_advantage(data, adv_estimator, *args, **kwargs)
        batch = data.batch
        keys = batch.keys()
        log_probs = next((batch[k] for k in ("rollout_log_probs", "old_log_probs")
                          if k in keys), None)
        with rollout_log_probs(log_probs):
            return compute_advantage(data, adv_estimator, *args, **kwargs)

    wrapper.__lambdapo_wrapped__ = True
    return wrapper


def _patch(module) -> None:
    module.compute_advantage = _with_log_probs(module.compute_advantage)


class _PatchAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Wraps ``compute_advantage`` right after verl's trainer module runs, so that every
    later ``from ... import compute_advantage`` gets the wrapper (importing the trainer here
    would pull Ray and the whole trainer into every ``import verl``)."""

    def find_spec(self, name, path, target=None):
        if name != _TRAINER_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _patch(module)


def _register() -> None:
    from verl.trainer.ppo import core_algos

    if core_algos.ADV_ESTIMATOR_REGISTRY.get(ESTIMATOR) is not compute_lambdapo_advantage:
        core_algos.register_adv_est(ESTIMATOR)(compute_lambdapo_advantage)
    if _TRAINER_MODULE in sys.modules:
        _patch(sys.modules[_TRAINER_MODULE])
        v1 = sys.modules.get("verl.trainer.ppo.v1.utils")
        if v1 is not None:
            _patch(v1)
    elif not any(isinstance(f, _PatchAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchAfterImport())


# ------------------------------------------------------------------------------- rewards
_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(tokenizer: Any):
    if tokenizer is None:
        raise ValueError("semantic density needs the policy's tokenizer: set "
                         "reward.custom_reward_function.reward_kwargs.tokenizer to its path")
    if not isinstance(tokenizer, str):
        return tokenizer
    if tokenizer not in _TOKENIZERS:
        from transformers import AutoTokenizer
        _TOKENIZERS[tokenizer] = AutoTokenizer.from_pretrained(tokenizer)
    return _TOKENIZERS[tokenizer]


_MATH_VERIFY: dict[str, Any] = {}


def _outcome(kind: str, data_source, solution_str, ground_truth, extra_info,
             answer_marker: str) -> float:
    if kind == "none":
        return 0.0
    if kind == "math_verify":
        if answer_marker not in _MATH_VERIFY:
            from ..rewards import MathVerifyReward
            _MATH_VERIFY[answer_marker] = MathVerifyReward(answer_marker)
        return _MATH_VERIFY[answer_marker]([""], [solution_str], [[]],
                                           answer=[str(ground_truth)])[0]
    if kind == "verl":
        from verl.utils.reward_score import default_compute_score
        result = default_compute_score(data_source, solution_str, ground_truth, extra_info)
        return float(result["score"] if isinstance(result, dict) else result)
    raise ValueError(f"outcome must be verl, math_verify or none, got {kind!r}")


def compute_score_batch(data_sources, solution_strs, ground_truths, extra_infos, *,
                        tokenizer: Any = None, lambda_sd: float = 0.1,
                        solution_key: str = "answer", metric: str = "rouge_n", max_n: int = 2,
                        outcome: str = "verl", answer_marker: str = "", **_: Any
                        ) -> list[dict]:
    """Batched reward: per response ``{"score": outcome + lambda_sd * sd, "outcome",
    "semantic_density"}``, all semantic densities in one ``lambdapo_ext.semantic_density``
    call (responses with the same reference share it).

    Args:
        data_sources, solution_strs, ground_truths, extra_infos: verl's per-response lists
            (the response text is ``solution_strs``).
        tokenizer: the policy's tokenizer or its path.
        lambda_sd: weight of the semantic density.
        solution_key: key of the reference solution in each ``extra_info``.
        metric, max_n: ``rouge_n`` (mean F1, n = 1..max_n) or ``rouge_l``.
        outcome: ``verl`` (verl's rule-based score of the data source), ``math_verify``
            (lambdapo's, the final answer after ``answer_marker`` or in ``\\boxed{}``) or
            ``none``.

    Raises:
        ValueError: no tokenizer, or an ``extra_info`` without ``solution_key``.
    """
    settings = SemanticDensitySettings.checked(
        lambda_sd, metric, max_n, names={"weight": "reward_kwargs.lambda_sd",
                                         "metric": "reward_kwargs.metric",
                                         "max_n": "reward_kwargs.max_n"})
    tok = _tokenizer(tokenizer)
    for i, info in enumerate(extra_infos):
        if not info or solution_key not in info:
            raise ValueError(f"semantic density: response {i} has no reference solution "
                             f"extra_info[{solution_key!r}] (set reward_kwargs.solution_key)")
    tokenize = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    density = semantic_density_to_texts(
        [tokenize(s) for s in solution_strs], [str(info[solution_key]) for info in extra_infos],
        tokenize, metric=settings.metric, max_n=settings.max_n)
    results = []
    for source, text, truth, info, sd in zip(data_sources, solution_strs, ground_truths,
                                             extra_infos, density):
        value = _outcome(outcome, source, text, truth, info, answer_marker)
        results.append({"score": value + settings.weight * sd, "outcome": value,
                        "semantic_density": sd})
    return results


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> dict:
    """Per-response form of :func:`compute_score_batch` (verl's custom reward function
    signature; settings come as ``reward_kwargs``)."""
    return compute_score_batch([data_source], [solution_str], [ground_truth], [extra_info],
                               **kwargs)[0]


if importlib.util.find_spec("verl") is not None:
    _register()
