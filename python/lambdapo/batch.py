"""One step's rollout as one immutable object on the policy's device, and its micro-batches.

:class:`RolloutBatch` is built once per step from the engine's :class:`~lambdapo.rollout.base.
Rollout`: the prompts (left-padded, one row per prompt) and the responses (right-padded, one
row per sample, prompt p's samples at rows p*G .. p*G+G-1) as device tensors, with the
engine's log-probs. Scoring does not change it: it makes a
:class:`~lambdapo.scoring.ScoredBatch` that holds it. :meth:`RolloutBatch.micro_batch` slices
rows out of it without a host-to-device copy of the data, and :func:`plan_micro_batches`
groups responses of similar lengths so that little padding is computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .padding import left_padded, right_padded
from .rollout.base import Rollout

# Cost of one more micro-batch in padded response tokens (its prompt pass, the launch of
# every layer): the partition below trades it against padding.
MICRO_BATCH_COST_TOKENS = 256


@dataclass(frozen=True)
class MicroBatch:
    """Rows of a :class:`RolloutBatch` with their prompts, ready for a forward pass.

    ``prompt_ids`` holds the distinct prompts of these rows (left-padded to their longest),
    ``prompt_of_row`` maps each row to its prompt there; ``response_ids`` is right-padded
    to the longest response of these rows."""
    rows: Tensor             # [b] long, row numbers in the rollout batch
    prompt_ids: Tensor       # [p, Lp] long
    prompt_mask: Tensor      # [p, Lp] long, 0 on left padding
    prompt_of_row: Tensor    # [b] long, index into prompt_ids
    response_ids: Tensor     # [b, T] long
    response_mask: Tensor    # [b, T] bool

    @property
    def width(self) -> int:
        return self.response_ids.shape[1]

    @classmethod
    def from_sequences(cls, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                       device: torch.device) -> "MicroBatch":
        """Row i is ``prompts[i]`` followed by ``responses[i]``; equal prompts are shared."""
        distinct = list(dict.fromkeys(tuple(p) for p in prompts))
        where = {p: i for i, p in enumerate(distinct)}
        prompt_ids, prompt_mask = left_padded(distinct, pad_id)
        response_ids, response_mask = right_padded(responses, pad_id)
        return cls(
            rows=torch.arange(len(responses), device=device),
            prompt_ids=prompt_ids.to(device), prompt_mask=prompt_mask.to(device),
            prompt_of_row=torch.tensor([where[tuple(p)] for p in prompts], device=device),
            response_ids=response_ids.to(device), response_mask=response_mask.to(device))


@dataclass(frozen=True)
class RolloutBatch:
    """The step's samples on the policy's device (``B = P * G`` rows, ``T`` the longest
    response). Built by :meth:`from_rollout`."""
    group_size: int
    prompt_lists: list[list[int]]      # P prompts' token ids (host)
    completion_ids: list[list[int]]    # B responses' token ids (host, unpadded)
    prompt_ids: Tensor                 # [P, Lp] long, left-padded
    prompt_mask: Tensor                # [P, Lp] long
    response_ids: Tensor               # [B, T] long, right-padded
    response_mask: Tensor              # [B, T] bool
    engine_logprobs: Tensor            # [B, T] float32, 0 off the response
    finished: list[bool]               # B: ended with EOS

    @classmethod
    def from_rollout(cls, prompts: list[list[int]], rollout: Rollout, group_size: int,
                     pad_id: int, device: torch.device) -> "RolloutBatch":
        """Pads ``prompts`` (P) and the rollout's B = P * group_size responses into device
        tensors, one host-to-device copy each.

        Raises:
            ValueError: the rollout does not hold ``group_size`` responses per prompt.
        """
        responses = rollout.completion_ids
        if len(responses) != len(prompts) * group_size:
            raise ValueError(f"rollout holds {len(responses)} responses for {len(prompts)} "
                             f"prompts x group_size {group_size}")
        prompt_ids, prompt_mask = left_padded(prompts, pad_id)
        response_ids, response_mask = right_padded(responses, pad_id)
        engine_lp, _ = right_padded(rollout.logprobs, 0.0, torch.float32)
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return cls(group_size, prompts, responses, move(prompt_ids), move(prompt_mask),
                   move(response_ids), move(response_mask), move(engine_lp),
                   list(rollout.finished))

    @property
    def size(self) -> int:
        return len(self.completion_ids)

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)

    def response_length(self, row: int) -> int:
        return len(self.completion_ids[row])

    def micro_batch(self, rows: list[int]) -> MicroBatch:
        """The rows ``rows`` (any order, no repeats needed) with their distinct prompts,
        cut to the longest prompt and response among them."""
        device = self.response_ids.device
        prompts = sorted({row // self.group_size for row in rows})
        local = {p: i for i, p in enumerate(prompts)}
        prompt_width = max(len(self.prompt_lists[p]) for p in prompts)
        width = max(max(self.response_length(r) for r in rows), 1)
        index = torch.tensor(rows, device=device)
        prompt_index = torch.tensor(prompts, device=device)
        cut = self.prompt_ids.shape[1] - prompt_width
        return MicroBatch(
            rows=index,
            prompt_ids=self.prompt_ids[prompt_index, cut:],
            prompt_mask=self.prompt_mask[prompt_index, cut:],
            prompt_of_row=torch.tensor([local[r // self.group_size] for r in rows],
                                       device=device),
            response_ids=self.response_ids[index, :width],
            response_mask=self.response_mask[index, :width])


def plan_micro_batches(lengths: list[int], rows: list[int], limit: int) -> list[list[int]]:
    """Splits ``rows`` into micro-batches of at most ``limit`` rows that compute little
    padding: the rows sorted by response length (``lengths[row]``) are cut where the sum
    over micro-batches of (rows x longest response + MICRO_BATCH_COST_TOKENS) is smallest
    (an exact dynamic programme, O(len(rows) * limit)). The loss is a sum of per-micro-batch
    shares, so the partition changes the work, not the result."""
    order = sorted(rows, key=lambda r: (lengths[r], r))
    n = len(order)
    best = [0.0] + [float("inf")] * n     # best[i]: cost of the first i sorted rows
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        longest = max(lengths[order[end - 1]], 1)   # sorted: the last row is the longest
        for start in range(max(0, end - limit), end):
            cost = best[start] + (end - start) * longest + MICRO_BATCH_COST_TOKENS
            if cost < best[end]:
                best[end], cut[end] = cost, start
    parts, end = [], n
    while end > 0:
        parts.append(order[cut[end]:end])
        end = cut[end]
    return parts[::-1]
