"""Where the behaviour policy's log-probs (pi_old) of a step come from: a small strategy.

PPO's ratio needs pi_old, the log-probs of the sampled tokens under the policy that sampled
them, and LambdaPO's confidence scores need them before the update. Two sources:

* :class:`SeparateForward`: a no-grad forward over the whole batch before the update, with
  the reference's log-probs (KL), the entropy and the rollout-correction weights of the
  trainer's log-probs over the engine's. Needed when the update takes several optimizer
  steps per batch (``ppo_epochs`` or ``mini_batches`` > 1: later micro-batches see updated
  weights) or when the scores cannot wait and the engine's log-probs are not the trainer's.
* :class:`UpdateForward`: pi_old is each micro-batch's own (detached) log-probs in the
  update (one optimizer step per batch: on-policy, as TRL does without vLLM); the
  reference's log-probs and the correction weights are made per micro-batch. The scores,
  needed before the update, come from the engine's log-probs, so this source serves when the
  estimator does not read scores or the engine's numbers are the trainer's (the transformers
  engine on the policy itself in float32, sampling the unprocessed distribution).

:func:`choose_behaviour_source` picks one for a run; each step gets a :class:`StepBehaviour`
from it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from .batch import MicroBatch, RolloutBatch
from .loss import rollout_is_weights

log = logging.getLogger(__name__)

LogprobFn = Callable[[MicroBatch], tuple[Tensor, Tensor]]
"""fn(micro) -> (log-probs [b, T], entropies [b, T]) of the micro-batch's responses."""
MicroBatches = Callable[[RolloutBatch, list[int]], list[MicroBatch]]
"""fn(batch, rows) -> the micro-batches that cover ``rows``."""


@dataclass(frozen=True)
class CorrectionSettings:
    """Rollout correction: ``level`` (token | sequence | none) and the weight's ``cap``."""
    level: str
    cap: float


@dataclass(frozen=True)
class MicroBehaviour:
    """What the loss of one micro-batch needs besides its log-probs ([b, T] each);
    ``old_logprobs`` None (only from :meth:`StepBehaviour.before_logprobs`): pi_old is the
    micro-batch's own detached log-probs, the on-policy ratio 1."""
    old_logprobs: Tensor | None
    is_weights: Tensor | None
    ref_logprobs: Tensor | None


class StepBehaviour:
    """pi_old of one step's batch: the log-probs its confidence scores are taken from
    (:attr:`scoring_logprobs`), what each micro-batch's loss needs (:meth:`for_micro`), and
    the step's behaviour metrics (:meth:`metrics`: mean entropy and the engine-trainer
    mismatch)."""

    scoring_logprobs: Tensor   # [B, T]

    def for_micro(self, micro: MicroBatch, logprobs: Tensor, entropy: Tensor) -> MicroBehaviour:
        raise NotImplementedError

    def before_logprobs(self, micro: MicroBatch) -> MicroBehaviour:
        """What the loss of ``micro`` needs, known before its log-probs are (the fused
        policy loss takes it as input); :meth:`record` then takes the log-probs. Only for
        sources whose ``loss_needs_logprobs_first`` is False."""
        raise NotImplementedError

    def record(self, micro: MicroBatch, logprobs: Tensor, entropy: Tensor) -> None:
        """Takes the update's log-probs and entropies of ``micro`` [b, T] (no grad) after a
        :meth:`before_logprobs`."""
        raise NotImplementedError

    def metrics(self) -> dict[str, float]:
        raise NotImplementedError


def _entropy_metric(entropy: Tensor, mask: Tensor) -> dict[str, float]:
    return {"entropy": float((entropy * mask).sum() / max(int(mask.sum()), 1))}


class _Precomputed(StepBehaviour):
    """pi_old and the rest from a forward of the whole batch before the update."""

    def __init__(self, batch: RolloutBatch, old: Tensor, entropy: Tensor, ref: Tensor | None,
                 correction: CorrectionSettings):
        self.scoring_logprobs = old
        self._entropy = entropy
        self._ref = ref
        self._mask = batch.response_mask
        self._weights, self._mismatch = rollout_is_weights(
            old, batch.engine_logprobs, batch.response_mask, level=correction.level,
            cap=correction.cap)

    def for_micro(self, micro: MicroBatch, logprobs: Tensor, entropy: Tensor) -> MicroBehaviour:
        return self.before_logprobs(micro)

    def before_logprobs(self, micro: MicroBatch) -> MicroBehaviour:
        rows, width = micro.rows, micro.width
        return MicroBehaviour(
            self.scoring_logprobs[rows, :width],
            None if self._weights is None else self._weights[rows, :width],
            None if self._ref is None else self._ref[rows, :width])

    def record(self, micro: MicroBatch, logprobs: Tensor, entropy: Tensor) -> None:
        """Nothing to keep: pi_old and the entropies came from the separate forward."""

    def metrics(self) -> dict[str, float]:
        return {**_entropy_metric(self._entropy, self._mask), **self._mismatch}


class SeparateForward:
    """pi_old from a no-grad forward of the whole batch before the update (module
    docstring)."""

    name = "separate forward"
    loss_needs_logprobs_first = False
    """What a micro-batch's loss needs is known before its log-probs (see
    :meth:`StepBehaviour.before_logprobs`)."""

    def __init__(self, model: nn.Module, policy: LogprobFn,
                 reference: Callable[[MicroBatch], Tensor] | None, micro_batches: MicroBatches,
                 correction: CorrectionSettings):
        self.model = model
        self.policy = policy
        self.reference = reference
        self.micro_batches = micro_batches
        self.correction = correction

    @torch.no_grad()
    def prepare(self, batch: RolloutBatch) -> StepBehaviour:
        """Runs the forward of every row now."""
        old = torch.zeros_like(batch.engine_logprobs)
        entropy = torch.zeros_like(old)
        ref = torch.zeros_like(old) if self.reference is not None else None
        was_training = self.model.training
        self.model.eval()
        try:
            for micro in self.micro_batches(batch, list(range(batch.size))):
                lp, h = self.policy(micro)
                old[micro.rows, :micro.width] = lp
                entropy[micro.rows, :micro.width] = h
                if ref is not None:
                    ref[micro.rows, :micro.width] = self.reference(micro)
        finally:
            self.model.train(was_training)
        return _Precomputed(batch, old, entropy, ref, self.correction)


class _FromUpdate(StepBehaviour):
    """pi_old of each micro-batch from its own forward in the update."""

    def __init__(self, batch: RolloutBatch, reference: Callable[[MicroBatch], Tensor] | None,
                 correction: CorrectionSettings):
        self.scoring_logprobs = batch.engine_logprobs
        self._batch = batch
        self._reference = reference
        self._correction = correction
        self._seen_logprobs = torch.zeros_like(batch.engine_logprobs)
        self._seen_entropy = torch.zeros_like(batch.engine_logprobs)

    def for_micro(self, micro: MicroBatch, logprobs: Tensor, entropy: Tensor) -> MicroBehaviour:
        old = logprobs.detach()
        self.record(micro, old, entropy.detach())
        weights, _ = rollout_is_weights(old, self._batch.engine_logprobs[micro.rows, :micro.width],
                                        micro.response_mask, level=self._correction.level,
                                        cap=self._correction.cap)
        return MicroBehaviour(old, weights, self._reference_of(micro))

    def before_logprobs(self, micro: MicroBatch) -> MicroBehaviour:
        if self._correction.level != "none":
            raise RuntimeError("the rollout-correction weights of the update's own forward "
                               "need its log-probs first (UpdateForward.loss_needs_logprobs_first)")
        return MicroBehaviour(None, None, self._reference_of(micro))

    def record(self, micro: MicroBatch, logprobs: Tensor, entropy: Tensor) -> None:
        self._seen_logprobs[micro.rows, :micro.width] = logprobs
        self._seen_entropy[micro.rows, :micro.width] = entropy

    def _reference_of(self, micro: MicroBatch) -> Tensor | None:
        if self._reference is None:
            return None
        with torch.no_grad():
            return self._reference(micro)

    def metrics(self) -> dict[str, float]:
        _, mismatch = rollout_is_weights(self._seen_logprobs, self._batch.engine_logprobs,
                                         self._batch.response_mask,
                                         level=self._correction.level, cap=self._correction.cap)
        return {**_entropy_metric(self._seen_entropy, self._batch.response_mask), **mismatch}


class UpdateForward:
    """pi_old from the update's own forward (module docstring)."""

    name = "the update's own forward"

    def __init__(self, reference: Callable[[MicroBatch], Tensor] | None,
                 correction: CorrectionSettings):
        self.reference = reference
        self.correction = correction

    @property
    def loss_needs_logprobs_first(self) -> bool:
        """True when rollout correction is on: its weights are taken from the update's own
        log-probs, so the loss needs them before it can be formed."""
        return self.correction.level != "none"

    def prepare(self, batch: RolloutBatch) -> StepBehaviour:
        """Nothing runs now: the update fills the step's pi_old in as it goes."""
        return _FromUpdate(batch, self.reference, self.correction)


BehaviourSource = SeparateForward | UpdateForward


def update_can_be_behaviour(*, single_step: bool, uses_scores: bool,
                            engine_exact: bool) -> tuple[bool, str]:
    """(whether :class:`UpdateForward` serves, why): ``single_step`` when the update takes
    one optimizer step per batch, ``uses_scores`` when the estimator reads confidence
    scores, ``engine_exact`` when the engine's log-probs are the trainer's numbers."""
    if not single_step:
        return False, "the update takes several optimizer steps per batch"
    if not uses_scores:
        return True, "one optimizer step per batch and an estimator without scores"
    if engine_exact:
        return True, ("one optimizer step per batch, and the engine's log-probs are the "
                      "trainer's")
    return False, ("the scores need pi_old before the update and the engine's log-probs are "
                   "not the trainer's")


def log_choice(source: BehaviourSource, reason: str) -> None:
    """Writes the chosen source and its reason to the log, once per run."""
    log.info("behaviour log-probs (pi_old): %s (%s)", source.name, reason)
