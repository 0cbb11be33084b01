"""The log-prob ops (DESIGN.md section 4): token_logprobs over logits and
linear_token_logprobs over hidden states and an lm-head, each beside its fake kernels and
autograd formula."""

from __future__ import annotations

import torch
from torch import Tensor

from lambdapo_ext import _vocab_parallel
from lambdapo_ext._budget import logits_budget
from lambdapo_ext._checks import check_same_device, check_tensors
from lambdapo_ext._loader import _LOAD_ERROR, require_library

# Logits memory of one linear_token_logprobs tile when the chunk sizes are not given, and
# the fewest vocabulary entries a default tile spans.
CPU_TILE_BYTES = 64 * 2**20
CUDA_TILE_BYTES_MAX = 128 * 2**20
LINEAR_MIN_VOCAB_CHUNK = 4096

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_ID_DTYPES = (torch.int64, torch.int32)


def _check_logprob_args(op: str, inputs: tuple[str, Tensor], targets: Tensor) -> None:
    """The shape/dtype/device checks of the log-prob kernels, at trace time."""
    name, x = inputs
    torch._check(x.dtype in _FLOAT_DTYPES,
                 lambda: f"{op}: {name} must be float32, float16, bfloat16 or float64, got "
                         f"{x.dtype}")
    torch._check(x.dim() >= 1, lambda: f"{op}: {name} must have at least one dimension")
    torch._check(targets.dtype in _ID_DTYPES,
                 lambda: f"{op}: targets must be int64 or int32, got {targets.dtype}")
    torch._check(targets.shape == x.shape[:-1],
                 lambda: f"{op}: targets must have the leading shape of {name} "
                         f"{tuple(x.shape[:-1])}, got {tuple(targets.shape)}")
    check_same_device(op, inputs, ("targets", targets))


def _result_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' output dtype for inputs of ``dtype``: float32 (float64 for float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_logprob_outputs(like: Tensor, return_entropy: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(logprobs, entropy, lse) of the leading shape of ``like`` [..., last], float32 (float64
    for float64 input) as the kernels give them."""
    lead = like.shape[:-1]
    dtype = _result_dtype(like.dtype)
    entropy_shape = lead if return_entropy else (0,)
    return (like.new_empty(lead, dtype=dtype), like.new_empty(entropy_shape, dtype=dtype),
            like.new_empty(lead, dtype=dtype))


def token_logprobs(
    logits: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    validate: bool = True,
    process_group=None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probabilities of the target tokens under softmax(logits / temperature), fused.

    One pass over each row with fp32 accumulation (online max and sum-exp):
    ``logprob = z_y/T - logsumexp(z/T)``, clamped to <= 0; the entropy of softmax(z/T)
    comes from the same pass. Backward accepts gradients for either output, saves only
    per-row state (log-sum-exp, entropy) and recomputes the probabilities.

    Args:
        logits: ``[..., V]`` float32, float16, bfloat16 (or float64), contiguous in the
            last dimension; leading dimensions may be strided (e.g. ``logits[:, :-1]``).
        targets: ``[...]`` int64 or int32 token ids in ``[0, V)`` or ``ignore_index``.
        temperature: softmax temperature (> 0).
        ignore_index: rows with this target give 0 and receive 0 gradient.
        return_entropy: also return the per-row entropy.
        inplace_backward: write the logits gradient over ``logits`` (saves one [N, V]
            buffer; ``logits`` must not be used afterwards).
        validate: check that every target is in ``[0, V)`` or ``ignore_index`` (a host
            sync on CUDA, in forward and backward). ``False`` trusts the targets: no host
            sync, CUDA-graph capturable; a target out of range then gives a NaN log-prob
            (never an out-of-bounds read).
        process_group: a ``torch.distributed`` group over which the vocabulary is split
            (tensor-parallel lm-heads): rank r's ``logits`` are the ids
            ``[r * V_r, (r + 1) * V_r)`` of a vocabulary of ``W * V_r``, ``targets`` are
            global ids, the same on every rank. Outputs equal the unsharded op's on every
            rank; the backward gives each rank its shard's gradient. Two all-reduces of
            per-row fp32 values per forward, none in the backward; every rank must call.
            A group of size 1 is the single-device op. Runs eagerly (no torch.compile).

    Returns:
        ``logprobs`` ``[...]`` float32 (float64 for float64 logits), or
        ``(logprobs, entropy)`` when ``return_entropy``.

    Raises:
        ValueError: a target outside ``[0, V)`` that is not ``ignore_index`` (with
            ``validate``), a temperature <= 0, or (with ``validate`` and a process group)
            shards of unequal size (messages name the argument).
        TypeError: ``logits`` or ``targets`` is not a tensor.
        RuntimeError: wrong dtype, shape, device or layout of ``logits``/``targets``, the
            compiled library is unavailable, or a process group without an initialized
            ``torch.distributed``.
    """
    check_tensors("token_logprobs", logits=logits, targets=targets)
    require_library()
    if process_group is not None and _vocab_parallel.group_size(process_group) > 1:
        return _vocab_parallel.token_logprobs(
            logits, targets, temperature=temperature, ignore_index=ignore_index,
            return_entropy=return_entropy, inplace_backward=inplace_backward,
            validate=validate, process_group=process_group)
    logprobs, entropy, _ = torch.ops.lambdapo.token_logprobs_forward.default(
        logits, targets, float(temperature), int(ignore_index), bool(return_entropy),
        bool(inplace_backward), bool(validate))
    return (logprobs, entropy) if return_entropy else logprobs


if _LOAD_ERROR is None:

    @torch.library.register_fake("lambdapo::token_logprobs_forward")
    def _token_logprobs_forward_fake(logits, targets, temperature, ignore_index, return_entropy,
                                     inplace_backward, validate=True):
        _check_logprob_args("token_logprobs", ("logits", logits), targets)
        return _fake_logprob_outputs(logits, return_entropy)

    @torch.library.register_fake("lambdapo::token_logprobs_backward")
    def _token_logprobs_backward_fake(grad_logprobs, grad_entropy, logits, targets, lse, entropy,
                                      temperature, ignore_index, validate=True):
        return logits.new_empty(logits.shape)

    @torch.library.register_fake("lambdapo::token_logprobs_backward_inplace")
    def _token_logprobs_backward_inplace_fake(grad_logprobs, grad_entropy, logits, targets, lse,
                                              entropy, temperature, ignore_index, validate=True):
        return None

    def _token_logprobs_setup_context(ctx, inputs, output):
        logits, targets, temperature, ignore_index, return_entropy, inplace_backward, *rest = inputs
        _, entropy, lse = output
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.temperature, ctx.ignore_index = temperature, ignore_index
        ctx.validate = rest[0] if rest else True
        ctx.return_entropy = return_entropy
        ctx.inplace_backward = inplace_backward
        ctx.set_materialize_grads(False)

    def _token_logprobs_backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
        logits, targets, lse, entropy = ctx.saved_tensors
        if not ctx.return_entropy:  # the empty entropy output may still get a (zero) grad
            grad_entropy = None
        if grad_logprobs is None and grad_entropy is None:
            return (None,) * 7
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(lse)
        args = (grad_logprobs, grad_entropy)
        rest = (targets, lse, entropy, ctx.temperature, ctx.ignore_index, ctx.validate)
        if ctx.inplace_backward:
            torch.ops.lambdapo.token_logprobs_backward_inplace.default(*args, logits, *rest)
            grad_logits = logits
        else:
            grad_logits = torch.ops.lambdapo.token_logprobs_backward.default(*args, logits, *rest)
        return grad_logits, None, None, None, None, None, None

    torch.library.register_autograd("lambdapo::token_logprobs_forward", _token_logprobs_backward,
                                    setup_context=_token_logprobs_setup_context)


def default_chunk_size(rows: int, vocab: int, dtype: torch.dtype, device: torch.device,
                       query_free_memory: bool = True) -> tuple[int, int]:
    """Tile of :func:`linear_token_logprobs` when ``chunk_size`` / ``vocab_chunk_size`` are
    not given: ``(rows per chunk, vocabulary entries per chunk)``.

    A tile's logits take at most 64 MiB on the CPU, and on CUDA at most 128 MiB or an eighth
    of free memory. Without ``query_free_memory`` (no driver call, so safe inside a
    CUDA-graph capture and free of host syncs) the CUDA budget is the 128 MiB cap. Tiles
    span up to all rows (so that each vocabulary block's weight gradient is one matmul over
    every row) but at least ``LINEAR_MIN_VOCAB_CHUNK`` vocabulary entries, rounded to a
    multiple of 128 for the matmuls.

    Raises:
        ValueError: ``vocab`` < 1 (an lm-head ``weight`` with no rows).
    """
    if vocab < 1:
        raise ValueError(f"linear_token_logprobs: weight must have at least one row (a "
                         f"vocabulary of V > 0), got V = {vocab}")
    budget = logits_budget(device, cpu_bytes=CPU_TILE_BYTES, cuda_cap_bytes=CUDA_TILE_BYTES_MAX,
                           query_free_memory=query_free_memory)
    elements = max(1, budget // dtype.itemsize)  # any dtype: the op names a bad one
    chunk = max(1, min(rows, elements // LINEAR_MIN_VOCAB_CHUNK))
    vocab_chunk = min(vocab, max(1, elements // chunk))
    if vocab_chunk < vocab and vocab_chunk >= 128:
        vocab_chunk -= vocab_chunk % 128
    return chunk, vocab_chunk


def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    validate: bool = True,
    process_group=None,
) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`token_logprobs` of ``hidden @ weight.T + bias`` without materializing the
    ``[N, V]`` logits: forward and backward walk tiles of ``chunk_size`` rows x
    ``vocab_chunk_size`` vocabulary entries, and backward recomputes each tile's logits.

    Gradients flow to whichever of ``hidden``, ``weight`` and ``bias`` require them, and
    only those are computed: a frozen lm-head costs no weight-gradient matmul and no
    ``[V, H]`` buffer. Each vocabulary block's weight gradient is written once in the
    weight's dtype (no fp32 ``[V, H]`` accumulator); the hidden gradient of 16-bit inputs
    accumulates over blocks in an fp32 ``[N, H]`` buffer.

    Args:
        hidden: ``[..., H]`` final hidden states (float32, float16, bfloat16 or float64).
        weight: lm-head weight ``[V, H]`` (V > 0), same dtype and device as ``hidden``.
        targets: ``[...]`` int64/int32 token ids in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]`` lm-head bias.
        temperature, ignore_index, return_entropy: as in :func:`token_logprobs`.
        chunk_size: rows per tile; ``vocab_chunk_size``: vocabulary entries per tile. Either
            left out comes from :func:`default_chunk_size` (a bounded tile of logits).
        validate: as in :func:`token_logprobs`; ``False`` also sizes default tiles
            without asking the driver for free memory.
        process_group: vocabulary-parallel lm-head, as in :func:`token_logprobs`: each
            rank holds its rows ``[r * V_r, (r + 1) * V_r)`` of ``weight`` (and ``bias``)
            and the full ``hidden``; the hidden gradient is all-reduced once in backward.

    Returns:
        ``logprobs`` ``[...]`` float32 (float64 for float64 inputs), or
        ``(logprobs, entropy)`` when ``return_entropy``. Gradients have the dtype of their
        input.

    Raises:
        ValueError: bad targets, temperature, chunk sizes, or a ``weight`` with no rows
            (messages name the argument).
        TypeError: an input that is not a tensor.
        RuntimeError: dtype, shape or device mismatches, or the compiled library is
            unavailable.
    """
    check_tensors("linear_token_logprobs", hidden=hidden, weight=weight, targets=targets,
                  bias=bias)
    require_library()
    if weight.dim() == 2 and weight.shape[0] == 0:
        raise ValueError(f"linear_token_logprobs: weight must have at least one row (a "
                         f"vocabulary of V > 0), got shape {tuple(weight.shape)}")
    if chunk_size is None or vocab_chunk_size is None:
        default_rows, default_vocab = default_chunk_size(
            targets.numel(), weight.shape[0], weight.dtype, weight.device,
            query_free_memory=validate)
        chunk_size = default_rows if chunk_size is None else chunk_size
        vocab_chunk_size = default_vocab if vocab_chunk_size is None else vocab_chunk_size
    if process_group is not None and _vocab_parallel.group_size(process_group) > 1:
        return _vocab_parallel.linear_token_logprobs(
            hidden, weight, targets, bias=bias, temperature=temperature,
            ignore_index=ignore_index, return_entropy=return_entropy, chunk_size=chunk_size,
            vocab_chunk_size=vocab_chunk_size, validate=validate, process_group=process_group)
    logprobs, entropy, _ = torch.ops.lambdapo.linear_token_logprobs_forward.default(
        hidden, weight, bias, targets, float(temperature), int(ignore_index),
        bool(return_entropy), int(chunk_size), int(vocab_chunk_size), bool(validate))
    return (logprobs, entropy) if return_entropy else logprobs


if _LOAD_ERROR is None:

    @torch.library.register_fake("lambdapo::linear_token_logprobs_forward")
    def _linear_token_logprobs_forward_fake(hidden, weight, bias, targets, temperature,
                                            ignore_index, return_entropy, chunk_size,
                                            vocab_chunk_size, validate=True):
        op = "linear_token_logprobs"
        _check_logprob_args(op, ("hidden", hidden), targets)
        torch._check(weight.dim() == 2 and weight.shape[1] == hidden.shape[-1],
                     lambda: f"{op}: weight must be [V, H] with H = {hidden.shape[-1]} (the "
                             f"hidden size), got {tuple(weight.shape)}")
        torch._check(weight.dtype == hidden.dtype,
                     lambda: f"{op}: weight has dtype {weight.dtype} but hidden has "
                             f"{hidden.dtype}")
        torch._check(bias is None or bias.shape == weight.shape[:1],
                     lambda: f"{op}: bias must have shape [{weight.shape[0]}]")
        check_same_device(op, ("hidden", hidden), ("weight", weight), ("bias", bias))
        return _fake_logprob_outputs(hidden, return_entropy)

    @torch.library.register_fake("lambdapo::linear_token_logprobs_backward")
    def _linear_token_logprobs_backward_fake(grad_logprobs, grad_entropy, hidden, weight, bias,
                                             targets, lse, entropy, temperature, ignore_index,
                                             chunk_size, vocab_chunk_size, output_mask,
                                             validate=True, unrounded_grad_hidden=False):
        need_hidden, need_weight, need_bias = output_mask
        hidden_grad_dtype = _result_dtype(hidden.dtype) if unrounded_grad_hidden else hidden.dtype
        return (hidden.new_empty(hidden.shape if need_hidden else (0,), dtype=hidden_grad_dtype),
                weight.new_empty(weight.shape if need_weight else (0,)),
                weight.new_empty(weight.shape[:1] if need_bias and bias is not None else (0,)))

    def _linear_setup_context(ctx, inputs, output):
        (hidden, weight, bias, targets, temperature, ignore_index, return_entropy, chunk_size,
         vocab_chunk_size, validate) = inputs
        _, entropy, lse = output
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.temperature, ctx.ignore_index = temperature, ignore_index
        ctx.chunk_size, ctx.vocab_chunk_size = chunk_size, vocab_chunk_size
        ctx.validate = validate
        ctx.return_entropy = return_entropy
        ctx.set_materialize_grads(False)

    def _linear_backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        # Only the gradients autograd asks for are computed (a frozen lm-head: no weight
        # gradient matmul, no [V, H] buffer).
        output_mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                       bias is not None and ctx.needs_input_grad[2]]
        if not ctx.return_entropy:
            grad_entropy = None
        if (grad_logprobs is None and grad_entropy is None) or not any(output_mask):
            return (None,) * 10
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(lse)
        grad_hidden, grad_weight, grad_bias = (
            torch.ops.lambdapo.linear_token_logprobs_backward.default(
                grad_logprobs, grad_entropy, hidden, weight, bias, targets, lse, entropy,
                ctx.temperature, ctx.ignore_index, ctx.chunk_size, ctx.vocab_chunk_size,
                output_mask, ctx.validate))
        return (grad_hidden if output_mask[0] else None,
                grad_weight if output_mask[1] else None,
                grad_bias if output_mask[2] else None,
                None, None, None, None, None, None, None)

    torch.library.register_autograd("lambdapo::linear_token_logprobs_forward", _linear_backward,
                                    setup_context=_linear_setup_context)
