"""The prompt-shared training forward (``algorithm.share_prompt_forward``).

The G responses of a prompt share it: each distinct prompt of a micro-batch runs through
the model once, and its key-value cache, repeated for the rows that continue it
(differentiably), serves their responses. This saves (G - 1) prompt forwards and backwards
per group and gives the plain forward's log-probs to float rounding.

Limits: it needs a model whose forward accepts and returns a transformers key-value cache
that can be repeated per row (``batch_select_indices``) and whose positions follow the
attention mask as in Llama-family models; with gradient checkpointing the cache cannot be
kept across the two forwards, and packed sequences (several samples in one row) are not a
layout it builds. ``auto`` therefore checks once, on the first real micro-batch, that the
shared forward gives the plain forward's log-probs, and uses the plain forward otherwise;
``on`` skips that check, ``off`` always runs every response with its prompt. The choice and
its reason are logged once.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

import torch
from torch import Tensor, nn

from .batch import MicroBatch
from .hf_compat import cache_argument, cache_of, select_cache_rows
from .logprobs import (PredictionStates, plain_prediction_states, response_attention,
                       response_logprobs)
from .padding import positions_of

SHARE_PROMPT_MODES = ("auto", "on", "off")

log = logging.getLogger(__name__)


def shared_prompt_states(network: nn.Module, micro: MicroBatch, read: Callable, *,
                         two_passes: bool = False) -> Tensor:
    """:data:`~lambdapo.logprobs.PredictionStates` with each distinct prompt run once and
    its key-value cache continued by every response of it. ``two_passes``: the network runs
    twice however long the responses are (with one-token responses, the second pass reads
    their token and adds nothing), so that every call runs the same modules as often: the
    processes of a sharded run must run the same collectives."""
    positions = positions_of(micro.prompt_mask)
    out = network(input_ids=micro.prompt_ids, attention_mask=micro.prompt_mask,
                  position_ids=positions, use_cache=True)
    last = read(out)[:, -1:].index_select(0, micro.prompt_of_row)
    if micro.width == 1 and not two_passes:
        return last
    cache = cache_of(out)
    select_cache_rows(cache, micro.prompt_of_row)
    if micro.width == 1:   # a pass whose states are not needed, with a zero gradient
        mask = torch.cat([micro.prompt_mask[micro.prompt_of_row],
                          torch.ones_like(micro.prompt_mask[micro.prompt_of_row, :1])], 1)
        position = positions[micro.prompt_of_row, -1:] + 1
        out = network(input_ids=micro.response_ids[:, :1], attention_mask=mask,
                      position_ids=position, use_cache=True,
                      **{cache_argument(network): cache})
        return last + 0.0 * read(out)
    mask, response_positions = response_attention(micro)
    out = network(input_ids=micro.response_ids[:, :micro.width - 1], attention_mask=mask,
                  position_ids=response_positions, use_cache=True,
                  **{cache_argument(network): cache})
    return torch.cat([last, read(out)], 1)


@torch.no_grad()
def prompt_sharing_agrees(model, micro: MicroBatch, temperature: float, *,
                          autocast: torch.dtype | None = None) -> bool:
    """Whether the shared-prompt forward gives this model's log-probs on ``micro``: some
    models' caches cannot be repeated per row, or their forward reads positions another
    way."""
    try:
        shared, _ = response_logprobs(model, micro, temperature, autocast=autocast,
                                      states=shared_prompt_states)
    except Exception:   # noqa: BLE001 - a cache without batch_select_indices, ...
        return False
    plain, _ = response_logprobs(model, micro, temperature, autocast=autocast)
    gap = (shared - plain).abs()[micro.response_mask]
    if autocast is None:   # float32: the two agree to rounding, token by token
        return bool(gap.max() <= 1e-3)
    # bfloat16: single tokens differ by up to ~0.15 between any two layouts, so the mean
    # decides (~0.01 on the built-in model; a wrong cache or positions give far more).
    return bool(gap.mean() <= 0.05)


class PromptSharing:
    """The training forward's :data:`~lambdapo.logprobs.PredictionStates`, chosen once
    from ``algorithm.share_prompt_forward`` (``auto`` checks the first micro-batch with
    :func:`prompt_sharing_agrees`) and logged with its reason. ``agree``: makes the check's
    verdict that of every process of a run (``all_true``: all of them must have seen the
    shared forward agree), so that all run the same forward.

    Raises:
        ValueError: an unknown mode.
    """

    def __init__(self, mode: str, *, gradient_checkpointing: bool = False,
                 agree: Callable[[bool], bool] = lambda verdict: verdict,
                 uniform_passes: bool = False):
        if mode not in SHARE_PROMPT_MODES:
            raise ValueError(f"algorithm.share_prompt_forward: {mode!r} is not one of "
                             f"{SHARE_PROMPT_MODES}")
        self.mode = mode
        self._agree = agree
        # Several processes: the shared forward runs the network twice on every call.
        self._shared = (functools.partial(shared_prompt_states, two_passes=True)
                        if uniform_passes else shared_prompt_states)
        self._states: PredictionStates | None = None
        if mode == "off":
            self._choose(plain_prediction_states, "share_prompt_forward=off")
        elif gradient_checkpointing:
            self._choose(plain_prediction_states, "gradient checkpointing recomputes each "
                         "forward, so a prompt's cache cannot serve its responses")
        elif mode == "on":
            self._choose(self._shared, "share_prompt_forward=on (not checked)")

    def states(self, model, micro: MicroBatch, temperature: float,
               autocast: torch.dtype | None) -> PredictionStates:
        """The chosen states function; in ``auto`` mode the first call checks ``micro``."""
        if self._states is None:
            was_training = model.training
            model.eval()
            try:
                agrees = prompt_sharing_agrees(model, micro, temperature, autocast=autocast)
            finally:
                model.train(was_training)
            if self._agree(agrees):
                self._choose(self._shared, "its log-probs equal the plain forward's "
                             "on the first micro-batch")
            else:
                self._choose(plain_prediction_states, "this model's key-value cache cannot be "
                             "shared between the responses of a prompt (the shared forward "
                             "disagreed with the plain one on the first micro-batch)")
        return self._states

    @property
    def shared(self) -> bool | None:
        """Whether the prompt-shared forward is in use (None: not decided yet)."""
        return None if self._states is None else self._states is self._shared

    def _choose(self, states: PredictionStates, reason: str) -> None:
        self._states = states
        kind = "prompt-shared" if states is self._shared else "plain"
        log.info("training forward: %s (%s)", kind, reason)
