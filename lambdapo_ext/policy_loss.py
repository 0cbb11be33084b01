"""The policy loss fused with the lm-head (DESIGN.md section 4, issue 40):
linear_policy_loss, beside its fake kernel and autograd formula.

The loss of a token depends on its log-prob (and entropy) only, through terms whose
derivative is known as soon as the log-prob is. So the op makes the gradient in the forward,
over row chunks whose full-vocabulary logits fit a memory budget: three matmuls (logits,
hidden gradient, weight gradient), never an ``[N, V]`` tensor, nothing recomputed. The
backward only scales what the forward stored by the upstream gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lambdapo_ext._budget import logits_budget
from lambdapo_ext._checks import check_same_device, check_tensors
from lambdapo_ext._loader import _LOAD_ERROR, require_library

OP = "linear_policy_loss"
# Logits memory of one row chunk when chunk_size is not given: on the CPU a fixed budget, on
# CUDA at most CUDA_CHUNK_BYTES_MAX or an eighth of free memory. Larger chunks than
# linear_token_logprobs' tiles: a chunk spans the whole vocabulary, and each chunk rounds a
# 16-bit weight gradient once. On the CPU 32 MiB keeps the peak extra memory under the
# unfused path's (tests/ops/test_linear_policy_loss_memory.py, issue 40's setting: 256-row
# chunks, 182 MiB against 193 MiB; 384 rows gave 198 MiB, 512 rows 203 MiB).
CPU_CHUNK_BYTES = 32 * 2**20
CUDA_CHUNK_BYTES_MAX = 256 * 2**20
# Chunks above this many rows are a multiple of it (matmul-friendly shapes).
CHUNK_ROW_MULTIPLE = 64

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_ID_DTYPES = (torch.int64, torch.int32)
# Elements per step of the 16-bit gradient scaling in backward (an fp32 temporary this big).
_SCALE_STEP = 1 << 24


def clipped_ratio(ratio: Tensor, clip_low: float, clip_high: float) -> Tensor:
    """PPO's ``clip(ratio, 1 - clip_low, 1 + clip_high)`` whose gradient is 1 on the closed
    interval, its ends included, as the kernels make it. ``Tensor.clamp`` no longer does
    that for an empty interval (``clip_low = clip_high = 0``: torch 2.14 gives gradient 0
    at ratio 1, 2.13 gave 1), so the references and the unfused loss use this instead."""
    low, high = 1 - clip_low, 1 + clip_high
    inside = (ratio >= low) & (ratio <= high)
    return torch.where(inside, ratio, ratio.detach().clamp(low, high))


def default_chunk_size(rows: int, vocab: int, dtype: torch.dtype, device: torch.device,
                       query_free_memory: bool = True) -> int:
    """Rows per chunk of :func:`linear_policy_loss` when ``chunk_size`` is not given: the
    most rows whose ``[rows, V]`` logits fit the budget (32 MiB on the CPU; on CUDA 256 MiB
    or an eighth of free memory, the cap alone without ``query_free_memory``, so that no
    driver call or host sync happens), at least 1 and at most ``rows``, rounded down to a
    multiple of 64 above 64.

    Raises:
        ValueError: ``vocab`` < 1 (an lm-head ``weight`` with no rows).
    """
    if vocab < 1:
        raise ValueError(f"{OP}: weight must have at least one row (a vocabulary of V > 0), "
                         f"got V = {vocab}")
    budget = logits_budget(device, cpu_bytes=CPU_CHUNK_BYTES,
                           cuda_cap_bytes=CUDA_CHUNK_BYTES_MAX,
                           query_free_memory=query_free_memory)
    chunk = max(1, budget // (dtype.itemsize * vocab))
    if chunk > CHUNK_ROW_MULTIPLE:
        chunk -= chunk % CHUNK_ROW_MULTIPLE
    return max(1, min(rows, chunk))


def linear_policy_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    advantages: Tensor,
    token_weights: Tensor,
    *,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    entropy_coef: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    temperature: float = 1.0,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    validate: bool = True,
    process_group=None,
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO-clip policy loss of the lm-head ``hidden @ weight.T + bias``, fused: the gradient
    is made in the forward, chunk by chunk, and the ``[N, V]`` logits never exist.

    With ``lp_t`` and ``H_t`` the log-prob of target t and the entropy under
    ``softmax(logits / temperature)``, ``r_t = exp(lp_t - old_t)`` (``old_logprobs`` None:
    ``old_t = lp_t.detach()``, the on-policy ratio 1) and
    ``k3 = exp(ref_t - lp_t) - (ref_t - lp_t) - 1``::

        loss = sum_t token_weights_t * (-min(r_t A_t, clip(r_t, 1 - clip_low, 1 + clip_high) A_t)
                                        + kl_coef * k3 - entropy_coef * H_t)

    Rows whose target is ``ignore_index`` contribute nothing (whatever their other values).
    The KL and entropy terms are left out when their coefficient is 0. Every aggregation is
    a choice of ``token_weights``: token-mean is ``1 / (number of tokens)`` on every token,
    seq-mean-token-mean ``1 / (|y_i| * number of sequences)`` on response i's tokens, Dr.
    GRPO's ``1 / (max_new_tokens * number of sequences)``; rollout-correction weights
    ``c_t >= 0`` of the surrogate go into the advantages (``A_t * c_t``), since
    ``-min(r A, clip(r) A) * c = -min(r (A c), clip(r) (A c))`` for ``c >= 0``.

    The forward walks chunks of ``chunk_size`` rows: one matmul for the chunk's logits, a
    row kernel (softmax statistics, the loss term and its derivative, dlogits in place of
    the logits), then the hidden-gradient and weight-gradient matmuls of the chunk. Only the
    gradients of inputs that require grad are made (a frozen ``weight``: no weight-gradient
    matmul, no ``[V, H]`` buffer; no gradient at all under ``torch.no_grad()``: one matmul).
    The gradients live from the forward until the backward, which multiplies them in place
    by the upstream gradient (out of place when the graph is retained for another backward,
    and under ``torch.compile``).

    Args:
        hidden: ``[..., H]`` final hidden states (float32, float16, bfloat16 or float64).
        weight: lm-head weight ``[V, H]`` (V > 0), same dtype and device as ``hidden``.
        targets: ``[...]`` int64/int32 token ids in ``[0, V)`` or ``ignore_index``.
        advantages: ``[...]`` per-token advantages (a response's advantage repeated over its
            tokens, times any rollout-correction weight). No gradient flows to it, nor to
            ``token_weights``, ``old_logprobs`` or ``ref_logprobs``.
        token_weights: ``[...]`` the weight of each token's term (the aggregation).
        old_logprobs: ``[...]`` behaviour-policy log-probs (pi_old), or None (on-policy).
        ref_logprobs: ``[...]`` reference-policy log-probs; needed when ``kl_coef != 0``.
        kl_coef: weight of the k3 KL estimator of KL(pi || ref).
        entropy_coef: weight of the entropy bonus (subtracted from the loss).
        clip_low, clip_high: the ratio is clipped to ``[1 - clip_low, 1 + clip_high]``
            (>= 0; ``inf`` turns a side off).
        temperature: softmax temperature (> 0), the sampling temperature.
        bias: optional ``[V]`` lm-head bias.
        ignore_index: rows with this target give 0 log-prob, entropy and loss, and no
            gradient.
        chunk_size: rows per chunk; None: :func:`default_chunk_size` (a bounded chunk of
            logits). A 16-bit weight gradient is rounded once per chunk.
        validate: check that every target is in ``[0, V)`` or ``ignore_index`` (a host
            sync on CUDA). ``False`` trusts them: no host sync, CUDA-graph capturable, the
            default chunk sized without asking the driver; an out-of-range target then gives
            a NaN log-prob, loss and gradient (never an out-of-bounds read).
        process_group: not supported (a tensor-parallel lm-head split over the vocabulary):
            a row's log-prob needs every shard's softmax statistics before its gradient can
            be formed, a collective between each chunk's first matmul and its row kernel,
            which this single-pass op does not make. Give None (or a group of one rank);
            for vocabulary-parallel heads use
            ``linear_token_logprobs(..., process_group=...)`` and the loss in torch.

    Returns:
        ``(loss, logprobs, entropy)``: ``loss`` a 0-dim float32 tensor (float64 for float64
        inputs), differentiable with respect to ``hidden``, ``weight`` and ``bias``;
        ``logprobs`` and ``entropy`` ``[...]`` float32 (float64), detached, for metrics.
        Gradients have the dtype of their input. NaN in a row's logits or per-token values
        makes the loss and that row's gradient NaN.

    Raises:
        ValueError: bad targets (with ``validate``), temperature, clip range, coefficients,
            chunk size, ``kl_coef != 0`` without ``ref_logprobs``, or a ``weight`` with no
            rows (messages name the argument).
        TypeError: a tensor input that is not a tensor (a Python list, say).
        RuntimeError: dtype, shape or device mismatches, or the compiled library is
            unavailable.
        NotImplementedError: a ``process_group`` of more than one rank.
    """
    check_tensors(OP, hidden=hidden, weight=weight, targets=targets, advantages=advantages,
                  token_weights=token_weights, old_logprobs=old_logprobs,
                  ref_logprobs=ref_logprobs, bias=bias)
    require_library()
    if process_group is not None:
        _reject_process_group(process_group)
    if weight.dim() == 2 and weight.shape[0] == 0:
        raise ValueError(f"{OP}: weight must have at least one row (a vocabulary of V > 0), "
                         f"got shape {tuple(weight.shape)}")
    if chunk_size is None:
        chunk_size = default_chunk_size(targets.numel(), weight.shape[0], weight.dtype,
                                        weight.device, query_free_memory=validate)
    grad_on = torch.is_grad_enabled()
    output_mask = [grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
                   grad_on and bias is not None and bias.requires_grad]
    loss, logprobs, entropy, *_ = torch.ops.lambdapo.linear_policy_loss_forward.default(
        hidden, weight, bias, targets, advantages, token_weights, old_logprobs, ref_logprobs,
        float(kl_coef), float(entropy_coef), float(clip_low), float(clip_high),
        float(temperature), int(ignore_index), int(chunk_size), output_mask, bool(validate))
    return loss, logprobs.detach(), entropy.detach()


AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def aggregation_weights(mask: Tensor, mode: str, *, tokens: int | Tensor | None = None,
                        sequences: int | Tensor | None = None,
                        max_new_tokens: int | None = None) -> Tensor:
    """The ``token_weights`` of :func:`linear_policy_loss` that aggregate per-token losses
    ``l`` [b, T] as a ``loss_agg_mode`` does (DESIGN.md section 2): ``sum(w * l)`` equals

    * ``token-mean``: ``sum(l * mask) / tokens``;
    * ``seq-mean-token-mean``: ``sum_i (sum_t l_it mask_it / |y_i|) / sequences``;
    * ``seq-mean-token-sum-norm`` (Dr. GRPO): ``sum_i (sum_t l_it mask_it / max_new_tokens)
      / sequences``.

    ``tokens`` and ``sequences`` are the sizes of the whole mini-batch when ``mask`` is one
    micro-batch of it (so that the micro-batches' losses add up to the mini-batch's); left
    out, they are this mask's (as tensors: no host sync). ``max_new_tokens`` defaults to
    ``mask.shape[-1]``. Each is clamped to at least 1.

    Args:
        mask: ``[b, T]`` (bool or 0/1) response-token mask.
        mode: one of ``AGG_MODES``.

    Returns:
        ``[b, T]`` float32 weights, 0 off the mask.

    Raises:
        ValueError: an unknown ``mode`` or a mask that is not 2-D.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"loss_agg_mode {mode!r} is not one of {AGG_MODES}")
    if mask.dim() != 2:
        raise ValueError(f"aggregation_weights: mask must be [b, T], got {tuple(mask.shape)}")
    m = mask.to(torch.float32)

    def at_least_1(x):
        return x.clamp(min=1) if isinstance(x, Tensor) else max(x, 1)

    if mode == "token-mean":
        return m / at_least_1(m.sum() if tokens is None else tokens)
    seqs = at_least_1(mask.shape[0] if sequences is None else sequences)
    if mode == "seq-mean-token-mean":
        return m / m.sum(-1, keepdim=True).clamp(min=1) / seqs
    return m / at_least_1(mask.shape[-1] if max_new_tokens is None else max_new_tokens) / seqs


def _reject_process_group(process_group) -> None:
    """Raises unless ``process_group`` has a single rank (see linear_policy_loss)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group given but torch.distributed is not initialized")
    if dist.get_world_size(process_group) > 1:
        raise NotImplementedError(
            f"{OP}: a vocabulary-parallel lm-head (process_group of "
            f"{dist.get_world_size(process_group)} ranks) is not supported: a row's gradient "
            f"needs every shard's softmax statistics first. Use "
            f"lambdapo_ext.linear_token_logprobs(..., process_group=...) and the loss in torch.")


def _scale_(grad: Tensor, scale: Tensor) -> Tensor:
    """``grad *= scale`` in place, the product in fp32 (fp64) for any dtype of ``grad``: a
    16-bit gradient goes in steps through a bounded fp32 temporary, so that the scale is
    never rounded to 16 bits. No host sync."""
    if grad.numel() == 0:
        return grad
    if grad.dtype in (torch.float32, torch.float64):
        return grad.mul_(scale.to(grad.dtype))
    flat = grad.view(-1)
    scale = scale.to(torch.float32)
    for start in range(0, flat.numel(), _SCALE_STEP):
        part = flat[start:start + _SCALE_STEP]
        part.copy_(part.float().mul_(scale))
    return grad


def _scaled(grad: Tensor, scale: Tensor) -> Tensor:
    """``grad * scale`` out of place (traced graphs), the product in fp32 (fp64)."""
    if grad.dtype in (torch.float32, torch.float64):
        return grad * scale.to(grad.dtype)
    return (grad.float() * scale.to(torch.float32)).to(grad.dtype)


if _LOAD_ERROR is None:

    @torch.library.register_fake("lambdapo::linear_policy_loss_forward")
    def _linear_policy_loss_forward_fake(hidden, weight, bias, targets, advantages,
                                         token_weights, old_logprobs, ref_logprobs, kl_coef,
                                         entropy_coef, clip_low, clip_high, temperature,
                                         ignore_index, chunk_size, output_mask, validate=True):
        torch._check(hidden.dtype in _FLOAT_DTYPES and hidden.dim() >= 1,
                     lambda: f"{OP}: hidden must be a floating-point tensor [..., H] (float32, "
                             f"float16, bfloat16 or float64), got {hidden.dtype}")
        torch._check(weight.dim() == 2 and weight.shape[1] == hidden.shape[-1],
                     lambda: f"{OP}: weight must be [V, H] with H = {hidden.shape[-1]} (the "
                             f"hidden size), got {tuple(weight.shape)}")
        torch._check(weight.dtype == hidden.dtype,
                     lambda: f"{OP}: weight has dtype {weight.dtype} but hidden has "
                             f"{hidden.dtype}")
        torch._check(bias is None or (bias.shape == weight.shape[:1] and
                                      bias.dtype == hidden.dtype),
                     lambda: f"{OP}: bias must be [V] with V = {weight.shape[0]}, of the "
                             f"dtype of hidden")
        torch._check(targets.dtype in _ID_DTYPES,
                     lambda: f"{OP}: targets must be int64 or int32, got {targets.dtype}")
        torch._check(targets.shape == hidden.shape[:-1],
                     lambda: f"{OP}: targets must have the leading shape of hidden "
                             f"{tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}")
        per_token = (("advantages", advantages), ("token_weights", token_weights),
                     ("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs))
        for name, x in per_token:
            if x is None:
                continue
            torch._check(x.dtype in _FLOAT_DTYPES,
                         lambda: f"{OP}: {name} must be a floating-point tensor, got {x.dtype}")
            torch._check(x.shape == targets.shape,
                         lambda: f"{OP}: {name} must have the shape of targets "
                                 f"{tuple(targets.shape)} (one value per token), got "
                                 f"{tuple(x.shape)}")
        check_same_device(OP, ("hidden", hidden), ("weight", weight), ("bias", bias),
                          ("targets", targets), *per_token)
        need_hidden, need_weight, need_bias = output_mask
        dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        lead = hidden.shape[:-1]
        return (hidden.new_empty((), dtype=dtype), hidden.new_empty(lead, dtype=dtype),
                hidden.new_empty(lead, dtype=dtype),
                hidden.new_empty(hidden.shape if need_hidden else (0,)),
                weight.new_empty(weight.shape if need_weight else (0,)),
                weight.new_empty(weight.shape[:1] if need_bias and bias is not None else (0,)))

    def _policy_setup_context(ctx, inputs, output):
        output_mask = inputs[15]
        _, logprobs, entropy, grad_hidden, grad_weight, grad_bias = output
        ctx.mark_non_differentiable(logprobs, entropy, grad_hidden, grad_weight, grad_bias)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.output_mask = list(output_mask)
        ctx.set_materialize_grads(False)

    def _policy_backward(ctx, grad_loss, *_unused):
        nothing = (None,) * 17
        if grad_loss is None or not any(ctx.output_mask):
            return nothing
        grads = ctx.saved_tensors
        # In place only when this is the stored gradients' last use: not while tracing, and
        # not when the graph is kept for another backward (retain_graph, gradcheck).
        in_place = not (_graph_kept() or _is_traced(grad_loss)
                        or any(_is_traced(g) for g in grads))
        scale = grad_loss.detach()
        out = [(_scale_(g, scale) if in_place else _scaled(g, scale)) if need else None
               for g, need in zip(grads, ctx.output_mask)]
        return (*out, *nothing[3:])

    def _graph_kept() -> bool:
        """Whether the running backward keeps the graph (retain_graph=True); True when torch
        cannot tell (the out-of-place scaling is always safe)."""
        try:
            return bool(torch._C._autograd._get_current_graph_task_keep_graph())
        except (AttributeError, RuntimeError):
            return True

    def _is_traced(t: Tensor) -> bool:
        """A fake or functional tensor (torch.compile's tracing), where the gradient is
        scaled out of place."""
        from torch._subclasses.fake_tensor import is_fake

        return is_fake(t) or torch._is_functional_tensor(t)

    torch.library.register_autograd("lambdapo::linear_policy_loss_forward", _policy_backward,
                                    setup_context=_policy_setup_context)
