"""Scoring a step's rollout: rewards, confidence scores and advantages, as one immutable
:class:`ScoredBatch`.

:meth:`Scorer.start` starts the reward functions (in the background where they can:
math-verify with ``reward.workers``) and returns a :class:`PendingScores`; the behaviour
forward and the update's first forward run meanwhile, and the update then asks for
:meth:`PendingScores.result` with the step's pi_old, which waits for the rewards and forms
the scores and advantages. On a CPU torch leaves the reward workers their cores
while they verify (its threads would otherwise wait on each other's descheduled ones at
every op); the thread count is restored when the result is in, or when the block that holds
the pending scores ends, whichever comes first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .advantages import compute_advantages, sequence_scores
from .batch import RolloutBatch
from .method import LambdaSettings



@dataclass(frozen=True)
class ScoredBatch:
    """A step's rollout with what scoring gave: per response (B = P * G) the total reward,
    the confidence score and the advantage (device tensors, float32), the decoded text,
    each reward function's values and the math-verify reward (host lists)."""
    rollout: RolloutBatch
    rewards: Tensor                        # [B]
    scores: Tensor                         # [B]
    advantages: Tensor                     # [B]
    texts: list[str]
    per_function: dict[str, list[float]]
    correct: list[float]


class PendingScores:
    """Scores being computed (:meth:`Scorer.start`); a context manager that gives torch its
    threads back when it ends."""

    def __init__(self, finish: Callable[[Tensor], ScoredBatch], threads_to_restore: int | None):
        self._finish = finish
        self._threads = threads_to_restore
        self._result: ScoredBatch | None = None
        self.wait_time = 0.0   # seconds spent in result() waiting for the rewards

    def result(self, scoring_logprobs: Tensor) -> ScoredBatch:
        """The scored batch, the confidence scores taken from ``scoring_logprobs`` [B, T]
        (the step's pi_old, :attr:`lambdapo.behaviour.StepBehaviour.scoring_logprobs`). The
        first call waits for the rewards (and raises what they raised, e.g. RewardError);
        later calls return the same batch."""
        if self._result is None:
            start = time.perf_counter()
            try:
                self._result = self._finish(scoring_logprobs)
            finally:
                self._restore_threads()
                self.wait_time += time.perf_counter() - start
        return self._result

    def _restore_threads(self) -> None:
        if self._threads is not None:
            torch.set_num_threads(self._threads)
            self._threads = None

    def __enter__(self) -> "PendingScores":
        return self

    def __exit__(self, *exc) -> None:
        self._restore_threads()


class Scorer:
    """Rewards -> confidence scores -> advantages of a step's rollout.

    Args:
        rewards: the run's reward functions (``start(prompts, texts, ids, columns)``
            returning a call that gives (total, per_function)).
        correct: fn(per_function, prompts, texts, ids, columns) -> the math-verify reward
            of each response.
        decode: token ids -> texts.
        columns: fn(rows, G) -> the dataset columns aligned with the responses.
        estimator: the advantage estimator's name; settings: the lambda settings.
        background_workers: worker processes the rewards keep busy (threads are yielded
            to them on a CPU).
    """

    def __init__(self, rewards, correct: Callable, decode: Callable[[list[list[int]]], list[str]],
                 columns: Callable[[list[dict], int], dict], *, estimator: str,
                 settings: LambdaSettings, background_workers: int = 0):
        self.rewards = rewards
        self.correct = correct
        self.decode = decode
        self.columns = columns
        self.estimator = estimator
        self.settings = settings
        self.background_workers = background_workers

    def start(self, batch: RolloutBatch, rows: list[dict]) -> PendingScores:
        """Starts the rewards of ``batch`` (the responses to ``rows``)."""
        g = batch.group_size
        texts = self.decode(batch.completion_ids)
        prompts = [row["prompt"] for row in rows for _ in range(g)]
        columns = self.columns(rows, g)
        finish_rewards = self.rewards.start(prompts, texts, batch.completion_ids, columns)
        threads = None
        if batch.response_ids.device.type == "cpu" and self.background_workers > 0:
            threads = torch.get_num_threads()
            torch.set_num_threads(max(1, threads - self.background_workers))

        def finish(scoring_logprobs: Tensor) -> ScoredBatch:
            scores = sequence_scores(scoring_logprobs, batch.response_mask.float(),
                                     self.settings.score)
            total, per_function = finish_rewards()
            correct = self.correct(per_function, prompts, texts, batch.completion_ids, columns)
            rewards = torch.tensor(total, dtype=torch.float32, device=scores.device)
            advantages = compute_advantages(rewards.view(-1, g), scores.view(-1, g),
                                            self.estimator, self.settings).view(-1)
            return ScoredBatch(batch, rewards, scores, advantages, texts, per_function, correct)

        return PendingScores(finish, threads)
