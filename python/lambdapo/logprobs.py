"""Per-token log-probs (and entropies) of a micro-batch's responses under the policy,
through the fused ops of ``lambdapo_ext``.

When the model's output head is a plain linear layer, the decoder's final hidden states go
with the head's weight to ``lambdapo_ext.linear_token_logprobs``: no [N, V] logits tensor
is ever held. Models that transform their logits (soft-capping, scaling) run their own
forward, and ``lambdapo_ext.token_logprobs`` reads the logits.

The states the log-probs are read from come from a :data:`PredictionStates` function:
:func:`plain_prediction_states` runs every response with its prompt as one sequence;
:func:`lambdapo.prompt_sharing.shared_prompt_states` runs each distinct prompt once.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

import lambdapo_ext

from .batch import MicroBatch
from .models import autocast_context
from .padding import positions_of, scatter_response

PredictionStates = Callable[[nn.Module, MicroBatch, Callable], Tensor]
"""fn(network, micro, read) -> [b, T, ...] the states from which response token t of each
row is predicted (the prompt's last position for t = 0, response position t - 1 after it);
``read`` picks the states (hidden states or logits) out of a forward's output."""


def plain_linear_head(model) -> nn.Linear | None:
    """The model's output head when it is a plain linear layer on the decoder's states (no
    soft-capping or scaling of the logits), else None."""
    head = model.get_output_embeddings()
    cfg = model.config
    transformed = any(getattr(cfg, name, None) not in (None, 1.0, 0)
                      for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    if isinstance(head, nn.Linear) and not transformed and hasattr(model, "get_decoder"):
        return head
    return None


def masked_rows(x: Tensor, mask: Tensor) -> Tensor:
    """``x[mask]`` for ``x`` [b, T, ...] and a bool ``mask`` [b, T], as an ``index_select``:
    its backward is an ``index_add_``, where boolean indexing's is an accumulating
    ``index_put_`` that took 3-10x longer on the CPU, and longer with two threads than with
    one."""
    return x.flatten(0, 1).index_select(0, mask.flatten().nonzero().squeeze(1))


def response_attention(micro: MicroBatch) -> tuple[Tensor, Tensor]:
    """(attention mask [b, Lp + T - 1] over each row's prompt and response inputs, position
    ids [b, T - 1] of the response inputs)."""
    positions = positions_of(micro.prompt_mask)
    width = micro.width
    mask = torch.cat([micro.prompt_mask[micro.prompt_of_row],
                      micro.response_mask[:, :width - 1].long()], 1)
    response_positions = (positions[micro.prompt_of_row, -1:] + 1
                          + torch.arange(width - 1, device=mask.device))
    return mask, response_positions


def plain_prediction_states(network: nn.Module, micro: MicroBatch, read: Callable) -> Tensor:
    """:data:`PredictionStates` with every row's prompt and response run as one sequence.
    Prompts are left-padded, so every prompt ends in the last column."""
    mask, response_positions = response_attention(micro)
    positions = positions_of(micro.prompt_mask)
    ids = torch.cat([micro.prompt_ids[micro.prompt_of_row],
                     micro.response_ids[:, :micro.width - 1]], 1)
    out = network(input_ids=ids, attention_mask=mask, position_ids=torch.cat(
        [positions[micro.prompt_of_row], response_positions], 1))
    return read(out)[:, micro.prompt_ids.shape[1] - 1:]


def head_inputs(model, head: nn.Linear, micro: MicroBatch, *,
                autocast: torch.dtype | None = None,
                states: PredictionStates = plain_prediction_states
                ) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """What the plain linear ``head`` of ``model`` reads for the micro-batch's response
    tokens: ``(hidden [N, H], weight [V, H], bias [V] or None, targets [N])``, N the
    response tokens in row-major order of ``micro.response_mask``, in the autocast dtype
    when there is one (differentiable w.r.t. the model's parameters). Call it inside
    ``autocast_context(device, autocast)``."""
    predicted = states(model.get_decoder(), micro, lambda out: out.last_hidden_state)
    predicted = masked_rows(predicted, micro.response_mask)
    weight = head.weight
    if autocast is not None:
        predicted, weight = predicted.to(autocast), weight.to(autocast)
    bias = head.bias.to(weight.dtype) if head.bias is not None else None
    return predicted, weight, bias, micro.response_ids[micro.response_mask]


def response_logprobs(model, micro: MicroBatch, temperature: float, *,
                      autocast: torch.dtype | None = None,
                      states: PredictionStates = plain_prediction_states
                      ) -> tuple[Tensor, Tensor]:
    """Log-probs and entropies [b, T] (zero off the response) of the micro-batch's response
    tokens under ``softmax(logits / temperature)``; differentiable w.r.t. the model's
    parameters.

    Args:
        model: a transformers causal LM.
        micro: the rows, with their prompts.
        temperature: the sampling temperature the log-probs are taken at.
        autocast: the autocast dtype (None: float32).
        states: how the prediction states are computed (plain or prompt-shared).
    """
    mask = micro.response_mask
    head = plain_linear_head(model)
    with autocast_context(micro.response_ids.device, autocast):
        if head is not None:
            predicted, weight, bias, targets = head_inputs(model, head, micro,
                                                           autocast=autocast, states=states)
            lp, entropy = lambdapo_ext.linear_token_logprobs(
                predicted, weight, targets, bias=bias, temperature=temperature,
                return_entropy=True)
        else:
            predicted = masked_rows(states(model, micro, lambda out: out.logits), mask)
            lp, entropy = lambdapo_ext.token_logprobs(predicted, micro.response_ids[mask],
                                                      temperature=temperature,
                                                      return_entropy=True)
    return scatter_response(lp, mask), scatter_response(entropy, mask)
