"""The n-gram and LCS ops on token ids and the ROUGE scores and semantic density built on
them (DESIGN.md section 2), with their sequence-input handling and fake kernels."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor

from lambdapo_ext._checks import check_same_device
from lambdapo_ext._loader import _LOAD_ERROR, require_library

# semantic_density's metrics: the one Python list (configs and adapters import it).
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


if _LOAD_ERROR is None:

    def _check_overlap_fake(op, cand_values, cand_starts, cand_lengths, ref_values, ref_starts,
                            ref_lengths, ref_index):
        """The kernels' checks of their shared sequence arguments, at trace time."""
        named = (("cand_values", cand_values), ("cand_starts", cand_starts),
                 ("cand_lengths", cand_lengths), ("ref_values", ref_values),
                 ("ref_starts", ref_starts), ("ref_lengths", ref_lengths),
                 ("ref_index", ref_index))
        for name, t in named:
            torch._check(t.dtype == torch.int64 and t.dim() == 1,
                         lambda: f"{op}: {name} must be a 1-D int64 tensor, got {t.dtype} of "
                                 f"shape {tuple(t.shape)}")
        check_same_device(op, *named)
        torch._check(ref_index.shape == cand_starts.shape,
                     lambda: f"{op}: ref_index must have one entry per candidate "
                             f"({cand_starts.shape[0]}), got {ref_index.shape[0]}")

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


_INNER_OPS = ("ngram_overlap:", "lcs_length:", "rouge_n:", "rouge_l:")


@contextlib.contextmanager
def _errors_named(op: str) -> Iterator[None]:
    """Errors of the ops ``op`` is built on name ``op``, the function the caller called."""
    try:
        yield
    except (ValueError, TypeError, RuntimeError, IndexError) as exc:
        message = str(exc)
        inner = next((name for name in _INNER_OPS if message.startswith(name)), None)
        if inner is None or inner == f"{op}:" or type(exc) not in (
                ValueError, TypeError, RuntimeError, IndexError):
            raise
        raise type(exc)(f"{op}:{message[len(inner):]}") from None


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
    with _errors_named("rouge_n"):
        matches, cand_counts, ref_counts = ngram_overlap(cand, ref, max_n=max_n,
                                                         ref_index=ref_index, validate=validate)
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
    with _errors_named("rouge_l"):
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
        with _errors_named("semantic_density"):
            return rouge_n(cand, ref, max_n=max_n, beta=beta, ref_index=ref_index,
                           validate=validate)[2].mean(-1)
    if metric == "rouge_l":
        with _errors_named("semantic_density"):
            return rouge_l(cand, ref, beta=beta, ref_index=ref_index, validate=validate)[2]
    raise ValueError(f"semantic_density: metric must be one of {SEMANTIC_METRICS}, got "
                     f"{metric!r}")

