"""What every rollout engine shares: the sampling parameters, the rollout it returns, the
engine interface with its seeded sampling generator, and the engine error.

An engine samples ``n`` responses per prompt and returns them grouped (prompt p's responses
are rows p*n .. p*n+n-1) with the log-prob of every sampled token under the *processed*
distribution it was drawn from (logits / temperature, then top-k / top-p), the convention
of vLLM's processed log-probs. Its sampling draws from one ``torch.Generator`` whose state
is part of a checkpoint, so that a resumed run draws the same samples.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0    # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64


@dataclass
class Rollout:
    """Responses grouped by prompt: entry p*n + k is prompt p's k-th response."""
    completion_ids: list[list[int]]     # without padding; ends with EOS when finished
    logprobs: list[list[float]]         # sampled tokens' processed log-probs
    finished: list[bool]                # ended with EOS (else cut at max_new_tokens)

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)


class RolloutEngineError(RuntimeError):
    """An engine could not be built or failed to generate (the cause is in the message)."""


class RolloutEngine:
    """The interface of a generation backend. Subclasses set ``name`` and implement
    :meth:`generate`, :meth:`sync_weights` and :meth:`close`; the seeded generator and its
    checkpointed state are common to all."""

    name: str
    generator: torch.Generator   # draws the samples
    # Whether generate() runs the trainer's model itself (which must then hold its whole
    # weights while it generates, when it is sharded over several processes).
    generates_with_trainer_model: bool = False

    def __init__(self, seed: int, device: torch.device | str = "cpu"):
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Rollout:
        """Samples ``params.n`` responses for each prompt (temperature 0: greedy)."""
        raise NotImplementedError

    def sync_weights(self) -> None:
        """Makes the engine serve the trainer's current weights."""
        raise NotImplementedError

    def close(self) -> None:
        """Frees the engine's resources."""
        raise NotImplementedError

    def generator_state(self) -> Tensor:
        """The sampling RNG state (uint8 tensor), for checkpoints."""
        return self.generator.get_state()

    def set_generator_state(self, state: Tensor) -> None:
        self.generator.set_state(state)

    @contextlib.contextmanager
    def reseeded(self, seed: int) -> Iterator[None]:
        """Samples inside the block from ``seed``; the generator's state before the block is
        restored after it (evaluation does not shift training's samples)."""
        saved = self.generator_state()
        self.generator.manual_seed(seed)
        try:
            yield
        finally:
            self.set_generator_state(saved)
