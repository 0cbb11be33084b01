"""Generation backends behind one interface.

An engine samples ``n`` responses per prompt and returns them grouped (prompt p's
responses are rows p*n .. p*n+n-1) with the log-prob of every sampled token under the
*processed* distribution it was drawn from (logits / temperature, then top-k / top-p), the
convention of vLLM's processed log-probs.

``TransformersEngine`` runs the policy model itself with a key-value cache, so it always
serves the current weights; its sampling uses its own ``torch.Generator`` whose state is
part of a checkpoint (resumed runs draw the same samples). ``VLLMEngine``
(:mod:`lambdapo.rollout_vllm`) runs a colocated vLLM engine that gets the weights pushed
after every optimizer step. :func:`build_engine` picks one from ``rollout.engine``.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .config import TrainConfig
from .policy import autocast_context, autocast_dtype


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


class RolloutEngine(Protocol):
    name: str
    generator: torch.Generator   # draws the samples; evaluation reseeds it

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Rollout:
        """Samples ``params.n`` responses for each prompt."""

    def sync_weights(self) -> None:
        """Makes the engine serve the trainer's current weights."""

    def generator_state(self) -> Tensor:
        """The sampling RNG state (uint8 tensor), for checkpoints."""

    def set_generator_state(self, state: Tensor) -> None: ...

    def close(self) -> None:
        """Frees the engine's resources."""


def build_engine(config: TrainConfig, model, tokenizer, model_path: str) -> RolloutEngine:
    """The engine ``config.rollout.engine`` names (``auto``: vLLM when it imports, else
    transformers, with a warning if vLLM is installed but broken) around the trainer's
    ``model``; ``model_path`` is its folder.

    Raises:
        RolloutEngineError: ``vllm`` was asked for and cannot start (see VLLMEngine).
    """
    from .rollout_vllm import VLLMEngine, vllm_available, vllm_import_error

    rollout = config.rollout
    name = rollout.engine
    if name == "auto":
        error = vllm_import_error()
        if error is not None and vllm_available():
            warnings.warn(f"rollout.engine=auto: vLLM is installed but {error}; generating "
                          f"with transformers", RuntimeWarning, stacklevel=2)
        name = "vllm" if error is None else "transformers"
    if name == "transformers":
        return TransformersEngine(model, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                  seed=config.seed, autocast_dtype=autocast_dtype(config.model))
    max_len = rollout.max_model_len or min(
        config.data.max_prompt_tokens + rollout.max_new_tokens,
        getattr(model.config, "max_position_embeddings", None) or 1 << 30)
    return VLLMEngine(model, model_path, eos_token_id=tokenizer.eos_token_id, seed=config.seed,
                      dtype=config.model.dtype, max_model_len=max_len,
                      gpu_memory_utilization=rollout.gpu_memory_utilization,
                      kv_cache_bytes=int(rollout.kv_cache_gb * 2**30),
                      sleep_level=rollout.sleep_level, bucket_mb=rollout.weight_bucket_mb,
                      trust_remote_code=config.model.trust_remote_code)


def process_logits(logits: Tensor, params: SamplingParams) -> Tensor:
    """Log-probs [B, V] of the distribution sampled from: temperature, then top-k, then
    top-p (the smallest set of tokens with mass >= top_p); removed tokens get -inf."""
    logits = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep a token while the mass before it is < top_p (the first is always kept).
        drop_sorted = probs.cumsum(-1) - probs >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


class TransformersEngine:
    """Sampling with the policy's own transformers model (key-value cache, batched)."""

    name = "transformers"

    def __init__(self, model, eos_token_id: int, pad_token_id: int, *, seed: int = 0,
                 batch_size: int = 256, autocast_dtype: torch.dtype | None = None):
        self.model = model
        self.eos = eos_token_id
        self.pad = pad_token_id
        self.batch_size = batch_size
        self.autocast_dtype = autocast_dtype
        device = next(model.parameters()).device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        # transformers renamed past_key_values to cache (5.x); accept either.
        forward_args = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward_args else "past_key_values"

    def sync_weights(self) -> None:
        """Nothing to do: the engine runs the trainer's model."""

    def close(self) -> None:
        """Nothing to free: the model belongs to the trainer."""

    def generator_state(self) -> Tensor:
        return self.generator.get_state()

    def set_generator_state(self, state: Tensor) -> None:
        self.generator.set_state(state)

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Rollout:
        completions, logprobs, finished = [], [], []
        was_training = self.model.training
        self.model.eval()
        per_batch = max(1, self.batch_size // params.n)   # whole groups per batch
        try:
            for start in range(0, len(prompt_ids), per_batch):
                c, lp, f = self._generate_batch(prompt_ids[start:start + per_batch], params)
                completions += c
                logprobs += lp
                finished += f
        finally:
            self.model.train(was_training)
        return Rollout(completions, logprobs, finished)

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams):
        """Samples ``params.n`` responses for each of ``prompts``: the prompts are run once
        (prefill) and their cache repeated, then rows p*n .. p*n+n-1 decode prompt p."""
        device = self.generator.device
        longest, batch = max(len(p) for p in prompts), len(prompts) * params.n
        width = longest + params.max_new_tokens
        # Left padding: every row's next token is at the same column. The attention mask is
        # allocated for the whole generation once and filled column by column.
        input_ids = torch.tensor([[self.pad] * (longest - len(p)) + p for p in prompts])
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, ids in enumerate(prompts):
            attention[i, longest - len(ids):longest] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        positions = (attention[:, :longest].cumsum(-1) - 1).clamp(min=0)
        tokens = torch.full((batch, params.max_new_tokens), self.pad, dtype=torch.long,
                            device=device)
        token_logprobs = torch.zeros((batch, params.max_new_tokens), device=device)
        lengths = torch.full((batch,), params.max_new_tokens, dtype=torch.long, device=device)
        # Rows still decoding, in the order of the cache's rows: finished rows leave the
        # batch (and the cache) instead of being computed until the longest one ends.
        active = torch.arange(batch, device=device)
        with autocast_context(device, self.autocast_dtype):
            out = self.model(input_ids=input_ids, attention_mask=attention[:, :longest],
                             position_ids=positions, use_cache=True, logits_to_keep=1)
        cache = _cache_of(out)
        logits = out.logits[:, -1]
        if params.n > 1:
            cache.batch_repeat_interleave(params.n)
            logits = logits.repeat_interleave(params.n, dim=0)
            attention = attention.repeat_interleave(params.n, dim=0)
            positions = positions.repeat_interleave(params.n, dim=0)
        next_position = positions[:, -1:] + 1
        for t in range(params.max_new_tokens):
            if t:
                logits = out.logits[:, -1]
            if params.temperature == 0:
                logp = torch.log_softmax(logits.float(), dim=-1)
                next_token = logp.argmax(-1)
            else:
                logp = process_logits(logits, params)
                next_token = torch.multinomial(logp.exp(), 1, generator=self.generator).squeeze(1)
            tokens[active, t] = next_token
            token_logprobs[active, t] = logp.gather(-1, next_token.unsqueeze(-1)).squeeze(-1)
            if t + 1 == params.max_new_tokens:
                break
            ended = next_token == self.eos
            if bool(ended.any()):
                lengths[active[ended]] = t + 1
                keep = (~ended).nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                active, next_token = active[keep], next_token[keep]
                attention, next_position = attention[keep], next_position[keep]
                cache.batch_select_indices(keep)
            attention[:, longest + t] = 1
            with autocast_context(device, self.autocast_dtype):
                out = self.model(input_ids=next_token.unsqueeze(-1),
                                 attention_mask=attention[:, :longest + t + 1],
                                 position_ids=next_position, use_cache=True, logits_to_keep=1,
                                 **{self._cache_arg: cache})
            cache = _cache_of(out)
            next_position = next_position + 1
        finished = (lengths < params.max_new_tokens) | \
            (tokens.gather(1, (lengths - 1).unsqueeze(1)).squeeze(1) == self.eos)
        lengths, finished = lengths.tolist(), finished.tolist()
        tokens, token_logprobs = tokens.tolist(), token_logprobs.tolist()
        return ([row[:n] for row, n in zip(tokens, lengths)],
                [row[:n] for row, n in zip(token_logprobs, lengths)], finished)
