"""Vocabulary-parallel token log-probs: the logits (or the lm-head weight) are split over the
vocabulary across the ranks of a process group, as Megatron-style tensor parallelism does.

Rank r of W holds the contiguous ids ``[r * V/W, (r + 1) * V/W)``; ``targets`` are global
ids, the same on every rank. Each rank runs the single-device kernel on its shard with
shard-local targets (a target on another rank maps to an id past the shard, which the
kernels skip: no target term, no out-of-bounds read; an ignored row to the shard's own
ignore marker, -1, which no shard-local id can equal), then two all-reduces of per-row fp32
values combine the shards exactly:

* MAX of the shard log-sum-exps ``m``;
* SUM of ``exp(lse_r - m)``, of the target's scaled logit (only its owner has it), of
  ``exp(lse_r - m) * (lse_r - H_r)`` (the shard's share of ``sum p * z/T``), and of the
  number of ranks that own the target (0 for an unchecked target past the vocabulary: NaN).

Then ``lse = m + log S``, ``logprob = z_y/T - lse`` and ``H = lse - (sum of shares) / S``.
The backward needs no communication for the logits op (each rank's shard gradient follows
from the global ``lse`` and ``H``), and one SUM of the hidden gradient for the linear op, in
fp32 (float64 for float64 inputs) before the one rounding to hidden's dtype, on every rank
whose backward runs, whether or not its loss used the outputs. Nothing of size ``[N, V]``
crosses ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def group_size(process_group) -> int:
    """World size of ``process_group``.

    Raises:
        RuntimeError: torch.distributed is not initialized.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group given but torch.distributed is not initialized")
    return dist.get_world_size(process_group)


# The ignore_index the kernels get on a shard. The global ignore_index may lie in [0, V/W),
# where it would equal the local id of a valid target on another rank's shard; -1 equals no
# shard-local target (owned ones lie in [0, V/W), the others map to V/W).
SHARD_IGNORE_INDEX = -1


def _shard_targets(targets: Tensor, shard: int, process_group, ignore_index: int,
                   validate: bool, op: str, shard_name: str) -> tuple[Tensor, Tensor]:
    """(shard-local targets: SHARD_IGNORE_INDEX for ignored rows, the local id of a target
    this rank owns, ``shard`` for one it does not; mask of the rows whose target it owns)."""
    world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
    if validate:
        sizes = torch.tensor([shard, -shard], dtype=torch.int64, device=targets.device)
        dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=process_group)
        if int(sizes[0]) != -int(sizes[1]):
            raise ValueError(f"{op}: every rank's {shard_name} must hold the same number of "
                             f"vocabulary entries (V divisible by the world size {world}); "
                             f"this rank holds {shard}, others between {-int(sizes[1])} and "
                             f"{int(sizes[0])}")
    vocab = shard * world
    start = rank * shard
    t = targets.to(torch.int64)
    if validate and t.numel() > 0:
        ok = ((t == ignore_index) | ((t >= 0) & (t < vocab))).all()
        if not bool(ok):
            raise ValueError(f"{op}: targets must lie in [0, {vocab}) (the global vocabulary "
                             f"of {world} shards of {shard}) or equal ignore_index "
                             f"({ignore_index})")
    ignored = t == ignore_index
    owned = ~ignored & (t >= start) & (t < start + shard)
    # Owned elsewhere: past the shard, which the kernels skip (they run with validate=False).
    local = torch.where(owned, t - start, torch.full_like(t, shard))
    return local.masked_fill_(ignored, SHARD_IGNORE_INDEX), owned


def _combine(lp_l: Tensor, lse_l: Tensor, h_l: Tensor | None, owned: Tensor, kept: Tensor,
             process_group) -> tuple[Tensor, Tensor, Tensor | None]:
    """Global (logprobs, lse, entropy) from each rank's shard results (two all-reduces)."""
    m = lse_l.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=process_group)
    scale = torch.exp(lse_l - m)
    target_logit = torch.where(owned, lp_l + lse_l, torch.zeros_like(lse_l))
    parts = [scale, target_logit, owned.to(scale.dtype)]
    if h_l is not None:  # a shard whose every logit is -inf has scale 0 and NaN entropy
        parts.append(torch.where(scale > 0, scale * (lse_l - h_l), torch.zeros_like(scale)))
    sums = torch.stack(parts)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=process_group)
    lse = m + torch.log(sums[0])
    zero = torch.zeros_like(lse)
    # No rank owns an unchecked target past the vocabulary: NaN, as on one device.
    target_logit = torch.where(sums[2] > 0, sums[1], torch.nan)
    logprobs = torch.where(kept, (target_logit - lse).clamp_max(0.0), zero)
    entropy = None if h_l is None else torch.where(kept, lse - sums[3] / sums[0], zero)
    return logprobs, torch.where(kept, lse, zero), entropy


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, ignore_index, return_entropy,
                inplace_backward, validate, process_group):
        local, owned = _shard_targets(targets, logits.shape[-1], process_group,
                                         ignore_index, validate, "token_logprobs", "logits")
        local = local.view(targets.shape)
        lp_l, h_l, lse_l = torch.ops.lambdapo.token_logprobs_forward.default(
            logits, local, temperature, SHARD_IGNORE_INDEX, return_entropy, False, False)
        kept = (targets != ignore_index).reshape(lse_l.shape)
        logprobs, lse, entropy = _combine(lp_l, lse_l, h_l if return_entropy else None,
                                          owned.reshape(lse_l.shape), kept, process_group)
        if entropy is None:
            entropy = h_l  # the kernel's empty placeholder
        ctx.save_for_backward(logits, local, lse, entropy)
        ctx.temperature = temperature
        ctx.return_entropy, ctx.inplace_backward = return_entropy, inplace_backward
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        logits, local, lse, entropy = ctx.saved_tensors
        if not ctx.return_entropy:
            grad_entropy = None
        if grad_logprobs is None and grad_entropy is None:
            return (None,) * 8
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(lse)
        args = (grad_logprobs.contiguous(),
                None if grad_entropy is None else grad_entropy.contiguous())
        rest = (local, lse, entropy, ctx.temperature, SHARD_IGNORE_INDEX, False)
        if ctx.inplace_backward:
            torch.ops.lambdapo.token_logprobs_backward_inplace.default(*args, logits, *rest)
            grad_logits = logits
        else:
            grad_logits = torch.ops.lambdapo.token_logprobs_backward.default(*args, logits, *rest)
        return (grad_logits,) + (None,) * 7


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, return_entropy,
                chunk_size, vocab_chunk_size, validate, process_group):
        local, owned = _shard_targets(targets, weight.shape[0], process_group, ignore_index,
                                         validate, "linear_token_logprobs", "weight")
        local = local.view(targets.shape)
        lp_l, h_l, lse_l = torch.ops.lambdapo.linear_token_logprobs_forward.default(
            hidden, weight, bias, local, temperature, SHARD_IGNORE_INDEX, return_entropy,
            chunk_size, vocab_chunk_size, False)
        kept = (targets != ignore_index).reshape(lse_l.shape)
        logprobs, lse, entropy = _combine(lp_l, lse_l, h_l if return_entropy else None,
                                          owned.reshape(lse_l.shape), kept, process_group)
        if entropy is None:
            entropy = h_l
        ctx.save_for_backward(hidden, weight, bias, local, lse, entropy)
        ctx.temperature = temperature
        ctx.chunk_size, ctx.vocab_chunk_size = chunk_size, vocab_chunk_size
        ctx.return_entropy, ctx.process_group = return_entropy, process_group
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, local, lse, entropy = ctx.saved_tensors
        output_mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                       bias is not None and ctx.needs_input_grad[2]]
        if not ctx.return_entropy:
            grad_entropy = None
        if grad_logprobs is None and grad_entropy is None:
            # This rank's loss did not use the outputs: its share of the hidden gradient is
            # zero, but the other ranks wait for it in the all-reduce below.
            grad_hidden = (hidden.new_zeros(hidden.shape, dtype=lse.dtype) if output_mask[0]
                           else None)
            grad_weight = grad_bias = None
        else:
            if grad_logprobs is None:
                grad_logprobs = torch.zeros_like(lse)
            grad_hidden, grad_weight, grad_bias = (
                torch.ops.lambdapo.linear_token_logprobs_backward.default(
                    grad_logprobs.contiguous(),
                    None if grad_entropy is None else grad_entropy.contiguous(), hidden,
                    weight, bias, local, lse, entropy, ctx.temperature, SHARD_IGNORE_INDEX,
                    ctx.chunk_size, ctx.vocab_chunk_size, output_mask, False, True))
        if output_mask[0]:
            # Each rank holds its shard's share, unrounded (lse's dtype: float32, or float64
            # for float64 inputs): summed before the one rounding to hidden's dtype.
            dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=ctx.process_group)
            grad_hidden = grad_hidden.to(hidden.dtype)
        return (grad_hidden if output_mask[0] else None,
                grad_weight if output_mask[1] else None,
                grad_bias if output_mask[2] else None) + (None,) * 8


def token_logprobs(logits: Tensor, targets: Tensor, *, temperature: float, ignore_index: int,
                   return_entropy: bool, inplace_backward: bool, validate: bool,
                   process_group):
    """The vocabulary-parallel path of :func:`lambdapo_ext.token_logprobs` (see there)."""
    logprobs, entropy = _TokenLogprobs.apply(logits, targets, float(temperature),
                                             int(ignore_index), bool(return_entropy),
                                             bool(inplace_backward), bool(validate),
                                             process_group)
    return (logprobs, entropy) if return_entropy else logprobs


def linear_token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Tensor | None,
                          temperature: float, ignore_index: int, return_entropy: bool,
                          chunk_size: int, vocab_chunk_size: int, validate: bool,
                          process_group):
    """The vocabulary-parallel path of :func:`lambdapo_ext.linear_token_logprobs`."""
    logprobs, entropy = _LinearTokenLogprobs.apply(
        hidden, weight, bias, targets, float(temperature), int(ignore_index),
        bool(return_entropy), int(chunk_size), int(vocab_chunk_size), bool(validate),
        process_group)
    return (logprobs, entropy) if return_entropy else logprobs
