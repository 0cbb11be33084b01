"""Bad inputs of the sequence-overlap ops (ngram_overlap, rouge_n, lcs_length, rouge_l,
semantic_density), checked and unchecked (validate=False), run by tests/ops/test_bad_inputs.py
through tests/ops/bad_input_runner.py."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

import lambdapo_ext
from lambdapo_ext import overlap

from bad_input_runner import Case, assert_same, check_shapes, int64, with_value

# The lambdapo:: dispatcher ops behind each public op: a backend is present for the public op
# when all of them have a kernel for it.
DISPATCH_OPS = {
    "ngram_overlap": ("ngram_overlap",),
    "rouge_n": ("ngram_overlap",),
    "lcs_length": ("lcs_length",),
    "rouge_l": ("lcs_length",),
    "semantic_density": ("ngram_overlap", "lcs_length"),
}


# Two candidates (packed) against one reference; ref_index maps both to it.
MAX_N = {"ngram_overlap": 4, "rouge_n": 2, "semantic_density": 2}
TAKES_BETA = ("rouge_n", "rouge_l", "semantic_density")


def _all_zero(shape: tuple[int, ...], dtype: torch.dtype) -> Callable[[Any], None]:
    """check(): every output tensor has ``shape`` and ``dtype`` and holds only zeros."""
    def check(result):
        check_shapes(shape, dtype)(result)
        for out in (result if isinstance(result, tuple) else (result,)):
            assert bool((out == 0).all()), f"expected zeros, got {out.tolist()}"
    return check


def _cand(device: str):
    return int64([1, 2, 3, 4, 2, 3], device), int64([0, 4, 6], device)


def _ref(device: str):
    return int64([1, 2, 3, 5], device), int64([0, 4], device)


def _both(device: str) -> torch.Tensor:
    return int64([0, 0], device)


def _overlap_caller(op: str) -> Callable[..., Any]:
    def call(cand, ref, **kwargs):
        return getattr(lambdapo_ext, op)(cand, ref, **kwargs)
    return call


def _overlap_output_shape(op: str, batch: int) -> tuple[int, ...]:
    return (batch, MAX_N[op]) if op in ("ngram_overlap", "rouge_n") else (batch,)


def _overlap_output_dtype(op: str) -> torch.dtype:
    return torch.int64 if op in ("ngram_overlap", "lcs_length") else torch.float32


def overlap_cases(op: str) -> list[Case]:
    f = _overlap_caller(op)
    out_shape = _overlap_output_shape
    dtype = _overlap_output_dtype(op)
    ref_index_sigsegv = ("SIGSEGV with CPU and CUDA inputs on the H200 machine (issue 13)"
                         if op in ("ngram_overlap", "rouge_n") else "")
    cases = [
        Case(op, "shape", "padded_lengths_shape_differs",
             lambda d: f((int64([[1, 2, 3], [4, 5, 6]], d), int64([3, 3, 3], d)), _ref(d),
                         ref_index=_both(d)), ("cand",)),
        Case(op, "shape", "ids_rank3",
             lambda d: f((torch.ones(2, 2, 2, dtype=torch.int64, device=d), int64([2, 2], d)),
                         _ref(d), ref_index=_both(d)), ("cand",)),
        Case(op, "shape", "offsets_rank2",
             lambda d: f((_cand(d)[0], _cand(d)[1].view(3, 1)), _ref(d), ref_index=_both(d)),
             ("cand",)),
        Case(op, "shape", "ref_index_length_differs",
             lambda d: f(_cand(d), _ref(d), ref_index=int64([0, 0, 0], d)), ("ref_index",)),
        Case(op, "shape", "reference_count_differs_without_ref_index",
             lambda d: f(_cand(d), _ref(d)), ("ref_index",)),
        Case(op, "dtype", "float_ids",
             lambda d: f((_cand(d)[0].float(), _cand(d)[1]), _ref(d), ref_index=_both(d)),
             ("cand",)),
        Case(op, "dtype", "float_offsets",
             lambda d: f((_cand(d)[0], _cand(d)[1].float()), _ref(d), ref_index=_both(d)),
             ("cand",)),
        Case(op, "dtype", "bool_ref_lengths",
             lambda d: f(_cand(d), (int64([[1, 2]], d), int64([1], d).bool()),
                         ref_index=_both(d)), ("ref",)),
        Case(op, "dtype", "float_ref_index",
             lambda d: f(_cand(d), _ref(d), ref_index=_both(d).float()), ("ref_index",)),
        Case(op, "device", "ref_on_cpu",
             lambda d: f(_cand(d), _ref("cpu"), ref_index=_both(d)), ("ref",), cuda_only=True),
        Case(op, "device", "ref_index_on_cpu",
             lambda d: f(_cand(d), _ref(d), ref_index=_both("cpu")), ("ref_index",),
             cuda_only=True),
        Case(op, "device", "cand_on_cpu",
             lambda d: f(_cand("cpu"), _ref(d), ref_index=_both(d)), ("ref", "cand"),
             cuda_only=True),
        Case(op, "range", "ref_index_out_of_range",
             lambda d: f(_cand(d), _ref(d), ref_index=int64([0, 3], d)), ("ref_index",),
             issue=ref_index_sigsegv),
        Case(op, "range", "ref_index_negative",
             lambda d: f(_cand(d), _ref(d), ref_index=int64([-1, 0], d)), ("ref_index",)),
        Case(op, "range", "negative_token_id",
             lambda d: f((int64([1, -7, 3, 4, 2, 3], d), _cand(d)[1]), _ref(d),
                         ref_index=_both(d)), ("cand",)),
        Case(op, "range", "negative_token_id_in_ref",
             lambda d: f(_cand(d), (int64([1, 2, -3, 5], d), _ref(d)[1]), ref_index=_both(d)),
             ("ref",)),
        Case(op, "range", "lengths_past_row_length",
             lambda d: f((int64([[1, 2, 3], [4, 5, 6]], d), int64([3, 4], d)), _ref(d),
                         ref_index=_both(d)), ("cand",)),
        Case(op, "range", "negative_length",
             lambda d: f((int64([[1, 2, 3], [4, 5, 6]], d), int64([3, -1], d)), _ref(d),
                         ref_index=_both(d)), ("cand",)),
        Case(op, "range", "offsets_not_monotone",
             lambda d: f((_cand(d)[0], int64([0, 5, 4], d)), _ref(d), ref_index=_both(d)),
             ("cand",)),
        Case(op, "range", "offsets_past_end",
             lambda d: f((_cand(d)[0], int64([0, 4, 9], d)), _ref(d), ref_index=_both(d)),
             ("cand",)),
        Case(op, "range", "offsets_start_negative",
             lambda d: f((_cand(d)[0], int64([-2, 4, 6], d)), _ref(d), ref_index=_both(d)),
             ("cand",)),
        Case(op, "nonfinite", "nan_in_float_ids",
             lambda d: f((with_value(_cand(d)[0].double(), 1, math.nan), _cand(d)[1]), _ref(d),
                         ref_index=_both(d)), ("cand",)),
        Case(op, "empty", "zero_candidates",
             lambda d: f((int64([], d), int64([0], d)), _ref(d), ref_index=int64([], d)),
             check=check_shapes(out_shape(op, 0), dtype)),
        Case(op, "empty", "empty_sequences",
             lambda d: f((int64([], d), int64([0, 0], d)), (int64([], d), int64([0, 0], d))),
             check=_all_zero(out_shape(op, 1), dtype)),
        Case(op, "empty", "zero_references_with_candidates",
             lambda d: f(_cand(d), (int64([], d), int64([0], d)), ref_index=_both(d)),
             ("ref_index",)),
        Case(op, "scalar", "ref_index_python_int",
             lambda d: f(_cand(d), _ref(d), ref_index=0), ("ref_index",)),
        Case(op, "memory", "values_strided",
             lambda d: f((int64([1, 0, 2, 0, 3, 0, 4, 0, 2, 0, 3, 0], d)[::2], _cand(d)[1]),
                         _ref(d), ref_index=_both(d)), ("cand",),
             equal_to=lambda d: f(_cand(d), _ref(d), ref_index=_both(d))),
        Case(op, "memory", "ref_index_expanded",
             lambda d: f(_cand(d), _ref(d), ref_index=int64([0], d).expand(2)), ("ref_index",),
             equal_to=lambda d: f(_cand(d), _ref(d), ref_index=_both(d))),
        Case(op, "memory", "padded_ids_expanded",
             lambda d: f((int64([[1, 2, 3, 4]], d).expand(2, 4), int64([4, 2], d)), _ref(d),
                         ref_index=_both(d)), ("cand",),
             equal_to=lambda d: f((int64([[1, 2, 3, 4], [1, 2, 3, 4]], d), int64([4, 2], d)),
                                  _ref(d), ref_index=_both(d))),
        Case(op, "memory", "padded_lengths_strided",
             lambda d: f((int64([[1, 2, 3, 4], [2, 3, 9, 9]], d), int64([4, 0, 2, 0], d)[::2]),
                         _ref(d), ref_index=_both(d)), ("cand",),
             equal_to=lambda d: f((int64([[1, 2, 3, 4], [2, 3, 9, 9]], d), int64([4, 2], d)),
                                  _ref(d), ref_index=_both(d))),
    ]
    if op in MAX_N:
        cases += [
            Case(op, "scalar", "max_n_zero",
                 lambda d: f(_cand(d), _ref(d), ref_index=_both(d), max_n=0), ("max_n",)),
            Case(op, "scalar", "max_n_negative",
                 lambda d: f(_cand(d), _ref(d), ref_index=_both(d), max_n=-2), ("max_n",)),
        ]
    if op in TAKES_BETA:
        cases += [
            Case(op, "nonfinite", "beta_nan",
                 lambda d: f(_cand(d), _ref(d), ref_index=_both(d), beta=math.nan), ("beta",)),
            Case(op, "nonfinite", "beta_inf",
                 lambda d: f(_cand(d), _ref(d), ref_index=_both(d), beta=math.inf), ("beta",)),
            Case(op, "scalar", "beta_zero",
                 lambda d: f(_cand(d), _ref(d), ref_index=_both(d), beta=0.0), ("beta",)),
            Case(op, "scalar", "beta_negative",
                 lambda d: f(_cand(d), _ref(d), ref_index=_both(d), beta=-1.0), ("beta",)),
        ]
    if op == "semantic_density":
        cases.append(Case(op, "scalar", "metric_unknown",
                          lambda d: f(_cand(d), _ref(d), ref_index=_both(d), metric="bleu"),
                          ("metric",)))
    return cases


# ------------------------------------------------ unchecked sequence-overlap inputs
# With validate=False a bad offset, length, ref_index or id is not an error, but it must never
# reach memory outside the inputs: the kernels read the sequences clipped by the rule of
# csrc/sequence_overlap.h, and give the result of the clipped input (issue 17).

# The longest reference of the overlap ops (kMaxReferenceTokens, csrc/sequence_overlap.h).
MAX_REFERENCE_TOKENS = 2**29


def clipped_sequences(values: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
                      max_length: int | None = None) -> list[list[int]]:
    """The sequences an unchecked overlap op reads: each clipped to the values, its start
    into [0, T] and its length into [0, T - start] (T = the number of values), and into
    [0, max_length] (references: MAX_REFERENCE_TOKENS; only inputs of more ids reach it)."""
    flat, total = values.tolist(), values.numel()
    out = []
    for start, length in zip(starts.tolist(), lengths.tolist()):
        start = min(max(start, 0), total)
        length = min(max(length, 0), total - start)
        if max_length is not None:
            length = min(length, max_length)
        out.append(flat[start:start + length])
    return out


def unchecked_overlap_expected(op: str, cand, ref, ref_index: torch.Tensor, **kwargs):
    """What ``op(cand, ref, ref_index=ref_index, validate=False, **kwargs)`` must give: the
    validated op on the clipped sequences, an out-of-range ref_index meaning an empty
    reference, negative ids renamed one to one to non-negative ones (they compare like any
    other id). On the CPU."""
    cands = clipped_sequences(*(t.cpu() for t in overlap._as_sequences(cand, "cand",
                                                                    validate=False)))
    refs = clipped_sequences(*(t.cpu() for t in overlap._as_sequences(ref, "ref",
                                                                   validate=False)),
                             max_length=MAX_REFERENCE_TOKENS)
    paired = [refs[i] if 0 <= i < len(refs) else [] for i in ref_index.tolist()]
    low = min([0] + [t for seq in cands + paired for t in seq])
    rename = lambda seqs: [[t - low for t in seq] for seq in seqs]  # noqa: E731
    return getattr(lambdapo_ext, op)(rename(cands), rename(paired), **kwargs)


def _matches_unchecked(op: str, make: Callable[[str], tuple], kwargs: dict):
    def check(result):
        cand, ref, ref_index = make("cpu")
        on_cpu = tuple(t.cpu() for t in result) if isinstance(result, tuple) else result.cpu()
        assert_same(on_cpu, unchecked_overlap_expected(op, cand, ref, ref_index, **kwargs))
    return check


# (name, (cand, ref, ref_index) on a device): two candidates, one or two references.
UNCHECKED_OVERLAP_INPUTS = [
    ("ref_index_out_of_range", lambda d: (_cand(d), _ref(d), int64([1, 0], d))),
    ("ref_index_negative", lambda d: (_cand(d), _ref(d), int64([0, -3], d))),
    ("ref_index_huge", lambda d: (_cand(d), _ref(d), int64([2**62, -2**62], d))),
    ("negative_token_ids", lambda d: ((int64([1, -7, 3, -7, 2, 3], d), _cand(d)[1]),
                                      (int64([-7, 3, -1, 5], d), _ref(d)[1]), _both(d))),
    ("offsets_not_monotone_and_past_end", lambda d: ((_cand(d)[0], int64([3, 1, 40], d)),
                                                     (_ref(d)[0], int64([-5, 9], d)),
                                                     _both(d))),
    ("padded_lengths_out_of_range", lambda d: ((int64([[1, 2, 3], [2, 3, 4]], d),
                                                int64([7, -2], d)),
                                               (int64([[2, 3, 4, 5]], d), int64([2**62], d)),
                                               _both(d))),
    ("huge_offsets", lambda d: ((_cand(d)[0], int64([0, 2**62, 2], d)),
                                (_ref(d)[0], int64([0, 2**62], d)), _both(d))),
]


def unchecked_overlap_cases(op: str) -> list[Case]:
    kwargs = {"max_n": MAX_N[op]} if op in MAX_N else {}
    return [Case(op, "range", f"unchecked_{name}",
                 lambda d, make=make: getattr(lambdapo_ext, op)(*make(d)[:2], ref_index=make(d)[2],
                                                      validate=False, **kwargs),
                 check=_matches_unchecked(op, make, kwargs))
            for name, make in UNCHECKED_OVERLAP_INPUTS]


CASES: list[Case] = ([c for op in DISPATCH_OPS for c in overlap_cases(op)]
                     + [c for op in DISPATCH_OPS for c in unchecked_overlap_cases(op)])
# A small valid call of each op: after a case on CUDA, it shows whether the device still works.
SMOKE_CALLS: dict[str, Callable[[str], Any]] = {
    op: lambda d, op=op: getattr(lambdapo_ext, op)(_cand(d), _ref(d), ref_index=_both(d))
    for op in DISPATCH_OPS
}
