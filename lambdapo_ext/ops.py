"""Typed Python face of the lambdapo ops (torch.ops.lambdapo.*) and their fake kernels."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lambdapo_ext import _vocab_parallel
from lambdapo_ext._loader import _LOAD_ERROR, require_library

# lambda_advantages' normalize modes: the one Python list (configs and adapters import it).
# The C++ kernels parse the string themselves (kNormalizeModes in csrc/lambda_advantages.h);
# tests check that both accept exactly these.
NORMALIZE_MODES = ("mean", "none", "std")
# Logits memory of one linear_token_logprobs tile when the chunk sizes are not given, and
# the fewest vocabulary entries a default tile spans.
CPU_TILE_BYTES = 64 * 2**20
CUDA_TILE_BYTES_MAX = 128 * 2**20
LINEAR_MIN_VOCAB_CHUNK = 4096


def lambda_advantages(
    rewards: Tensor,
    scores: Tensor,
    *,
    mask: Tensor | None = None,
    group_ids: Tensor | None = None,
    beta: float = 1.0,
    normalize: str = "mean",
    eps: float = 1e-6,
    validate: bool = True,
) -> Tensor:
    """Pairwise lambda advantages of sampled responses within their prompt groups.

    For a group with ``n`` valid members (DESIGN.md section 2)::

        w_ij = 2 * sigmoid(-beta * sign(r_i - r_j) * (s_i - s_j))
        A_i  = 1/(n-1) * sum_{j valid, j != i} (r_i - r_j) * w_ij

    ``beta=0`` gives RLOO; every group's advantages sum to 0. No gradient flows through
    the inputs. Cost O(G^2) per group, memory O(P*G).

    Args:
        rewards: ``[P, G]`` (dense groups, one row per prompt) or ``[N]`` with ``group_ids``
            (ragged groups in any order); any floating dtype.
        scores: sequence confidence scores of the same shape (e.g. mean token log-prob
            under the behaviour policy); any floating dtype.
        mask: optional bool tensor of the same shape; False members get 0 and are left out
            of every sum (they may hold non-finite padding).
        group_ids: optional int tensor ``[N]`` of non-negative group ids for 1-D inputs.
        beta: sharpness of the confidence weighting (finite).
        normalize: ``"mean"`` (divide by n-1), ``"none"``, or ``"std"`` (``"mean"``, then
            divide by the population std of the group's valid rewards + ``eps``).
        eps: added to the std under ``normalize="std"`` (>= 0).
        validate: check that valid rewards and scores are finite and group ids
            non-negative (reads values back: a host sync on CUDA). ``False`` trusts them, so
            the op makes no host sync and can be captured in a CUDA graph.

    Returns:
        float32 tensor of the shape of ``rewards``, in input order; members masked out and
        groups with fewer than 2 valid members get 0.

    Raises:
        ValueError: unknown ``normalize``, non-finite beta/eps, and (with ``validate``)
            non-finite valid values or negative ``group_ids``.
        RuntimeError: shape, dtype or device mismatches (the message names the argument),
            or the compiled library is unavailable.
    """
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"lambda_advantages: normalize must be one of {NORMALIZE_MODES}, "
                         f"got {normalize!r}")
    require_library()
    return torch.ops.lambdapo.lambda_advantages.default(
        rewards.detach(), scores.detach(),
        None if mask is None else mask.detach(),
        None if group_ids is None else group_ids.detach(),
        float(beta), normalize, float(eps), bool(validate))


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
        RuntimeError: wrong dtype, shape, device or layout of ``logits``/``targets``, the
            compiled library is unavailable, or a process group without an initialized
            ``torch.distributed``.
    """
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
    if device.type == "cuda":
        budget = CUDA_TILE_BYTES_MAX
        if query_free_memory:
            budget = min(budget, torch.cuda.mem_get_info(device)[0] // 8)
    else:
        budget = CPU_TILE_BYTES
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
        RuntimeError: dtype, shape or device mismatches, or the compiled library is
            unavailable.
    """
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


def rms_norm(x: Tensor, weight: Tensor, *, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last dimension, fused: ``weight * x / sqrt(mean(x^2) + eps)``.

    The normalization of Llama, Qwen2/3, Mistral and their kin (transformers'
    ``LlamaRMSNorm``, ``torch.nn.functional.rms_norm`` with a weight), in one pass per row
    with float32 accumulation, rounded once to the input dtype (transformers rounds the
    normalized ``x`` before the weight product; the two agree to the dtype's rounding).
    Backward saves only ``x`` and the per-row ``rstd`` and gives ``x`` and ``weight`` the
    gradients they require; the weight gradient adds per-block partials in a fixed order,
    so it is the same on every run and thread count. A row's output does not depend on
    the other rows.

    Args:
        x: ``[..., D]`` float32, float16, bfloat16 or float64 (any strides: a
            non-contiguous ``x`` is copied).
        weight: ``[D]``, the dtype and device of ``x``.
        eps: added to the mean square (finite, >= 0).

    Returns:
        ``[..., D]`` in the dtype of ``x``.

    Raises:
        ValueError: a non-finite or negative ``eps``.
        RuntimeError: dtype, shape or device mismatches of ``x`` and ``weight`` (the
            message names the argument), or the compiled library is unavailable.
    """
    require_library()
    return torch.ops.lambdapo.rms_norm_forward.default(x, weight, float(eps))[0]


def swiglu(gate_up: Tensor) -> Tensor:
    """The SwiGLU activation of gated MLPs, fused: ``silu(gate) * up`` where ``gate`` and
    ``up`` are the two halves of the last dimension of ``gate_up``.

    The activation of Llama, Qwen2/3 and Mistral MLPs (``act_fn(gate_proj(x)) *
    up_proj(x)``) taken from one concatenated gate-and-up projection, in one pass with
    float32 arithmetic (float64 for float64), rounded once to the input dtype (torch
    rounds ``silu(gate)`` before the product). Backward saves only ``gate_up`` and returns
    its gradient in the same ``[gate | up]`` layout, so the concatenated projection's
    backward takes it without a copy. Rows are independent; the result does not depend on
    the thread count.

    Args:
        gate_up: ``[..., 2I]`` float32, float16, bfloat16 or float64 (any strides: a
            non-contiguous one is copied); ``gate_up[..., :I]`` is the gate,
            ``gate_up[..., I:]`` the up projection.

    Returns:
        ``[..., I]`` in the dtype of ``gate_up``.

    Raises:
        RuntimeError: a dtype other than those above, or a last dimension that is zero or
            odd (the message names ``gate_up``), or the compiled library is unavailable.
    """
    require_library()
    return torch.ops.lambdapo.swiglu_forward.default(gate_up)


def decode_attention(q: Tensor, keys: Tensor, values: Tensor, seen: int, *,
                     scale: float, mask: Tensor | None = None) -> Tensor:
    """Attention of one new query token per row over key-value buffers, fused: a decode
    step's ``softmax(scale * q k^T + mask) v`` over the first ``seen`` columns.

    One pass over the buffers per query head, the scores kept in the accumulation type
    (float32, float64 for float64) and never written out, instead of a score matmul, a
    softmax and a value matmul with their ``[B, H, seen]`` intermediates. Grouped-query heads
    share their key-value head's buffers. Inference only: there is no backward.

    Args:
        q: ``[B, kv_heads, G, head_dim]``, the G query heads of each key-value head (G = 1
            without grouped-query attention); float32, float16, bfloat16 or float64.
        keys, values: ``[B, kv_heads, W, head_dim]`` buffers in the dtype and on the device of
            ``q`` (columns past ``seen`` are not read).
        seen: columns attended, ``1 <= seen <= W``.
        scale: multiplies ``q k^T`` (``head_dim ** -0.5`` for standard attention; finite).
        mask: ``[B, >= seen]`` added to every head's scores of the row (0 where attended,
            ``-inf`` on padding), the dtype of ``q``; None: no mask. A row whose attended
            columns are all ``-inf`` gives NaN, as torch's softmax does.

    Returns:
        ``[B, kv_heads, G, head_dim]`` in the dtype of ``q``.

    Raises:
        ValueError: ``seen`` outside ``[1, W]``, a non-finite ``scale``.
        RuntimeError: shape, dtype or device mismatches (the message names the argument);
            on CUDA a head_dim over 256; the compiled library is unavailable.
    """
    require_library()
    return torch.ops.lambdapo.decode_attention.default(q, keys, values, mask, int(seen),
                                                       float(scale))


SEMANTIC_METRICS = ("rouge_n", "rouge_l")


def _as_sequences(seqs, name: str, device: torch.device | None = None, validate: bool = True):
    """(values, starts, lengths) int64 of one of the accepted forms; errors name ``name``.
    ``validate=False`` skips the checks that read offsets/lengths back to the host."""
    if isinstance(seqs, (list, tuple)) and not (
            len(seqs) == 2 and all(isinstance(t, Tensor) for t in seqs)):
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
        values = torch.tensor([int(t) for s in seqs for t in s], dtype=torch.int64)
        starts = torch.cumsum(lengths, 0) - lengths
        if device is not None:
            values, starts, lengths = values.to(device), starts.to(device), lengths.to(device)
        return values, starts, lengths
    if not (isinstance(seqs, tuple) and len(seqs) == 2):
        raise TypeError(f"{name} must be (values, offsets), (ids, lengths) or a list of lists "
                        f"of token ids, got {type(seqs).__name__}")
    ids, index = seqs
    for label, t in ((f"{name} ids", ids), (f"{name} offsets/lengths", index)):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{label} must be an integer tensor, got {t.dtype}")
    if ids.dim() == 1:  # packed: values [T], offsets [B+1]
        offsets = index.to(torch.int64)
        if offsets.dim() != 1 or offsets.numel() < 1:
            raise ValueError(f"{name} offsets must be 1-D [B+1], got shape {tuple(offsets.shape)}")
        if validate and offsets.numel() > 1 and bool((offsets[1:] < offsets[:-1]).any()):
            raise ValueError(f"{name} offsets must be non-decreasing")
        if validate and (bool(offsets[0] < 0) or int(offsets[-1]) > ids.numel()):
            raise ValueError(f"{name} offsets must lie in [0, {ids.numel()}] (the number of "
                             f"values)")
        return ids.to(torch.int64), offsets[:-1].contiguous(), (offsets[1:] - offsets[:-1])
    if ids.dim() == 2:  # padded: ids [B, L], lengths [B]
        lengths = index.to(torch.int64)
        if lengths.shape != ids.shape[:1]:
            raise ValueError(f"{name} lengths must have shape [{ids.shape[0]}], got "
                             f"{tuple(lengths.shape)}")
        if validate and lengths.numel() and (bool((lengths < 0).any())
                                             or int(lengths.max()) > ids.shape[1]):
            raise ValueError(f"{name} lengths must lie in [0, {ids.shape[1]}] (the padded "
                             f"length)")
        width = ids.shape[1]
        starts = torch.arange(ids.shape[0], device=ids.device, dtype=torch.int64) * width
        return ids.to(torch.int64).contiguous().view(-1), starts, lengths
    raise ValueError(f"{name} ids must be 1-D (packed) or 2-D (padded), got shape "
                     f"{tuple(ids.shape)}")


def _overlap_inputs(cand, ref, ref_index, validate):
    cand_seq = _as_sequences(cand, "cand", validate=validate)
    device = cand_seq[0].device
    ref_seq = _as_sequences(ref, "ref", device, validate)
    batch, num_refs = cand_seq[1].numel(), ref_seq[1].numel()
    if ref_index is None:
        if num_refs != batch:
            raise ValueError(f"ref_index is needed when the number of references ({num_refs}) "
                             f"differs from the number of candidates ({batch})")
        ref_index = torch.arange(batch, device=device)
    elif not isinstance(ref_index, Tensor):
        ref_index = torch.as_tensor(ref_index, device=device)
    if ref_index.is_floating_point():
        raise TypeError(f"ref_index must be an integer tensor, got {ref_index.dtype}")
    return (*cand_seq, *ref_seq, ref_index.to(torch.int64))


def ngram_overlap(cand, ref, *, max_n: int = 4, ref_index: Tensor | None = None,
                  validate: bool = True):
    """Clipped n-gram matches between candidates and their references, n = 1..max_n.

    ``matches[b, n-1] = sum over n-grams g of min(count_cand(g), count_ref(g))``, exactly as
    Google's ``rouge-score`` counts them on the same tokens.

    Args:
        cand: candidate token ids: ``(values [T], offsets [B+1])`` packed,
            ``(ids [B, L], lengths [B])`` padded, or a list of lists. Ids must be >= 0.
        ref: reference token ids in any of the same forms (R sequences).
        max_n: largest n-gram order (>= 1).
        ref_index: ``[B]`` reference row of each candidate (G candidates may share one
            reference without copying it); default: candidate b uses reference b.
        validate: check offsets, lengths, ids and ``ref_index`` against each other (reads
            them back: host syncs on CUDA). ``False`` trusts them: no host sync, CUDA-graph
            capturable. An unchecked bad value gives the counts of the clipped input, never
            an out-of-bounds access: each sequence is clipped to its values (start into
            ``[0, T]``, length into ``[0, T - start]``), an out-of-range ``ref_index`` means an
            empty reference, and negative ids compare like other ids. A reference holds at
            most 2^29 tokens: checked, a longer one raises; unchecked, it is cut to 2^29.

    Returns:
        ``(matches, cand_counts, ref_counts)``, int64 ``[B, max_n]``: clipped matches, number
        of n-grams in the candidate, number in its reference (of the clipped sequences).

    Raises:
        ValueError / TypeError / RuntimeError naming the argument for malformed inputs
        (offsets not non-decreasing or past the end, lengths > L, ref_index out of range,
        negative ids, references over 2^29 tokens (with ``validate``), float tensors).
    """
    require_library()
    return torch.ops.lambdapo.ngram_overlap.default(
        *_overlap_inputs(cand, ref, ref_index, validate), int(max_n), bool(validate))


def lcs_length(cand, ref, *, ref_index: Tensor | None = None, validate: bool = True) -> Tensor:
    """Length of the longest common subsequence of each candidate and its reference
    (bit-parallel, 64 reference positions per machine word). Inputs as in
    :func:`ngram_overlap` (``validate`` too). Returns int64 ``[B]``."""
    require_library()
    return torch.ops.lambdapo.lcs_length.default(*_overlap_inputs(cand, ref, ref_index, validate),
                                                 bool(validate))[0]


def _f_measure(p: Tensor, r: Tensor, beta: float) -> Tensor:
    # Same operation order as rouge-score's 2 * p * r / (p + r) when beta = 1.
    b2 = beta * beta
    denom = b2 * p + r
    return torch.where(denom > 0, (1 + b2) * p * r / torch.where(denom > 0, denom, 1), 0.0)


def rouge_n(cand, ref, *, max_n: int = 2, beta: float = 1.0, ref_index: Tensor | None = None,
            validate: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """ROUGE-1..max_n precision, recall and F-measure, float32 ``[B, max_n]`` each.

    ``P = m / max(#cand n-grams, 1)``, ``R = m / max(#ref n-grams, 1)``,
    ``F = (1 + beta^2) P R / (beta^2 P + R)`` (0 when P = R = 0): rouge-score's definitions
    (its F is beta = 1), computed in float64 then rounded once. Inputs and ``validate`` as
    in :func:`ngram_overlap`."""
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"rouge_n: beta must be finite and > 0, got {beta}")
    matches, cand_counts, ref_counts = ngram_overlap(cand, ref, max_n=max_n, ref_index=ref_index,
                                                     validate=validate)
    m = matches.double()
    p = m / cand_counts.clamp_min(1).double()
    r = m / ref_counts.clamp_min(1).double()
    return p.float(), r.float(), _f_measure(p, r, beta).float()


def rouge_l(cand, ref, *, beta: float = 1.0, ref_index: Tensor | None = None,
            validate: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """ROUGE-L precision ``LCS/|cand|``, recall ``LCS/|ref|`` and F-measure, float32 ``[B]``
    each; all 0 when either sequence is empty (as rouge-score). Inputs and ``validate`` as in
    :func:`ngram_overlap`."""
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"rouge_l: beta must be finite and > 0, got {beta}")
    require_library()
    # The op returns the lengths it compared (with validate=False, those of the clipped
    # sequences): no index with an unchecked ref_index here.
    lcs, cand_len, ref_len = (t.double() for t in torch.ops.lambdapo.lcs_length.default(
        *_overlap_inputs(cand, ref, ref_index, validate), bool(validate)))
    p = torch.where(cand_len > 0, lcs / cand_len.clamp_min(1), 0.0)
    r = torch.where(ref_len > 0, lcs / ref_len.clamp_min(1), 0.0)
    return p.float(), r.float(), _f_measure(p, r, beta).float()


def semantic_density(cand, ref, *, metric: str = "rouge_n", max_n: int = 2, beta: float = 1.0,
                     ref_index: Tensor | None = None, validate: bool = True) -> Tensor:
    """The semantic-density reward of DESIGN.md section 2, float32 ``[B]`` in [0, 1]: the
    mean over n = 1..max_n of the ROUGE-n F-measure (``metric="rouge_n"``) or the ROUGE-L
    F-measure (``metric="rouge_l"``) between each candidate and its reference. Inputs and
    ``validate`` as in :func:`ngram_overlap`."""
    if metric == "rouge_n":
        return rouge_n(cand, ref, max_n=max_n, beta=beta, ref_index=ref_index,
                       validate=validate)[2].mean(-1)
    if metric == "rouge_l":
        return rouge_l(cand, ref, beta=beta, ref_index=ref_index, validate=validate)[2]
    raise ValueError(f"semantic_density: metric must be one of {SEMANTIC_METRICS}, got "
                     f"{metric!r}")


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_ID_DTYPES = (torch.int64, torch.int32)


def _check_same_device(op: str, first: tuple[str, Tensor], *others: tuple[str, Tensor | None]):
    """Fake-kernel check (trace time) that every given tensor is on ``first``'s device."""
    name, tensor = first
    for other_name, other in others:
        if other is not None:
            torch._check(other.device == tensor.device,
                         lambda: f"{op}: {other_name} is on {other.device} but {name} is on "
                                 f"{tensor.device}")


def _check_float_dtype(op: str, name: str, tensor: Tensor) -> None:
    """Fake-kernel check (trace time) of the floating dtypes every float op takes."""
    torch._check(tensor.dtype in _FLOAT_DTYPES,
                 lambda: f"{op}: {name} must be float32, float16, bfloat16 or float64, got "
                         f"{tensor.dtype}")


def _check_logprob_args(op: str, inputs: tuple[str, Tensor], targets: Tensor) -> None:
    """The shape/dtype/device checks of the log-prob kernels, at trace time."""
    name, x = inputs
    _check_float_dtype(op, name, x)
    torch._check(x.dim() >= 1, lambda: f"{op}: {name} must have at least one dimension")
    torch._check(targets.dtype in _ID_DTYPES,
                 lambda: f"{op}: targets must be int64 or int32, got {targets.dtype}")
    torch._check(targets.shape == x.shape[:-1],
                 lambda: f"{op}: targets must have the leading shape of {name} "
                         f"{tuple(x.shape[:-1])}, got {tuple(targets.shape)}")
    _check_same_device(op, inputs, ("targets", targets))


def _result_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_logprob_outputs(like: Tensor, return_entropy: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(logprobs, entropy, lse) of the leading shape of ``like`` [..., last]."""
    lead = like.shape[:-1]
    dtype = _result_dtype(like.dtype)
    entropy_shape = lead if return_entropy else (0,)
    return (like.new_empty(lead, dtype=dtype), like.new_empty(entropy_shape, dtype=dtype),
            like.new_empty(lead, dtype=dtype))


if _LOAD_ERROR is None:

    @torch.library.register_fake("lambdapo::lambda_advantages")
    def _lambda_advantages_fake(rewards, scores, mask, group_ids, beta, normalize, eps,
                                validate=True):
        torch._check(scores.shape == rewards.shape,
                     lambda: f"lambda_advantages: scores has shape {tuple(scores.shape)} "
                             f"but rewards has shape {tuple(rewards.shape)}")
        for name, t in (("rewards", rewards), ("scores", scores)):
            torch._check(t.is_floating_point(),
                         lambda: f"lambda_advantages: {name} must be a floating-point tensor, "
                                 f"got {t.dtype}")
        torch._check(mask is None or (mask.dtype == torch.bool and mask.shape == rewards.shape),
                     lambda: f"lambda_advantages: mask must be a bool tensor of the shape of "
                             f"rewards {tuple(rewards.shape)}, got {mask.dtype} "
                             f"{tuple(mask.shape)}")
        torch._check(rewards.dim() == 2 if group_ids is None else rewards.dim() == 1,
                     lambda: "lambda_advantages: rewards must be 2-D [P, G] (or 1-D [N] with "
                             f"group_ids), got shape {tuple(rewards.shape)}")
        torch._check(group_ids is None or group_ids.shape == rewards.shape,
                     lambda: f"lambda_advantages: group_ids has shape {tuple(group_ids.shape)} "
                             f"but rewards has shape {tuple(rewards.shape)}")
        _check_same_device("lambda_advantages", ("rewards", rewards), ("scores", scores),
                           ("mask", mask), ("group_ids", group_ids))
        return rewards.new_empty(rewards.shape, dtype=torch.float32)

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
        _check_same_device(op, ("hidden", hidden), ("weight", weight), ("bias", bias))
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

    @torch.library.register_fake("lambdapo::rms_norm_forward")
    def _rms_norm_forward_fake(x, weight, eps):
        _check_float_dtype("rms_norm", "x", x)
        torch._check(x.dim() >= 1, lambda: "rms_norm: x must have at least one dimension")
        torch._check(weight.dim() == 1 and weight.shape[0] == x.shape[-1],
                     lambda: f"rms_norm: weight must have shape [{x.shape[-1]}] (the last "
                             f"dimension of x), got {tuple(weight.shape)}")
        torch._check(weight.dtype == x.dtype,
                     lambda: f"rms_norm: weight has dtype {weight.dtype} but x has {x.dtype}")
        _check_same_device("rms_norm", ("x", x), ("weight", weight))
        return (x.new_empty(x.shape),
                x.new_empty(x.shape[:-1], dtype=_result_dtype(x.dtype)))

    @torch.library.register_fake("lambdapo::rms_norm_backward")
    def _rms_norm_backward_fake(grad_y, x, weight, rstd, output_mask):
        need_x, need_weight = output_mask
        return (x.new_empty(x.shape if need_x else (0,)),
                weight.new_empty(weight.shape if need_weight else (0,)))

    def _rms_norm_setup_context(ctx, inputs, output):
        x, weight, _eps = inputs
        ctx.save_for_backward(x, weight, output[1])
        ctx.set_materialize_grads(False)

    def _rms_norm_backward(ctx, grad_y, _grad_rstd):
        x, weight, rstd = ctx.saved_tensors
        output_mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
        if grad_y is None or not any(output_mask):
            return None, None, None
        grad_x, grad_weight = torch.ops.lambdapo.rms_norm_backward.default(
            grad_y, x, weight, rstd, output_mask)
        return (grad_x if output_mask[0] else None, grad_weight if output_mask[1] else None,
                None)

    torch.library.register_autograd("lambdapo::rms_norm_forward", _rms_norm_backward,
                                    setup_context=_rms_norm_setup_context)

    @torch.library.register_fake("lambdapo::swiglu_forward")
    def _swiglu_forward_fake(gate_up):
        _check_float_dtype("swiglu", "gate_up", gate_up)
        torch._check(gate_up.dim() >= 1 and gate_up.shape[-1] > 0 and gate_up.shape[-1] % 2 == 0,
                     lambda: f"swiglu: gate_up must have an even, non-zero last dimension "
                             f"(gate then up), got shape {tuple(gate_up.shape)}")
        return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))

    @torch.library.register_fake("lambdapo::swiglu_backward")
    def _swiglu_backward_fake(grad_y, gate_up):
        return gate_up.new_empty(gate_up.shape)

    def _swiglu_setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.set_materialize_grads(False)

    def _swiglu_backward(ctx, grad_y):
        if grad_y is None or not ctx.needs_input_grad[0]:
            return None
        return torch.ops.lambdapo.swiglu_backward.default(grad_y, ctx.saved_tensors[0])

    torch.library.register_autograd("lambdapo::swiglu_forward", _swiglu_backward,
                                    setup_context=_swiglu_setup_context)

    @torch.library.register_fake("lambdapo::decode_attention")
    def _decode_attention_fake(q, keys, values, mask, seen, scale):
        _check_float_dtype("decode_attention", "q", q)
        torch._check(q.dim() == 4, lambda: f"decode_attention: q must be [B, kv_heads, heads "
                                           f"per kv head, head_dim], got shape {tuple(q.shape)}")
        for name, t in (("keys", keys), ("values", values)):
            torch._check(t.dim() == 4 and t.shape[:2] == q.shape[:2] and t.shape[3] == q.shape[3],
                         lambda: f"decode_attention: {name} must be [B, kv_heads, W, head_dim] "
                                 f"matching q, got shape {tuple(t.shape)}")
            torch._check(t.dtype == q.dtype,
                         lambda: f"decode_attention: {name} has dtype {t.dtype} but q has "
                                 f"{q.dtype}")
        torch._check(1 <= seen <= keys.shape[2],
                     lambda: f"decode_attention: seen must lie in [1, {keys.shape[2]}], got {seen}")
        _check_same_device("decode_attention", ("q", q), ("keys", keys), ("values", values),
                           ("mask", mask))
        return q.new_empty(q.shape)

    @torch.library.register_fake("lambdapo::ngram_overlap")
    def _ngram_overlap_fake(cand_values, cand_starts, cand_lengths, ref_values, ref_starts,
                            ref_lengths, ref_index, max_n, validate=True):
        _check_overlap_fake("ngram_overlap", cand_values, cand_starts, cand_lengths,
                            ref_values, ref_starts, ref_lengths, ref_index)
        shape = (cand_starts.shape[0], max_n)
        return tuple(cand_values.new_empty(shape, dtype=torch.int64) for _ in range(3))

    @torch.library.register_fake("lambdapo::lcs_length")
    def _lcs_length_fake(cand_values, cand_starts, cand_lengths, ref_values, ref_starts,
                         ref_lengths, ref_index, validate=True):
        _check_overlap_fake("lcs_length", cand_values, cand_starts, cand_lengths, ref_values,
                            ref_starts, ref_lengths, ref_index)
        return tuple(cand_values.new_empty(cand_starts.shape, dtype=torch.int64)
                     for _ in range(3))

    def _check_overlap_fake(op, cand_values, cand_starts, cand_lengths, ref_values, ref_starts,
                            ref_lengths, ref_index):
        named = (("cand_values", cand_values), ("cand_starts", cand_starts),
                 ("cand_lengths", cand_lengths), ("ref_values", ref_values),
                 ("ref_starts", ref_starts), ("ref_lengths", ref_lengths),
                 ("ref_index", ref_index))
        for name, t in named:
            torch._check(t.dtype == torch.int64 and t.dim() == 1,
                         lambda: f"{op}: {name} must be a 1-D int64 tensor, got {t.dtype} of "
                                 f"shape {tuple(t.shape)}")
        _check_same_device(op, *named)
        torch._check(ref_index.shape == cand_starts.shape,
                     lambda: f"{op}: ref_index must have one entry per candidate "
                             f"({cand_starts.shape[0]}), got {ref_index.shape[0]}")
