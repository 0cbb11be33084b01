"""Bad inputs of every public lambdapo op, and a server that runs each in a process of its own.

A bad input must give a Python exception whose message names the offending argument; never a
signal, never an abort, never a silently accepted call (issue 13). Each case is one call (or a
forward and backward) on a small tensor; the server imports torch once and forks a fresh child
per case, so a crash kills only that child and costs milliseconds, not a torch import.

    python tests/ops/bad_input_cases.py --case token_logprobs/range/target_ge_vocab --device cpu
        runs one case in this process and prints its verdict (no isolation: for debugging)
    python tests/ops/bad_input_cases.py --serve
        the server: reads one JSON request per line, {"cases": [[id, device], ...],
        "jobs": N, "timeout_s": T}, and answers one JSON verdict per case, then {"done": true}

Verdicts: ok; crash (killed by a signal), timeout, died (exited without a verdict); accepted
(a bad input raised nothing); wrong-error (an exception type an op must not raise, such as
ZeroDivisionError); unnamed (the message does not name the argument); rejected-valid (a valid
input raised); wrong-result (a valid or strided input gave a wrong result); cuda-unusable (after
the case, a small valid call and torch.cuda.synchronize() failed in the same process).

Case classes: shape, dtype, device (CUDA only: a CPU call with a meta tensor goes to the fake
kernel, which returns uninitialized tensors instead of rejecting the mix), range (out-of-range
values), nonfinite, empty, scalar, memory (strided, expanded or overlapping inputs: the op may
reject them naming the argument, or must give the result of the contiguous input).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

import lambdapo_ext as lp

ALLOWED_ERRORS = (ValueError, TypeError, RuntimeError, IndexError)
DETAIL_CHARS = 600
DEFAULT_TIMEOUT_S = 60

# Message words that name an argument given as several tensors (the C++ ops take the packed
# parts separately).
ARGUMENT_ALIASES = {
    "cand": ("cand", "cand_values", "cand_starts", "cand_lengths"),
    "ref": ("ref", "ref_values", "ref_starts", "ref_lengths"),
}

# The lambdapo:: dispatcher ops behind each public op: a backend is present for the public op
# when all of them have a kernel for it. linear_token_logprobs is composite over
# token_logprobs_forward/backward.
DISPATCH_OPS = {
    "token_logprobs": ("token_logprobs_forward",),
    "linear_token_logprobs": ("token_logprobs_forward",),
    "lambda_advantages": ("lambda_advantages",),
    "ngram_overlap": ("ngram_overlap",),
    "rouge_n": ("ngram_overlap",),
    "lcs_length": ("lcs_length",),
    "rouge_l": ("lcs_length",),
    "semantic_density": ("ngram_overlap", "lcs_length"),
}


@dataclass(frozen=True)
class Case:
    """One bad (or edge-case valid) input of one op.

    ``call(device)`` runs the op. With ``names`` and neither ``check`` nor ``equal_to``, the
    call must raise an exception naming one of ``names``. With ``check`` the input is valid:
    ``check(result)`` must pass. With ``equal_to`` (layout cases) the call may raise naming one
    of ``names``, or must return ``equal_to(device)``'s result.
    """

    op: str
    kind: str
    name: str
    call: Callable[[str], Any]
    names: tuple[str, ...] = ()
    check: Callable[[Any], None] | None = None
    equal_to: Callable[[str], Any] | None = None
    cuda_only: bool = False
    issue: str = ""  # what issue 13 saw for this case, if it listed it

    @property
    def id(self) -> str:
        return f"{self.op}/{self.kind}/{self.name}"

    @property
    def devices(self) -> tuple[str, ...]:
        return ("cuda",) if self.cuda_only else ("cpu", "cuda")


def _long(values, device: str) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


def _shapes(shape: tuple[int, ...], dtype: torch.dtype) -> Callable[[Any], None]:
    """check(): every output tensor has ``shape`` and ``dtype``."""
    def check(result):
        for out in (result if isinstance(result, tuple) else (result,)):
            assert tuple(out.shape) == shape and out.dtype == dtype, (
                f"expected {dtype} {shape}, got {out.dtype} {tuple(out.shape)}")
    return check


def _all_zero(shape: tuple[int, ...], dtype: torch.dtype) -> Callable[[Any], None]:
    def check(result):
        _shapes(shape, dtype)(result)
        for out in (result if isinstance(result, tuple) else (result,)):
            assert bool((out == 0).all()), f"expected zeros, got {out.tolist()}"
    return check


# ---------------------------------------------------------------- token_logprobs
N, V, H = 4, 8, 6


def _logits(device: str, n: int = N, v: int = V) -> torch.Tensor:
    return torch.randn(n, v, device=device)


def _targets(device: str, n: int = N, v: int = V) -> torch.Tensor:
    return torch.arange(n, device=device) % v


def _tlp(logits, targets, **kwargs):
    return lp.token_logprobs(logits, targets, **kwargs)


def _tlp_grad(make_logits: Callable[[torch.Tensor], torch.Tensor], device: str,
              inplace: bool) -> torch.Tensor:
    """Gradient w.r.t. a leaf [1 or 4, V] of token_logprobs over make_logits(leaf) [N, V]."""
    leaf = torch.randn(N, V, device=device).requires_grad_(True)
    out = _tlp(make_logits(leaf), _targets(device), inplace_backward=inplace)
    out.sum().backward()
    return leaf.grad


def _expanded_rows(leaf: torch.Tensor) -> torch.Tensor:
    return leaf[:1].expand(N, V)


def _overlapping_rows(leaf: torch.Tensor) -> torch.Tensor:
    # Rows 2 elements apart over a [N, V] leaf: row r shares V - 2 elements with row r + 1.
    return leaf.as_strided((N, V), (2, 1))


def token_logprobs_cases() -> list[Case]:
    op = "token_logprobs"
    sigsegv = "SIGSEGV with CUDA tensors on the H200 machine (issue 13)"
    return [
        Case(op, "shape", "targets_not_leading_shape",
             lambda d: _tlp(_logits(d), _targets(d, n=N - 1)), ("targets",), issue=sigsegv),
        Case(op, "shape", "targets_leading_dims_swapped",
             lambda d: _tlp(torch.randn(2, 3, V, device=d), _targets(d, n=6).view(3, 2)),
             ("targets",)),
        Case(op, "shape", "logits_rank0",
             lambda d: _tlp(torch.tensor(1.0, device=d), torch.tensor(0, device=d)), ("logits",)),
        Case(op, "dtype", "float_targets",
             lambda d: _tlp(_logits(d), _targets(d).float()), ("targets",)),
        Case(op, "dtype", "bool_targets",
             lambda d: _tlp(_logits(d), _targets(d) > 0), ("targets",)),
        Case(op, "dtype", "int_logits",
             lambda d: _tlp(_logits(d).long(), _targets(d)), ("logits",)),
        Case(op, "device", "targets_on_cpu",
             lambda d: _tlp(_logits(d), _targets("cpu")), ("targets",), cuda_only=True),
        Case(op, "device", "logits_on_cpu",
             lambda d: _tlp(_logits("cpu"), _targets(d)), ("logits", "targets"), cuda_only=True),
        Case(op, "range", "target_ge_vocab",
             lambda d: _tlp(_logits(d), _long([0, 1, V, 2], d)), ("targets",), issue=sigsegv),
        Case(op, "range", "negative_target_not_ignore_index",
             lambda d: _tlp(_logits(d), _long([0, -5, 1, 2], d), ignore_index=-100),
             ("targets",), issue=sigsegv),
        Case(op, "range", "int32_target_ge_vocab",
             lambda d: _tlp(_logits(d), _long([0, 1, 2, V + 7], d).int()), ("targets",)),
        Case(op, "nonfinite", "temperature_nan",
             lambda d: _tlp(_logits(d), _targets(d), temperature=math.nan), ("temperature",)),
        Case(op, "nonfinite", "temperature_inf",
             lambda d: _tlp(_logits(d), _targets(d), temperature=math.inf), ("temperature",)),
        Case(op, "empty", "vocab_zero",
             lambda d: _tlp(_logits(d, v=0), torch.zeros(N, dtype=torch.int64, device=d)),
             ("logits",)),
        Case(op, "empty", "zero_rows",
             lambda d: _tlp(_logits(d, n=0), _targets(d, n=0), return_entropy=True),
             check=_shapes((0,), torch.float32)),
        Case(op, "empty", "zero_rows_3d",
             lambda d: _tlp(torch.randn(2, 0, V, device=d),
                            torch.zeros(2, 0, dtype=torch.int64, device=d)),
             check=_shapes((2, 0), torch.float32)),
        Case(op, "scalar", "temperature_zero",
             lambda d: _tlp(_logits(d), _targets(d), temperature=0.0), ("temperature",),
             issue=sigsegv),
        Case(op, "scalar", "temperature_negative",
             lambda d: _tlp(_logits(d), _targets(d), temperature=-1.0), ("temperature",)),
        Case(op, "memory", "logits_strided_vocab",
             lambda d: _tlp(torch.randn(N, 2 * V, device=d)[:, ::2], _targets(d)), ("logits",),
             equal_to=lambda d: _tlp(torch.randn(N, 2 * V, device=d)[:, ::2].contiguous(),
                                     _targets(d))),
        Case(op, "memory", "logits_expanded_rows",
             lambda d: _tlp(_logits(d, n=1).expand(N, V), _targets(d)), ("logits",),
             equal_to=lambda d: _tlp(_logits(d, n=1).expand(N, V).contiguous(), _targets(d))),
        Case(op, "memory", "logits_overlapping_rows",
             lambda d: _tlp(_overlapping_rows(_logits(d)), _targets(d)), ("logits",),
             equal_to=lambda d: _tlp(_overlapping_rows(_logits(d)).contiguous(), _targets(d))),
        Case(op, "memory", "targets_strided",
             lambda d: _tlp(_logits(d), _targets(d, n=2 * N)[::2]), ("targets",),
             equal_to=lambda d: _tlp(_logits(d), _targets(d, n=2 * N)[::2].contiguous())),
        Case(op, "memory", "inplace_backward_expanded_rows",
             lambda d: _tlp_grad(_expanded_rows, d, inplace=True), ("logits",),
             equal_to=lambda d: _tlp_grad(_expanded_rows, d, inplace=False)),
        Case(op, "memory", "inplace_backward_overlapping_rows",
             lambda d: _tlp_grad(_overlapping_rows, d, inplace=True), ("logits",),
             equal_to=lambda d: _tlp_grad(_overlapping_rows, d, inplace=False)),
    ]


# ---------------------------------------------------------------- linear_token_logprobs
def _hidden(device: str, n: int = N, h: int = H) -> torch.Tensor:
    return torch.randn(n, h, device=device)


def _weight(device: str, v: int = V, h: int = H) -> torch.Tensor:
    return torch.randn(v, h, device=device)


def _ltlp(hidden, weight, targets, **kwargs):
    return lp.linear_token_logprobs(hidden, weight, targets, **kwargs)


def _uniform_logprobs(result) -> None:
    _assert_same(result.cpu(), torch.full((N,), -math.log(V)))


def linear_token_logprobs_cases() -> list[Case]:
    op = "linear_token_logprobs"
    sigsegv = "SIGSEGV on the H200 machine (issue 13)"
    return [
        Case(op, "shape", "hidden_size_differs_from_weight",
             lambda d: _ltlp(_hidden(d), _weight(d, h=H + 1), _targets(d)), ("weight", "hidden"),
             issue=sigsegv),
        Case(op, "shape", "targets_not_leading_shape",
             lambda d: _ltlp(_hidden(d), _weight(d), _targets(d, n=N - 1)), ("targets",)),
        Case(op, "shape", "weight_rank1",
             lambda d: _ltlp(_hidden(d), torch.randn(H, device=d), _targets(d)), ("weight",)),
        Case(op, "shape", "bias_wrong_length",
             lambda d: _ltlp(_hidden(d), _weight(d), _targets(d),
                             bias=torch.zeros(V - 1, device=d)), ("bias",)),
        Case(op, "shape", "hidden_rank0",
             lambda d: _ltlp(torch.tensor(1.0, device=d), _weight(d, h=1),
                             torch.tensor(0, device=d)), ("hidden",)),
        Case(op, "dtype", "int_hidden_and_weight",
             lambda d: _ltlp(_hidden(d).long(), _weight(d).long(), _targets(d)),
             ("hidden", "weight")),
        Case(op, "dtype", "weight_dtype_differs",
             lambda d: _ltlp(_hidden(d), _weight(d).double(), _targets(d)), ("weight",)),
        Case(op, "dtype", "float_targets",
             lambda d: _ltlp(_hidden(d), _weight(d), _targets(d).float()), ("targets",)),
        Case(op, "dtype", "bias_dtype_differs",
             lambda d: _ltlp(_hidden(d), _weight(d), _targets(d),
                             bias=torch.zeros(V, device=d, dtype=torch.float64)), ("bias",)),
        Case(op, "device", "weight_on_cpu",
             lambda d: _ltlp(_hidden(d), _weight("cpu"), _targets(d)), ("weight",),
             cuda_only=True),
        Case(op, "device", "targets_on_cpu",
             lambda d: _ltlp(_hidden(d), _weight(d), _targets("cpu")), ("targets",),
             cuda_only=True),
        Case(op, "device", "bias_on_cpu",
             lambda d: _ltlp(_hidden(d), _weight(d), _targets(d), bias=torch.zeros(V)),
             ("bias",), cuda_only=True),
        Case(op, "range", "target_ge_vocab",
             lambda d: _ltlp(_hidden(d), _weight(d), _long([0, 1, V, 2], d)), ("targets",),
             issue=sigsegv),
        Case(op, "range", "negative_target_not_ignore_index",
             lambda d: _ltlp(_hidden(d), _weight(d), _long([0, -5, 1, 2], d)), ("targets",)),
        Case(op, "nonfinite", "temperature_nan",
             lambda d: _ltlp(_hidden(d), _weight(d), _targets(d), temperature=math.nan),
             ("temperature",)),
        Case(op, "nonfinite", "temperature_inf",
             lambda d: _ltlp(_hidden(d), _weight(d), _targets(d), temperature=math.inf),
             ("temperature",)),
        Case(op, "empty", "vocab_zero",
             lambda d: _ltlp(_hidden(d), _weight(d, v=0),
                             torch.zeros(N, dtype=torch.int64, device=d)), ("weight",),
             issue="ZeroDivisionError from default_chunk_size on the project machine "
                   "(issue 13)"),
        Case(op, "empty", "vocab_zero_with_chunk_size",
             lambda d: _ltlp(_hidden(d), _weight(d, v=0),
                             torch.zeros(N, dtype=torch.int64, device=d), chunk_size=2),
             ("weight",)),
        # H = 0: every logit is 0 (F.linear's answer), so every log-prob is -log V.
        Case(op, "empty", "hidden_size_zero",
             lambda d: _ltlp(_hidden(d, h=0), _weight(d, h=0), _targets(d)),
             check=_uniform_logprobs),
        Case(op, "empty", "zero_rows",
             lambda d: _ltlp(_hidden(d, n=0), _weight(d), _targets(d, n=0), return_entropy=True),
             check=_shapes((0,), torch.float32)),
        Case(op, "scalar", "temperature_zero",
             lambda d: _ltlp(_hidden(d), _weight(d), _targets(d), temperature=0.0),
             ("temperature",)),
        Case(op, "scalar", "temperature_negative",
             lambda d: _ltlp(_hidden(d), _weight(d), _targets(d), temperature=-2.0),
             ("temperature",)),
        Case(op, "scalar", "chunk_size_zero",
             lambda d: _ltlp(_hidden(d), _weight(d), _targets(d), chunk_size=0), ("chunk_size",)),
        Case(op, "scalar", "chunk_size_negative",
             lambda d: _ltlp(_hidden(d), _weight(d), _targets(d), chunk_size=-3),
             ("chunk_size",)),
        Case(op, "memory", "hidden_transposed",
             lambda d: _ltlp(_hidden(d, n=H, h=N).t(), _weight(d), _targets(d)), ("hidden",),
             equal_to=lambda d: _ltlp(_hidden(d, n=H, h=N).t().contiguous(), _weight(d),
                                      _targets(d))),
        Case(op, "memory", "weight_transposed",
             lambda d: _ltlp(_hidden(d), _weight(d, v=H, h=V).t(), _targets(d)), ("weight",),
             equal_to=lambda d: _ltlp(_hidden(d), _weight(d, v=H, h=V).t().contiguous(),
                                      _targets(d))),
        Case(op, "memory", "hidden_expanded_rows",
             lambda d: _ltlp(_hidden(d, n=1).expand(N, H), _weight(d), _targets(d)), ("hidden",),
             equal_to=lambda d: _ltlp(_hidden(d, n=1).expand(N, H).contiguous(), _weight(d),
                                      _targets(d))),
        Case(op, "memory", "weight_expanded_rows",
             lambda d: _ltlp(_hidden(d), _weight(d, v=1).expand(V, H), _targets(d)), ("weight",),
             equal_to=lambda d: _ltlp(_hidden(d), _weight(d, v=1).expand(V, H).contiguous(),
                                      _targets(d))),
        Case(op, "memory", "targets_strided",
             lambda d: _ltlp(_hidden(d), _weight(d), _targets(d, n=2 * N)[::2]), ("targets",),
             equal_to=lambda d: _ltlp(_hidden(d), _weight(d),
                                      _targets(d, n=2 * N)[::2].contiguous())),
    ]


# ---------------------------------------------------------------- lambda_advantages
P, G = 3, 4


def _rewards(device: str, p: int = P, g: int = G) -> torch.Tensor:
    return torch.randn(p, g, device=device)


def _scores(device: str, p: int = P, g: int = G) -> torch.Tensor:
    return -torch.rand(p, g, device=device)


def _la(rewards, scores, **kwargs):
    return lp.lambda_advantages(rewards, scores, **kwargs)


def _masked_nan_gives_finite(result) -> None:
    assert bool(torch.isfinite(result).all()) and float(result[0, 0]) == 0.0, result.tolist()


def _nan_reward_masked_out(device: str):
    rewards = _rewards(device)
    rewards[0, 0] = math.nan
    mask = torch.ones(P, G, dtype=torch.bool, device=device)
    mask[0, 0] = False
    return _la(rewards, _scores(device), mask=mask)


def _with(tensor: torch.Tensor, index, value) -> torch.Tensor:
    tensor[index] = value
    return tensor


def _flat(device: str, n: int = 6) -> torch.Tensor:
    return torch.randn(n, device=device)


def _group_ids(device: str, n: int = 6) -> torch.Tensor:
    return torch.arange(n, device=device) % 2


def _expanded_mask(device: str) -> torch.Tensor:
    return _long([[1, 0, 1, 1]], device).bool().expand(P, G)


def lambda_advantages_cases() -> list[Case]:
    op = "lambda_advantages"
    return [
        Case(op, "shape", "scores_shape_differs",
             lambda d: _la(_rewards(d), _scores(d, g=G + 1)), ("scores",)),
        Case(op, "shape", "mask_shape_differs",
             lambda d: _la(_rewards(d), _scores(d),
                           mask=torch.ones(P, G + 1, dtype=torch.bool, device=d)), ("mask",),
             issue="SIGSEGV on the H200 machine (issue 13)"),
        Case(op, "shape", "rewards_rank3",
             lambda d: _la(torch.randn(2, P, G, device=d), -torch.rand(2, P, G, device=d)),
             ("rewards",)),
        Case(op, "shape", "rewards_1d_without_group_ids",
             lambda d: _la(_flat(d), _flat(d)), ("rewards", "group_ids")),
        Case(op, "shape", "group_ids_with_2d_rewards",
             lambda d: _la(_rewards(d), _scores(d), group_ids=_group_ids(d, P * G)),
             ("rewards", "group_ids")),
        Case(op, "shape", "group_ids_length_differs",
             lambda d: _la(_flat(d), _flat(d), group_ids=_group_ids(d, 5)), ("group_ids",)),
        Case(op, "dtype", "bool_rewards",
             lambda d: _la(_rewards(d) > 0, _scores(d)), ("rewards",)),
        Case(op, "dtype", "int_scores",
             lambda d: _la(_rewards(d), _scores(d).long()), ("scores",)),
        Case(op, "dtype", "float_mask",
             lambda d: _la(_rewards(d), _scores(d), mask=torch.ones(P, G, device=d)), ("mask",)),
        Case(op, "dtype", "float_group_ids",
             lambda d: _la(_flat(d), _flat(d), group_ids=_group_ids(d).float()), ("group_ids",)),
        Case(op, "device", "scores_on_cpu",
             lambda d: _la(_rewards(d), _scores("cpu")), ("scores",), cuda_only=True),
        Case(op, "device", "mask_on_cpu",
             lambda d: _la(_rewards(d), _scores(d), mask=torch.ones(P, G, dtype=torch.bool)),
             ("mask",), cuda_only=True),
        Case(op, "device", "group_ids_on_cpu",
             lambda d: _la(_flat(d), _flat(d), group_ids=_group_ids("cpu")), ("group_ids",),
             cuda_only=True),
        Case(op, "range", "negative_group_ids",
             lambda d: _la(_flat(d), _flat(d), group_ids=_long([0, 0, -1, -1, 1, 1], d)),
             ("group_ids",)),
        Case(op, "nonfinite", "nan_reward",
             lambda d: _la(_with(_rewards(d), (1, 2), math.nan), _scores(d)), ("rewards",)),
        Case(op, "nonfinite", "inf_score",
             lambda d: _la(_rewards(d), _with(_scores(d), (0, 1), -math.inf)), ("scores",)),
        Case(op, "nonfinite", "beta_nan",
             lambda d: _la(_rewards(d), _scores(d), beta=math.nan), ("beta",)),
        Case(op, "nonfinite", "beta_inf",
             lambda d: _la(_rewards(d), _scores(d), beta=math.inf), ("beta",)),
        Case(op, "nonfinite", "eps_nan",
             lambda d: _la(_rewards(d), _scores(d), normalize="std", eps=math.nan), ("eps",)),
        Case(op, "nonfinite", "eps_inf",
             lambda d: _la(_rewards(d), _scores(d), normalize="std", eps=math.inf), ("eps",)),
        Case(op, "nonfinite", "nan_reward_masked_out", _nan_reward_masked_out,
             check=_masked_nan_gives_finite),
        Case(op, "empty", "zero_prompts",
             lambda d: _la(_rewards(d, p=0), _scores(d, p=0)),
             check=_shapes((0, G), torch.float32)),
        Case(op, "empty", "zero_group_size",
             lambda d: _la(_rewards(d, g=0), _scores(d, g=0)),
             check=_shapes((P, 0), torch.float32)),
        Case(op, "empty", "ragged_zero_members",
             lambda d: _la(_flat(d, 0), _flat(d, 0), group_ids=_group_ids(d, 0)),
             check=_shapes((0,), torch.float32)),
        Case(op, "scalar", "normalize_unknown",
             lambda d: _la(_rewards(d), _scores(d), normalize="median"), ("normalize",)),
        Case(op, "scalar", "eps_negative",
             lambda d: _la(_rewards(d), _scores(d), normalize="std", eps=-1e-3), ("eps",)),
        Case(op, "memory", "rewards_expanded",
             lambda d: _la(_rewards(d, p=1).expand(P, G), _scores(d)), ("rewards",),
             equal_to=lambda d: _la(_rewards(d, p=1).expand(P, G).contiguous(), _scores(d))),
        Case(op, "memory", "scores_transposed",
             lambda d: _la(_rewards(d), _scores(d, p=G, g=P).t()), ("scores",),
             equal_to=lambda d: _la(_rewards(d), _scores(d, p=G, g=P).t().contiguous())),
        Case(op, "memory", "mask_expanded",
             lambda d: _la(_rewards(d), _scores(d),
                           mask=_expanded_mask(d)), ("mask",),
             equal_to=lambda d: _la(_rewards(d), _scores(d),
                                    mask=_expanded_mask(d).contiguous())),
        Case(op, "memory", "group_ids_strided",
             lambda d: _la(_flat(d), _flat(d), group_ids=_group_ids(d, 12)[::2]), ("group_ids",),
             equal_to=lambda d: _la(_flat(d), _flat(d),
                                    group_ids=_group_ids(d, 12)[::2].contiguous())),
    ]


# ---------------------------------------------------------------- sequence-overlap ops
# Two candidates (packed) against one reference; ref_index maps both to it.
MAX_N = {"ngram_overlap": 4, "rouge_n": 2, "semantic_density": 2}
TAKES_BETA = ("rouge_n", "rouge_l", "semantic_density")


def _cand(device: str):
    return _long([1, 2, 3, 4, 2, 3], device), _long([0, 4, 6], device)


def _ref(device: str):
    return _long([1, 2, 3, 5], device), _long([0, 4], device)


def _both(device: str) -> torch.Tensor:
    return _long([0, 0], device)


def _overlap_caller(op: str) -> Callable[..., Any]:
    def call(cand, ref, **kwargs):
        return getattr(lp, op)(cand, ref, **kwargs)
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
             lambda d: f((_long([[1, 2, 3], [4, 5, 6]], d), _long([3, 3, 3], d)), _ref(d),
                         ref_index=_both(d)), ("cand",)),
        Case(op, "shape", "ids_rank3",
             lambda d: f((torch.ones(2, 2, 2, dtype=torch.int64, device=d), _long([2, 2], d)),
                         _ref(d), ref_index=_both(d)), ("cand",)),
        Case(op, "shape", "offsets_rank2",
             lambda d: f((_cand(d)[0], _cand(d)[1].view(3, 1)), _ref(d), ref_index=_both(d)),
             ("cand",)),
        Case(op, "shape", "ref_index_length_differs",
             lambda d: f(_cand(d), _ref(d), ref_index=_long([0, 0, 0], d)), ("ref_index",)),
        Case(op, "shape", "reference_count_differs_without_ref_index",
             lambda d: f(_cand(d), _ref(d)), ("ref_index",)),
        Case(op, "dtype", "float_ids",
             lambda d: f((_cand(d)[0].float(), _cand(d)[1]), _ref(d), ref_index=_both(d)),
             ("cand",)),
        Case(op, "dtype", "float_offsets",
             lambda d: f((_cand(d)[0], _cand(d)[1].float()), _ref(d), ref_index=_both(d)),
             ("cand",)),
        Case(op, "dtype", "bool_ref_lengths",
             lambda d: f(_cand(d), (_long([[1, 2]], d), _long([1], d).bool()),
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
             lambda d: f(_cand(d), _ref(d), ref_index=_long([0, 3], d)), ("ref_index",),
             issue=ref_index_sigsegv),
        Case(op, "range", "ref_index_negative",
             lambda d: f(_cand(d), _ref(d), ref_index=_long([-1, 0], d)), ("ref_index",)),
        Case(op, "range", "negative_token_id",
             lambda d: f((_long([1, -7, 3, 4, 2, 3], d), _cand(d)[1]), _ref(d),
                         ref_index=_both(d)), ("cand",)),
        Case(op, "range", "negative_token_id_in_ref",
             lambda d: f(_cand(d), (_long([1, 2, -3, 5], d), _ref(d)[1]), ref_index=_both(d)),
             ("ref",)),
        Case(op, "range", "lengths_past_row_length",
             lambda d: f((_long([[1, 2, 3], [4, 5, 6]], d), _long([3, 4], d)), _ref(d),
                         ref_index=_both(d)), ("cand",)),
        Case(op, "range", "negative_length",
             lambda d: f((_long([[1, 2, 3], [4, 5, 6]], d), _long([3, -1], d)), _ref(d),
                         ref_index=_both(d)), ("cand",)),
        Case(op, "range", "offsets_not_monotone",
             lambda d: f((_cand(d)[0], _long([0, 5, 4], d)), _ref(d), ref_index=_both(d)),
             ("cand",)),
        Case(op, "range", "offsets_past_end",
             lambda d: f((_cand(d)[0], _long([0, 4, 9], d)), _ref(d), ref_index=_both(d)),
             ("cand",)),
        Case(op, "range", "offsets_start_negative",
             lambda d: f((_cand(d)[0], _long([-2, 4, 6], d)), _ref(d), ref_index=_both(d)),
             ("cand",)),
        Case(op, "nonfinite", "nan_in_float_ids",
             lambda d: f((_with(_cand(d)[0].double(), 1, math.nan), _cand(d)[1]), _ref(d),
                         ref_index=_both(d)), ("cand",)),
        Case(op, "empty", "zero_candidates",
             lambda d: f((_long([], d), _long([0], d)), _ref(d), ref_index=_long([], d)),
             check=_shapes(out_shape(op, 0), dtype)),
        Case(op, "empty", "empty_sequences",
             lambda d: f((_long([], d), _long([0, 0], d)), (_long([], d), _long([0, 0], d))),
             check=_all_zero(out_shape(op, 1), dtype)),
        Case(op, "empty", "zero_references_with_candidates",
             lambda d: f(_cand(d), (_long([], d), _long([0], d)), ref_index=_both(d)),
             ("ref_index",)),
        Case(op, "scalar", "ref_index_python_int",
             lambda d: f(_cand(d), _ref(d), ref_index=0), ("ref_index",)),
        Case(op, "memory", "values_strided",
             lambda d: f((_long([1, 0, 2, 0, 3, 0, 4, 0, 2, 0, 3, 0], d)[::2], _cand(d)[1]),
                         _ref(d), ref_index=_both(d)), ("cand",),
             equal_to=lambda d: f(_cand(d), _ref(d), ref_index=_both(d))),
        Case(op, "memory", "ref_index_expanded",
             lambda d: f(_cand(d), _ref(d), ref_index=_long([0], d).expand(2)), ("ref_index",),
             equal_to=lambda d: f(_cand(d), _ref(d), ref_index=_both(d))),
        Case(op, "memory", "padded_ids_expanded",
             lambda d: f((_long([[1, 2, 3, 4]], d).expand(2, 4), _long([4, 2], d)), _ref(d),
                         ref_index=_both(d)), ("cand",),
             equal_to=lambda d: f((_long([[1, 2, 3, 4], [1, 2, 3, 4]], d), _long([4, 2], d)),
                                  _ref(d), ref_index=_both(d))),
        Case(op, "memory", "padded_lengths_strided",
             lambda d: f((_long([[1, 2, 3, 4], [2, 3, 9, 9]], d), _long([4, 0, 2, 0], d)[::2]),
                         _ref(d), ref_index=_both(d)), ("cand",),
             equal_to=lambda d: f((_long([[1, 2, 3, 4], [2, 3, 9, 9]], d), _long([4, 2], d)),
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
    cands = clipped_sequences(*(t.cpu() for t in lp.overlap._as_sequences(cand, "cand",
                                                                        validate=False)))
    refs = clipped_sequences(*(t.cpu() for t in lp.overlap._as_sequences(ref, "ref",
                                                                       validate=False)),
                             max_length=MAX_REFERENCE_TOKENS)
    paired = [refs[i] if 0 <= i < len(refs) else [] for i in ref_index.tolist()]
    low = min([0] + [t for seq in cands + paired for t in seq])
    rename = lambda seqs: [[t - low for t in seq] for seq in seqs]  # noqa: E731
    return getattr(lp, op)(rename(cands), rename(paired), **kwargs)


def _matches_unchecked(op: str, make: Callable[[str], tuple], kwargs: dict):
    def check(result):
        cand, ref, ref_index = make("cpu")
        on_cpu = tuple(t.cpu() for t in result) if isinstance(result, tuple) else result.cpu()
        _assert_same(on_cpu, unchecked_overlap_expected(op, cand, ref, ref_index, **kwargs))
    return check


# (name, (cand, ref, ref_index) on a device): two candidates, one or two references.
UNCHECKED_OVERLAP_INPUTS = [
    ("ref_index_out_of_range", lambda d: (_cand(d), _ref(d), _long([1, 0], d))),
    ("ref_index_negative", lambda d: (_cand(d), _ref(d), _long([0, -3], d))),
    ("ref_index_huge", lambda d: (_cand(d), _ref(d), _long([2**62, -2**62], d))),
    ("negative_token_ids", lambda d: ((_long([1, -7, 3, -7, 2, 3], d), _cand(d)[1]),
                                      (_long([-7, 3, -1, 5], d), _ref(d)[1]), _both(d))),
    ("offsets_not_monotone_and_past_end", lambda d: ((_cand(d)[0], _long([3, 1, 40], d)),
                                                     (_ref(d)[0], _long([-5, 9], d)),
                                                     _both(d))),
    ("padded_lengths_out_of_range", lambda d: ((_long([[1, 2, 3], [2, 3, 4]], d),
                                                _long([7, -2], d)),
                                               (_long([[2, 3, 4, 5]], d), _long([2**62], d)),
                                               _both(d))),
    ("huge_offsets", lambda d: ((_cand(d)[0], _long([0, 2**62, 2], d)),
                                (_ref(d)[0], _long([0, 2**62], d)), _both(d))),
]


def unchecked_overlap_cases(op: str) -> list[Case]:
    kwargs = {"max_n": MAX_N[op]} if op in MAX_N else {}
    return [Case(op, "range", f"unchecked_{name}",
                 lambda d, make=make: getattr(lp, op)(*make(d)[:2], ref_index=make(d)[2],
                                                      validate=False, **kwargs),
                 check=_matches_unchecked(op, make, kwargs))
            for name, make in UNCHECKED_OVERLAP_INPUTS]


# ---------------------------------------------------------------- registry
OVERLAP_OPS = ("ngram_overlap", "rouge_n", "lcs_length", "rouge_l", "semantic_density")
CASES: list[Case] = (token_logprobs_cases() + linear_token_logprobs_cases()
                     + lambda_advantages_cases()
                     + [c for op in OVERLAP_OPS for c in overlap_cases(op)]
                     + [c for op in OVERLAP_OPS for c in unchecked_overlap_cases(op)])
CASES_BY_ID = {case.id: case for case in CASES}
assert len(CASES_BY_ID) == len(CASES), "duplicate case ids"


def _smoke_call(op: str, device: str) -> Any:
    """A small valid call of ``op``: after a case, it shows whether the device still works."""
    if op == "token_logprobs":
        return _tlp(_logits(device), _targets(device))
    if op == "linear_token_logprobs":
        return _ltlp(_hidden(device), _weight(device), _targets(device))
    if op == "lambda_advantages":
        return _la(_rewards(device), _scores(device))
    return getattr(lp, op)(_cand(device), _ref(device), ref_index=_both(device))


# Cases that check the checker: (the verdict each must get, the case).
def _raise(exc: BaseException):
    raise exc


def _selftest(name: str, call: Callable[[str], Any], **kwargs) -> Case:
    return Case("selftest", "harness", name, call, **kwargs)


SELFTEST_CASES: list[tuple[str, Case]] = [
    ("crash", _selftest("sigsegv", lambda d: os.kill(os.getpid(), signal.SIGSEGV), names=("x",))),
    ("crash", _selftest("abort", lambda d: os.abort(), names=("x",))),
    ("timeout", _selftest("hang", lambda d: signal.pause(), names=("x",))),
    ("died", _selftest("exit", lambda d: os._exit(3), names=("x",))),
    ("accepted", _selftest("accepted", lambda d: None, names=("x",))),
    ("wrong-error", _selftest("zero_division", lambda d: 1 // 0, names=("x",))),
    ("unnamed", _selftest("unnamed", lambda d: _raise(ValueError("selftest: y is bad")),
                          names=("x",))),
    ("rejected-valid", _selftest("rejected_valid", lambda d: _raise(ValueError("x")),
                                 check=lambda result: None)),
    ("wrong-result", _selftest("wrong_result", lambda d: torch.ones(2), names=("x",),
                               equal_to=lambda d: torch.zeros(2))),
    ("ok", _selftest("named", lambda d: _raise(RuntimeError("selftest: x must be 0")),
                     names=("x",))),
]
for _expected, _case in SELFTEST_CASES:
    CASES_BY_ID[_case.id] = _case


# ---------------------------------------------------------------- judging one case
def names_argument(message: str, names: Iterable[str]) -> bool:
    """Whether ``message`` mentions one of ``names`` (or an alias) as a whole word."""
    words = [alias for name in names for alias in ARGUMENT_ALIASES.get(name, (name,))]
    return any(re.search(rf"\b{re.escape(word)}\b", message) for word in words)


def _message(exc: BaseException) -> str:
    # torch appends the C++ location ("Exception raised from ..."), which is not the message.
    return str(exc).split("\nException raised from")[0].strip()


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= DETAIL_CHARS else text[:DETAIL_CHARS] + " ..."


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def judge(case: Case, device: str) -> dict[str, str]:
    """Runs ``case`` on ``device`` in this process: {"verdict": ..., "detail": ...}."""
    torch.manual_seed(0)
    try:
        result = case.call(device)
        _synchronize(device)
    except Exception as exc:  # noqa: BLE001 - every exception is judged
        detail = f"{type(exc).__name__}: {_message(exc)}"
        if case.check is not None:
            verdict = "rejected-valid"
        elif not isinstance(exc, ALLOWED_ERRORS):
            verdict = "wrong-error"
        elif not names_argument(_message(exc), case.names):
            verdict = "unnamed"
            detail += f" [should name: {' or '.join(case.names)}]"
        else:
            verdict = "ok"
    else:
        verdict, detail = "ok", "returned"
        try:
            if case.equal_to is not None:
                torch.manual_seed(0)
                _assert_same(result, case.equal_to(device))
                detail = "returned the contiguous input's result"
            elif case.check is not None:
                case.check(result)
                detail = "valid input: result checked"
            else:
                verdict, detail = "accepted", f"no exception (returned {_describe(result)})"
        except Exception as exc:  # noqa: BLE001
            verdict, detail = "wrong-result", f"{type(exc).__name__}: {exc}"
    if device == "cuda" and case.op in DISPATCH_OPS:
        try:
            _smoke_call(case.op, device)
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001
            verdict = "cuda-unusable"
            detail += f"; then a valid call failed: {type(exc).__name__}: {_message(exc)}"
    return {"verdict": verdict, "detail": _short(detail)}


def _assert_same(actual: Any, expected: Any) -> None:
    # Not torch.testing.assert_close: its first call takes ~2 s of imports, in every child.
    if isinstance(expected, tuple):
        assert isinstance(actual, tuple) and len(actual) == len(expected), _describe(actual)
        for a, e in zip(actual, expected):
            _assert_same(a, e)
        return
    assert (actual.shape, actual.dtype, actual.device) == (
        expected.shape, expected.dtype, expected.device), (
        f"got {_describe(actual)}, expected {_describe(expected)}")
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert torch.allclose(a, e, rtol=1e-5, atol=1e-6, equal_nan=True), (
        f"greatest difference {float((a - e).abs().nan_to_num(math.inf).max())}: got "
        f"{_describe(actual)}, expected {_describe(expected)}")


def _describe(result: Any) -> str:
    if isinstance(result, torch.Tensor):
        return f"{result.dtype} {tuple(result.shape)} {result.flatten()[:4].tolist()}"
    if isinstance(result, tuple):
        return "(" + ", ".join(_describe(r) for r in result) + ")"
    return repr(result)


# ---------------------------------------------------------------- the forking server
def _start_child(case_id: str, device: str, timeout_s: int) -> tuple[int, int, Any]:
    """Forks a child that judges one case and writes its verdict to a pipe: (pid, read fd,
    stderr file)."""
    read_fd, write_fd = os.pipe()
    stderr_file = tempfile.TemporaryFile()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child: never returns
        code = 1
        try:
            os.close(read_fd)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.dup2(stderr_file.fileno(), 1)  # stdout carries the server's answers
            os.dup2(stderr_file.fileno(), 2)
            faulthandler.enable()  # a fatal signal prints the Python stack, then kills
            signal.alarm(timeout_s)  # default action of SIGALRM: terminate
            verdict = judge(CASES_BY_ID[case_id], device)
            os.write(write_fd, json.dumps(verdict).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    return pid, read_fd, stderr_file


def _finish_child(status: int, read_fd: int, stderr_file) -> dict[str, str]:
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    stderr_file.seek(0)
    stderr = stderr_file.read().decode(errors="replace")
    stderr_file.close()
    if os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status))
        verdict = "timeout" if sig == signal.SIGALRM else "crash"
        return {"verdict": verdict, "detail": _short(f"killed by {sig.name}; stderr: {stderr}")}
    if not chunks or os.WEXITSTATUS(status) != 0:
        return {"verdict": "died", "detail": _short(
            f"exit status {os.WEXITSTATUS(status)} without a verdict; stderr: {stderr}")}
    return json.loads(b"".join(chunks))


def run_isolated(requests: list[tuple[str, str]], jobs: int,
                 timeout_s: int) -> Iterable[dict[str, str]]:
    """Judges each (case id, device) in a forked child, ``jobs`` at a time; yields verdicts
    with "case" and "device" as the children finish."""
    # A CUDA context does not survive fork: only the children may create one.
    if torch.cuda.is_initialized():
        raise RuntimeError("run_isolated: CUDA is initialized in this process; the children "
                           "could not use it")
    pending = list(reversed(requests))
    running: dict[int, tuple[str, str, int, Any]] = {}
    while pending or running:
        while pending and len(running) < max(1, jobs):
            case_id, device = pending.pop()
            pid, read_fd, stderr_file = _start_child(case_id, device, timeout_s)
            running[pid] = (case_id, device, read_fd, stderr_file)
        pid, status = os.wait()
        if pid not in running:
            continue
        case_id, device, read_fd, stderr_file = running.pop(pid)
        yield {"case": case_id, "device": device, **_finish_child(status, read_fd, stderr_file)}


def serve() -> None:
    """Answers requests on stdin (one JSON object a line) until stdin closes. Imports torch
    and the ops once; CUDA is never initialized here, only in the children."""
    for line in sys.stdin:
        request = json.loads(line)
        for verdict in run_isolated([tuple(r) for r in request["cases"]],
                                    request.get("jobs", 1),
                                    request.get("timeout_s", DEFAULT_TIMEOUT_S)):
            print(json.dumps(verdict), flush=True)
        print(json.dumps({"done": True}), flush=True)


class CaseServer:
    """Client of a ``--serve`` process run with this interpreter and the lambdapo_ext that
    this process imported."""

    def __init__(self) -> None:
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(lp.__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH"))
                                            if p)
        self._process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env=env, text=True)

    def run(self, requests: list[tuple[str, str]], *, jobs: int = 1,
            timeout_s: int = DEFAULT_TIMEOUT_S) -> Iterable[dict[str, str]]:
        """Verdicts of the (case id, device) requests, as they finish."""
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write(json.dumps({"cases": requests, "jobs": jobs,
                                              "timeout_s": timeout_s}) + "\n")
        self._process.stdin.flush()
        while True:
            line = self._process.stdout.readline()
            if not line:
                raise RuntimeError(f"the bad-input case server exited "
                                   f"(status {self._process.wait()})")
            answer = json.loads(line)
            if answer.get("done"):
                return
            yield answer

    def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        self._process.wait(timeout=30)

    def __enter__(self) -> "CaseServer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", action="store_true", help="answer requests on stdin")
    parser.add_argument("--case", help="run this case id in this process (no isolation)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.serve:
        serve()
        return 0
    if args.case:
        verdict = judge(CASES_BY_ID[args.case], args.device)
        print(json.dumps(verdict))
        return 0 if verdict["verdict"] == "ok" else 1
    parser.error("give --serve or --case")
    return 2


if __name__ == "__main__":
    sys.exit(main())
