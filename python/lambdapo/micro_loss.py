"""The loss of one micro-batch of the update: the policy loss fused with the lm-head where
it serves, else the log-probs op and the loss in torch. Chosen once per run
(``algorithm.fused_policy_loss``) and logged with its reason.

The fused op (``lambdapo_ext.linear_policy_loss``, :func:`lambdapo.loss.fused_policy_loss`)
makes the lm-head's gradient in its forward: three matmuls where the unfused path
(``linear_token_logprobs``, which recomputes the logits in its backward) needs four, and no
``[N, V]`` logits. It must have everything the loss reads besides the log-probs first:
pi_old, the advantages, the rollout-correction weights and the reference's log-probs. So
it serves when

* the model's output head is a plain linear layer (:func:`lambdapo.logprobs.plain_linear_head`:
  not soft-capped or scaled, not wrapped by an adapter), tied to the embedding or not; and
* the behaviour source gives the loss's inputs before the log-probs: always with a separate
  forward; with pi_old from the update's own forward only without rollout correction
  (``algorithm.rollout_is=none``), since the correction weights ``min(exp(pi_old - mu), cap)``
  are then functions of the log-probs the op computes.

Every estimator and every ``loss_agg_mode`` is served (the aggregation is per-token
weights, the correction weights scale the advantages); the ratio is per token. With several
processes the fused loss, like the unfused log-probs, runs inside the policy's FSDP2 or DDP
wrapper (``policy(fn)``), whose hooks gather the head's weight and reduce its gradient.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

from torch import Tensor, nn

from .batch import MicroBatch
from .behaviour import BehaviourSource, LogprobFn, StepBehaviour
from .config import allowed_values
from .logprobs import PredictionStates, head_inputs, plain_linear_head
from .loss import BatchTotals, fused_policy_loss, policy_loss
from .models import autocast_context

if TYPE_CHECKING:
    from .config import TrainConfig

log = logging.getLogger(__name__)


def fused_loss_blocker(model: nn.Module, behaviour: BehaviourSource) -> str | None:
    """Why the fused policy loss cannot serve a run of ``model`` with this behaviour source,
    or None when it can."""
    if plain_linear_head(model) is None:
        return ("the model's output head is not a plain linear layer (its logits are "
                "transformed, or an adapter wraps it)")
    if behaviour.loss_needs_logprobs_first:
        return ("the rollout-correction weights come from the update's own log-probs (pi_old "
                "from the update's forward); algorithm.rollout_is=none would let it serve")
    return None


class MicroBatchLoss:
    """``loss_of(micro, behaviour, advantages, totals) -> (loss share, metric sums)`` of one
    micro-batch, fused or not (module docstring); the caller runs the backward.

    Args:
        model: the policy (a transformers causal LM).
        config: the run's settings (algorithm, rollout temperature).
        fused: whether the fused policy loss is used (see :meth:`for_run`).
        autocast: the autocast dtype (None: float32).
        policy: runs ``fn()`` in the policy's forward (``policy(fn)``: its FSDP2 or DDP
            wrapper with several processes, a direct call with one).
        prediction_states: the training forward's prediction states of a micro-batch
            (prompt-shared or plain).
        policy_logprobs: the unfused path's log-probs and entropies of a micro-batch.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, *, fused: bool, autocast,
                 policy: Callable[[Callable[[], Any]], Any],
                 prediction_states: Callable[[MicroBatch], PredictionStates],
                 policy_logprobs: LogprobFn):
        self.model = model
        self.config = config
        self.fused = fused
        self.autocast = autocast
        self.policy = policy
        self.prediction_states = prediction_states
        self.policy_logprobs = policy_logprobs

    @classmethod
    def for_run(cls, model: nn.Module, config: TrainConfig, behaviour: BehaviourSource, *,
                autocast, policy: Callable[[Callable[[], Any]], Any],
                prediction_states: Callable[[MicroBatch], PredictionStates],
                policy_logprobs: LogprobFn) -> "MicroBatchLoss":
        """The run's micro-batch loss, fused per ``config.algorithm.fused_policy_loss``
        (``auto``: wherever it serves; ``on``: an error where it does not; ``off``: never);
        logs the choice and its reason once. The other arguments: as the class's.

        Raises:
            ValueError: ``fused_policy_loss`` is not auto, on or off, or is ``on`` where the
                fused loss cannot serve (the message says why).
        """
        mode = config.algorithm.fused_policy_loss
        modes = allowed_values("algorithm.fused_policy_loss")
        if mode not in modes:
            raise ValueError(f"config algorithm.fused_policy_loss: {mode!r} is not one of "
                             f"{modes}")
        blocker = ("algorithm.fused_policy_loss=off" if mode == "off" else
                   fused_loss_blocker(model, behaviour))
        if blocker is not None and mode == "on":
            raise ValueError(f"config algorithm.fused_policy_loss=on: the fused policy loss "
                             f"cannot serve this run: {blocker}")
        if blocker is None:
            log.info("policy loss: fused with the lm-head (lambdapo_ext.linear_policy_loss)")
        else:
            log.info("policy loss: unfused (linear_token_logprobs and the loss in torch): %s",
                     blocker)
        return cls(model, config, fused=blocker is None, autocast=autocast, policy=policy,
                   prediction_states=prediction_states, policy_logprobs=policy_logprobs)

    def __call__(self, micro: MicroBatch, behaviour: StepBehaviour,
                 advantages: Callable[[], Tensor], totals: BatchTotals
                 ) -> tuple[Tensor, dict[str, float]]:
        """The loss share of ``micro`` in its mini-batch (``totals``) and the metric sums of
        :func:`lambdapo.loss.policy_loss`. ``advantages()`` gives the batch's [B]
        advantages; it is called after the micro-batch's decoder forward (the rewards may
        finish meanwhile)."""
        algo = self.config.algorithm
        settings = dict(clip_low=algo.clip_low, clip_high=algo.clip_high,
                        agg_mode=algo.loss_agg_mode, totals=totals, kl_coef=algo.kl_coef)
        if not self.fused:
            lp, entropy = self.policy_logprobs(micro)
            need = behaviour.for_micro(micro, lp, entropy)
            return policy_loss(lp, need.old_logprobs, advantages()[micro.rows],
                               micro.response_mask, ref_logprobs=need.ref_logprobs,
                               is_weights=need.is_weights, **settings)
        temperature = self.config.rollout.temperature
        states = self.prediction_states(micro)
        # Before the policy's forward: the reference's log-probs may need a forward of their
        # own (the adapter-disabled policy), which must not nest in it.
        need = behaviour.before_logprobs(micro)

        def fused():
            # Inside the policy's forward: with several processes its wrapper's hooks gather
            # the head's weight and reduce its gradient.
            with autocast_context(micro.response_ids.device, self.autocast):
                hidden, weight, bias, targets = head_inputs(
                    self.model, plain_linear_head(self.model), micro, autocast=self.autocast,
                    states=states)
                return fused_policy_loss(
                    hidden, weight, bias, targets, micro.response_mask,
                    advantages()[micro.rows], need.old_logprobs, temperature=temperature,
                    ref_logprobs=need.ref_logprobs, is_weights=need.is_weights, **settings)

        loss, lp, entropy, metrics = self.policy(fused)
        behaviour.record(micro, lp, entropy)
        return loss, metrics
