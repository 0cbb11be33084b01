"""Generation with the policy's own transformers model.

``TransformersEngine`` runs the trainer's model itself with a key-value cache, so it always
serves the current weights and needs no push; its samples come from the engine's seeded
generator (:class:`lambdapo.rollout.base.RolloutEngine`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..policy import autocast_context, cache_argument, cache_of
from .base import Rollout, RolloutEngine, SamplingParams


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
        self._cache_arg = cache_argument(model)

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
        cache = cache_of(out)
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
            cache = cache_of(out)
            next_position = next_position + 1
        finished = (lengths < params.max_new_tokens) | \
            (tokens.gather(1, (lengths - 1).unsqueeze(1)).squeeze(1) == self.eos)
        lengths, finished = lengths.tolist(), finished.tolist()
        tokens, token_logprobs = tokens.tolist(), token_logprobs.tolist()
        return ([row[:n] for row, n in zip(tokens, lengths)],
                [row[:n] for row, n in zip(token_logprobs, lengths)], finished)
