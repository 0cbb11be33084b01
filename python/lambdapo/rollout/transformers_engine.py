"""Generation with the policy's own transformers model.

``TransformersEngine`` runs the trainer's model itself, so it always serves the current
weights and needs no push; its samples come from the engine's seeded generator
(:class:`lambdapo.rollout.base.RolloutEngine`). Two decode paths
(``rollout.static_decode``):

* the project's own loop (:class:`~lambdapo.rollout.static_decode.StaticDecoder`): the
  prompts run once (prefill) and their cache is repeated per sample, then each step runs
  the model's modules over preallocated key-value buffers, finished rows leaving the batch;
  for the Llama-family models its probe accepts (``auto``: when the probe agrees with the
  model's own forward; ``on``: required, an error when the probe refuses);
* transformers' own ``generate`` (``off``, and every model the probe refuses), with a
  logits processor that applies the sampling parameters and records each sampled token's
  processed log-prob.

Which path runs, and why, is written to the log once.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from ..hf_compat import cache_of
from ..models import autocast_context
from ..padding import left_padded, positions_of
from . import static_decode
from .base import Rollout, RolloutEngine, RolloutEngineError, SamplingParams
from .static_decode import StaticDecoder

STATIC_DECODE_MODES = ("auto", "on", "off")

log = logging.getLogger(__name__)


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


def _greedy_or_processed(logits: Tensor, params: SamplingParams) -> Tensor:
    if params.temperature == 0:
        return torch.log_softmax(logits.float(), dim=-1)
    return process_logits(logits, params)


class TransformersEngine(RolloutEngine):
    """Sampling with the policy's own transformers model (module docstring).

    Raises:
        ValueError: an unknown ``static_decode`` mode.
        RolloutEngineError: ``static_decode="on"`` and the project's loop does not serve
            the model (at the first generation).
    """

    name = "transformers"
    generates_with_trainer_model = True

    def __init__(self, model, eos_token_id: int, pad_token_id: int, *, seed: int = 0,
                 batch_size: int = 256, autocast_dtype: torch.dtype | None = None,
                 static_decode: str = "auto"):
        if static_decode not in STATIC_DECODE_MODES:
            raise ValueError(f"rollout.static_decode: {static_decode!r} is not one of "
                             f"{STATIC_DECODE_MODES}")
        self.model = model
        self.eos = eos_token_id
        self.pad = pad_token_id
        self.batch_size = batch_size
        self.autocast_dtype = autocast_dtype
        self.static_decode_mode = static_decode
        super().__init__(seed, next(model.parameters()).device)
        # Whether the project's loop serves this model: decided on the first generation.
        self.static_decode: bool | None = False if static_decode == "off" else None
        if static_decode == "off":
            log.info("generation: transformers' generate (rollout.static_decode=off)")

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
            if self.static_decode is None:
                self.static_decode = self._decide_static_decode()
            run = self._decode_static if self.static_decode else self._generate_transformers
            for start in range(0, len(prompt_ids), per_batch):
                with autocast_context(self.generator.device, self.autocast_dtype):
                    tokens, token_logprobs = run(prompt_ids[start:start + per_batch], params)
                c, lp, f = self._cut(tokens, token_logprobs, params.max_new_tokens)
                completions += c
                logprobs += lp
                finished += f
        finally:
            self.model.train(was_training)
        return Rollout(completions, logprobs, finished)

    def _decide_static_decode(self) -> bool:
        low_precision = self.autocast_dtype is not None
        refusal = static_decode.refusal(self.model, low_precision=low_precision)
        if refusal is None:
            log.info("generation: the project's decode loop over preallocated key-value "
                     "buffers (rollout.static_decode=%s; its probe agrees with the model's "
                     "forward)", self.static_decode_mode)
            return True
        if self.static_decode_mode == "on":
            raise RolloutEngineError(f"rollout.static_decode=on: the project's decode loop "
                                     f"does not serve this model ({refusal}); use auto or off")
        log.info("generation: transformers' generate (rollout.static_decode=auto; the "
                 "project's decode loop refused this model: %s)", refusal)
        return False

    def _decode_static(self, prompts: list[list[int]], params: SamplingParams
                       ) -> tuple[Tensor, Tensor]:
        """Samples ``params.n`` responses for each of ``prompts`` with the project's loop:
        (tokens [B, max_new], their log-probs [B, max_new]); rows p*n .. p*n+n-1 continue
        prompt p, and a row's columns after its EOS hold padding."""
        device = self.generator.device
        batch = len(prompts) * params.n
        # Left padding: every row's next token is at the same column.
        input_ids, prompt_mask = left_padded(prompts, self.pad)
        input_ids, prompt_mask = input_ids.to(device), prompt_mask.to(device)
        tokens = torch.full((batch, params.max_new_tokens), self.pad, dtype=torch.long,
                            device=device)
        token_logprobs = torch.zeros((batch, params.max_new_tokens), device=device)
        # Rows still decoding, in the decoder's order: finished rows leave the batch.
        active = torch.arange(batch, device=device)
        out = self.model(input_ids=input_ids, attention_mask=prompt_mask,
                         position_ids=positions_of(prompt_mask), use_cache=True, logits_to_keep=1)
        cache = cache_of(out)
        logits = out.logits[:, -1]
        if params.n > 1:
            cache.batch_repeat_interleave(params.n)
            logits = logits.repeat_interleave(params.n, dim=0)
            prompt_mask = prompt_mask.repeat_interleave(params.n, dim=0)
        decoder = StaticDecoder(self.model, cache, prompt_mask, params.max_new_tokens)
        for t in range(params.max_new_tokens):
            logp = _greedy_or_processed(logits, params)
            if params.temperature == 0:
                next_token = logp.argmax(-1)
            else:
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
                keep = (~ended).nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                active, next_token = active[keep], next_token[keep]
                decoder.select(keep)
            logits = decoder.step(next_token)
        return tokens, token_logprobs

    def _generate_transformers(self, prompts: list[list[int]], params: SamplingParams
                               ) -> tuple[Tensor, Tensor]:
        """:meth:`_decode_static`'s outputs from transformers' ``generate``, sampling with
        the torch generator forked and seeded from the engine's."""
        from transformers import GenerationConfig, LogitsProcessorList

        device = self.generator.device
        input_ids, prompt_mask = left_padded(prompts, self.pad)
        recorder = _SampledLogprobs(params)
        # Greedy samples of one prompt are all the same: transformers makes one, copied below.
        copies = params.n if params.temperature == 0 else 1
        # Every sampling setting explicit: nothing is taken from the model's own
        # generation_config, whose defaults (repetition penalty, top-k ...) would change
        # the distribution the trainer's log-probs are compared with.
        config = GenerationConfig(
            do_sample=params.temperature > 0, temperature=1.0, top_k=0, top_p=1.0,
            min_p=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
            repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0,
            max_new_tokens=params.max_new_tokens, num_return_sequences=params.n // copies,
            eos_token_id=self.eos, pad_token_id=self.pad, renormalize_logits=False,
            return_dict_in_generate=False, output_scores=False)
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            try:
                sequences = self.model.generate(
                    input_ids=input_ids.to(device), attention_mask=prompt_mask.to(device),
                    generation_config=config, logits_processor=LogitsProcessorList([recorder]))
            except RuntimeError as exc:
                if "probability tensor contains" not in str(exc):
                    raise
                raise RuntimeError(f"generation: a sampling distribution is not finite: the "
                                   f"model's logits hold NaN or inf ({exc})") from None
        generated = sequences[:, input_ids.shape[1]:]
        token_logprobs = recorder.logprobs(generated)
        if copies > 1:
            generated = generated.repeat_interleave(copies, 0)
            token_logprobs = token_logprobs.repeat_interleave(copies, 0)
        width = params.max_new_tokens
        tokens = torch.full((generated.shape[0], width), self.pad, dtype=torch.long,
                            device=device)
        tokens[:, :generated.shape[1]] = generated
        padded = torch.zeros((generated.shape[0], width), device=device)
        padded[:, :token_logprobs.shape[1]] = token_logprobs
        return tokens, padded

    def _cut(self, tokens: Tensor, token_logprobs: Tensor, max_new_tokens: int):
        """Each row up to and including its first EOS: (token lists, log-prob lists,
        finished flags).

        Raises:
            RuntimeError: a kept token's log-prob is not finite (NaN or inf logits).
        """
        ended = tokens == self.eos
        first = torch.where(ended.any(1), ended.int().argmax(1),
                            torch.full_like(tokens[:, 0], max_new_tokens - 1))
        lengths = first + 1
        kept = torch.arange(tokens.shape[1], device=tokens.device) < lengths.unsqueeze(1)
        if not bool(torch.isfinite(token_logprobs[kept]).all()):
            raise RuntimeError("generation: a sampled token's log-prob is not finite: the "
                               "model's logits hold NaN or inf")
        finished = ended.any(1).tolist()
        lengths = lengths.tolist()
        tokens, token_logprobs = tokens.tolist(), token_logprobs.tolist()
        return ([row[:n] for row, n in zip(tokens, lengths)],
                [row[:n] for row, n in zip(token_logprobs, lengths)], finished)


class _SampledLogprobs:
    """A transformers logits processor that turns the scores into the log-probs of the
    distribution to sample from (:func:`process_logits`; greedy: plain log-softmax) and
    keeps, for each step, the log-prob of the token sampled there, which it sees as the last
    input id of the next call (one [B, V] kept at a time)."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.last: Tensor | None = None
        self.chosen: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.last is not None:
            self.chosen.append(self.last.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.last = _greedy_or_processed(scores, self.params)
        return self.last

    def logprobs(self, generated: Tensor) -> Tensor:
        """[B, steps] log-probs of the ``generated`` tokens [B, steps]."""
        steps = generated.shape[1]
        if self.last is not None and len(self.chosen) < steps:
            self.chosen.append(self.last.gather(-1, generated[:, steps - 1:steps]).squeeze(-1))
        if not self.chosen:
            return generated.new_zeros((generated.shape[0], 0), dtype=torch.float32)
        return torch.stack(self.chosen[:steps], 1)
