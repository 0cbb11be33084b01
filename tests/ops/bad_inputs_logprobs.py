"""Bad inputs of the log-prob ops (token_logprobs, linear_token_logprobs), run by
tests/ops/test_bad_inputs.py through tests/ops/bad_input_runner.py."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

import lambdapo_ext

from bad_input_runner import Case, assert_same, check_shapes, int64

# The lambdapo:: dispatcher ops behind each public op: a backend is present for the public op
# when all of them have a kernel for it. linear_token_logprobs is composite over
# token_logprobs_forward/backward.
DISPATCH_OPS = {
    "token_logprobs": ("token_logprobs_forward",),
    "linear_token_logprobs": ("token_logprobs_forward",),
}


# ---------------------------------------------------------------- token_logprobs
N, V, H = 4, 8, 6


def _logits(device: str, n: int = N, v: int = V) -> torch.Tensor:
    return torch.randn(n, v, device=device)


def _targets(device: str, n: int = N, v: int = V) -> torch.Tensor:
    return torch.arange(n, device=device) % v


def _tlp(logits, targets, **kwargs):
    return lambdapo_ext.token_logprobs(logits, targets, **kwargs)


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
        Case(op, "dtype", "logits_as_list",
             lambda d: _tlp(_logits(d).tolist(), _targets(d)), ("logits",)),
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
             lambda d: _tlp(_logits(d), int64([0, 1, V, 2], d)), ("targets",), issue=sigsegv),
        Case(op, "range", "negative_target_not_ignore_index",
             lambda d: _tlp(_logits(d), int64([0, -5, 1, 2], d), ignore_index=-100),
             ("targets",), issue=sigsegv),
        Case(op, "range", "int32_target_ge_vocab",
             lambda d: _tlp(_logits(d), int64([0, 1, 2, V + 7], d).int()), ("targets",)),
        Case(op, "nonfinite", "temperature_nan",
             lambda d: _tlp(_logits(d), _targets(d), temperature=math.nan), ("temperature",)),
        Case(op, "nonfinite", "temperature_inf",
             lambda d: _tlp(_logits(d), _targets(d), temperature=math.inf), ("temperature",)),
        Case(op, "empty", "vocab_zero",
             lambda d: _tlp(_logits(d, v=0), torch.zeros(N, dtype=torch.int64, device=d)),
             ("logits",)),
        Case(op, "empty", "zero_rows",
             lambda d: _tlp(_logits(d, n=0), _targets(d, n=0), return_entropy=True),
             check=check_shapes((0,), torch.float32)),
        Case(op, "empty", "zero_rows_3d",
             lambda d: _tlp(torch.randn(2, 0, V, device=d),
                            torch.zeros(2, 0, dtype=torch.int64, device=d)),
             check=check_shapes((2, 0), torch.float32)),
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
    return lambdapo_ext.linear_token_logprobs(hidden, weight, targets, **kwargs)


def _uniform_logprobs(result) -> None:
    assert_same(result.cpu(), torch.full((N,), -math.log(V)))


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
        Case(op, "dtype", "hidden_as_list",
             lambda d: _ltlp(_hidden(d).tolist(), _weight(d), _targets(d)), ("hidden",)),
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
             lambda d: _ltlp(_hidden(d), _weight(d), int64([0, 1, V, 2], d)), ("targets",),
             issue=sigsegv),
        Case(op, "range", "negative_target_not_ignore_index",
             lambda d: _ltlp(_hidden(d), _weight(d), int64([0, -5, 1, 2], d)), ("targets",)),
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
             check=check_shapes((0,), torch.float32)),
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


CASES: list[Case] = token_logprobs_cases() + linear_token_logprobs_cases()
# A small valid call of each op: after a case on CUDA, it shows whether the device still works.
SMOKE_CALLS: dict[str, Callable[[str], Any]] = {
    "token_logprobs": lambda d: _tlp(_logits(d), _targets(d)),
    "linear_token_logprobs": lambda d: _ltlp(_hidden(d), _weight(d), _targets(d)),
}
