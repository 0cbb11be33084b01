"""Generation with the policy's own transformers model.

``TransformersEngine`` runs the trainer's model itself with a key-value cache, so it always
serves the current weights and needs no push; its samples come from the engine's seeded
generator (:class:`lambdapo.rollout.base.RolloutEngine`). The prompts run once (prefill);
the decode steps run over preallocated key-value buffers
(:class:`~lambdapo.rollout.static_decode.StaticDecoder`) for the Llama-family models it
checks out on, else through transformers' own forward and cache.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..batch import left_padded
from ..policy import autocast_context, cache_argument, cache_of, positions_of
from . import static_decode
from .base import Rollout, RolloutEngine, SamplingParams
from .static_decode import StaticDecoder


def sample(probs: Tensor, generator: torch.Generator) -> Tensor:
    """One token per row of ``probs`` [B, V] (rows of non-negative weights): the algorithm
    and random stream of ``torch.multinomial(probs, 1)`` (the exponential race: argmax of
    probs / Exp(1) draws), without its per-call checks of the weights, which cost more than
    the draw here (the caller checks the sampled log-probs once per generation)."""
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax(-1)


def process_logits(logits: Tensor, params: SamplingParams) -> Tensor:
    """Log-probs [B, V] of the distribution sampled from: temperature, then top-k, then
    top-p (the smallest set of tokens with mass >= top_p); removed tokens get -inf."""
    logits = logits.float()
    if params.temperature != 1.0:
        logits = logits / params.temperature
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


class TransformersEngine(RolloutEngine):
    """Sampling with the policy's own transformers model (key-value cache, batched)."""

    name = "transformers"

    def __init__(self, model, eos_token_id: int, pad_token_id: int, *, seed: int = 0,
                 batch_size: int = 256, autocast_dtype: torch.dtype | None = None):
        self.model = model
        self.eos = eos_token_id
        self.pad = pad_token_id
        self.batch_size = batch_size
        self.autocast_dtype = autocast_dtype
        super().__init__(seed, next(model.parameters()).device)
        # Whether StaticDecoder serves this model, checked once on the first generation.
        self.static_decode: bool | None = None

    def sync_weights(self) -> None:
        """Nothing to do: the engine runs the trainer's model."""

    def close(self) -> None:
        """Nothing to free: the model belongs to the trainer."""

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
        batch = len(prompts) * params.n
        # Left padding: every row's next token is at the same column.
        input_ids, prompt_mask = left_padded(prompts, self.pad)
        input_ids, prompt_mask = input_ids.to(device), prompt_mask.to(device)
        tokens = torch.full((batch, params.max_new_tokens), self.pad, dtype=torch.long,
                            device=device)
        token_logprobs = torch.zeros((batch, params.max_new_tokens), device=device)
        lengths = torch.full((batch,), params.max_new_tokens, dtype=torch.long, device=device)
        # Rows still decoding, in the decoder's order: finished rows leave the batch.
        active = torch.arange(batch, device=device)
        with autocast_context(device, self.autocast_dtype):
            out = self.model(input_ids=input_ids, attention_mask=prompt_mask,
                             position_ids=positions_of(prompt_mask),
                             use_cache=True, logits_to_keep=1)
            cache = cache_of(out)
            logits = out.logits[:, -1]
            if params.n > 1:
                cache.batch_repeat_interleave(params.n)
                logits = logits.repeat_interleave(params.n, dim=0)
                prompt_mask = prompt_mask.repeat_interleave(params.n, dim=0)
            if self.static_decode is None:
                self.static_decode = static_decode.matches_model(
                    self.model, low_precision=self.autocast_dtype is not None)
            decoder_type = StaticDecoder if self.static_decode else _DynamicCacheDecoder
            decoder = decoder_type(self.model, cache, prompt_mask, params.max_new_tokens)
            for t in range(params.max_new_tokens):
                if params.temperature == 0:
                    logp = torch.log_softmax(logits.float(), dim=-1)
                    next_token = logp.argmax(-1)
                else:
                    logp = process_logits(logits, params)
                    next_token = sample(logp.exp(), self.generator)
                chosen = logp.gather(-1, next_token.unsqueeze(-1)).squeeze(-1)
                if active.numel() == batch:
                    tokens[:, t], token_logprobs[:, t] = next_token, chosen
                else:
                    tokens[:, t].index_copy_(0, active, next_token)
                    token_logprobs[:, t].index_copy_(0, active, chosen)
                if t + 1 == params.max_new_tokens:
                    break
                ended = next_token == self.eos
                if bool(ended.any()):
                    lengths[active[ended]] = t + 1
                    keep = (~ended).nonzero().squeeze(1)
                    if keep.numel() == 0:
                        break
                    active, next_token = active[keep], next_token[keep]
                    decoder.select(keep)
                logits = decoder.step(next_token)
        if not bool(torch.isfinite(token_logprobs).all()):
            raise RuntimeError("generation: a sampled token's log-prob is not finite: the "
                               "model's logits hold NaN or inf")
        finished = (lengths < params.max_new_tokens) | \
            (tokens.gather(1, (lengths - 1).unsqueeze(1)).squeeze(1) == self.eos)
        lengths, finished = lengths.tolist(), finished.tolist()
        tokens, token_logprobs = tokens.tolist(), token_logprobs.tolist()
        return ([row[:n] for row, n in zip(tokens, lengths)],
                [row[:n] for row, n in zip(token_logprobs, lengths)], finished)


class _DynamicCacheDecoder:
    """Decode steps through the model's own forward and transformers' cache: the path for
    models :class:`~lambdapo.rollout.static_decode.StaticDecoder` does not serve."""

    def __init__(self, model, cache, prompt_mask: Tensor, max_new_tokens: int):
        self.model = model
        self.cache = cache
        self.cache_arg = cache_argument(model)
        rows, self.width = prompt_mask.shape
        # Allocated for the whole generation once and filled column by column.
        self.attention = torch.cat([prompt_mask, prompt_mask.new_zeros(rows, max_new_tokens)], 1)
        self.positions = prompt_mask.sum(-1, keepdim=True)

    def select(self, keep: Tensor) -> None:
        self.attention, self.positions = self.attention[keep], self.positions[keep]
        self.cache.batch_select_indices(keep)

    def step(self, tokens: Tensor) -> Tensor:
        self.attention[:, self.width] = 1
        self.width += 1
        out = self.model(input_ids=tokens.unsqueeze(-1),
                         attention_mask=self.attention[:, :self.width],
                         position_ids=self.positions, use_cache=True, logits_to_keep=1,
                         **{self.cache_arg: self.cache})
        self.cache = cache_of(out)
        self.positions = self.positions + 1
        return out.logits[:, -1]
