"""Bad inputs of linear_policy_loss, run by tests/ops/test_bad_inputs.py through
tests/ops/bad_input_runner.py."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

import lambdapo_ext

from bad_input_runner import Case, assert_same, check_shapes, int64

DISPATCH_OPS = {"linear_policy_loss": ("linear_policy_loss_forward",)}

N, V, H = 4, 8, 6


def _hidden(device: str, n: int = N, h: int = H) -> torch.Tensor:
    return torch.randn(n, h, device=device)


def _weight(device: str, v: int = V, h: int = H) -> torch.Tensor:
    return torch.randn(v, h, device=device)


def _targets(device: str, n: int = N, v: int = V) -> torch.Tensor:
    return torch.arange(n, device=device) % v


def _per_token(device: str, n: int = N) -> torch.Tensor:
    return torch.randn(n, device=device)


def _lpl(hidden, weight, targets, advantages=None, token_weights=None, **kwargs):
    device = weight.device
    n = targets.shape[0] if targets.dim() else 1
    advantages = _per_token(device, n) if advantages is None else advantages
    token_weights = torch.ones(n, device=device) if token_weights is None else token_weights
    return lambdapo_ext.linear_policy_loss(hidden, weight, targets, advantages, token_weights,
                                           **kwargs)


def _with_grads(make_hidden: Callable[[torch.Tensor], torch.Tensor],
                make_weight: Callable[[torch.Tensor], torch.Tensor], device: str,
                hidden_shape=(N, H), weight_shape=(V, H)):
    """(loss, logprobs, entropy, leaf gradients) of the op over views of two leaves; the
    leaves' gradients are given back in the views' layout."""
    xh = torch.randn(*hidden_shape, device=device).requires_grad_(True)
    xw = torch.randn(*weight_shape, device=device).requires_grad_(True)
    h, w = make_hidden(xh), make_weight(xw)
    old = _per_token(device)
    loss, lp, ent = _lpl(h, w, _targets(device), old_logprobs=old, entropy_coef=0.01)
    loss.backward()
    same = lambda leaf, view: leaf.grad if view.shape == leaf.shape else leaf.grad.t()  # noqa: E731
    return loss.detach(), lp, ent, same(xh, h), same(xw, w)


def _identity(x):
    return x


def _transposed(x):
    return x.t()


def _transposed_copy(x):
    return x.t().contiguous()


def _uniform_logprobs(result) -> None:
    loss, lp, ent = result
    assert_same(lp.cpu(), torch.full((N,), -math.log(V)))
    assert_same(ent.cpu(), torch.full((N,), math.log(V)))


def linear_policy_loss_cases() -> list[Case]:
    op = "linear_policy_loss"
    return [
        Case(op, "shape", "hidden_size_differs_from_weight",
             lambda d: _lpl(_hidden(d), _weight(d, h=H + 1), _targets(d)), ("weight", "hidden")),
        Case(op, "shape", "targets_not_leading_shape",
             lambda d: _lpl(_hidden(d), _weight(d), _targets(d, n=N - 1),
                            _per_token(d), _per_token(d)), ("targets",)),
        Case(op, "shape", "advantages_not_per_token",
             lambda d: _lpl(_hidden(d), _weight(d), _targets(d), _per_token(d, n=N + 1)),
             ("advantages",)),
        Case(op, "shape", "token_weights_not_per_token",
             lambda d: _lpl(_hidden(d), _weight(d), _targets(d), _per_token(d),
                            torch.ones(1, device=d)), ("token_weights",)),
        Case(op, "shape", "old_logprobs_not_per_token",
             lambda d: _lpl(_hidden(d), _weight(d), _targets(d),
                            old_logprobs=torch.zeros(N, 1, device=d)), ("old_logprobs",)),
        Case(op, "shape", "ref_logprobs_not_per_token",
             lambda d: _lpl(_hidden(d), _weight(d), _targets(d), kl_coef=0.1,
                            ref_logprobs=torch.zeros(2 * N, device=d)), ("ref_logprobs",)),
        Case(op, "shape", "weight_rank1",
             lambda d: _lpl(_hidden(d), torch.randn(H, device=d), _targets(d)), ("weight",)),
        Case(op, "shape", "bias_wrong_length",
             lambda d: _lpl(_hidden(d), _weight(d), _targets(d),
                            bias=torch.zeros(V - 1, device=d)), ("bias",)),
        Case(op, "shape", "hidden_rank0",
             lambda d: _lpl(torch.tensor(1.0, device=d), _weight(d, h=1),
                            torch.tensor(0, device=d), torch.tensor(1.0, device=d),
                            torch.tensor(1.0, device=d)), ("hidden",)),
        Case(op, "dtype", "hidden_as_list",
             lambda d: _lpl(_hidden(d).tolist(), _weight(d), _targets(d)), ("hidden",)),
        Case(op, "dtype", "advantages_as_list",
             lambda d: _lpl(_hidden(d), _weight(d), _targets(d), _per_token(d).tolist()),
             ("advantages",)),
        Case(op, "dtype", "int_hidden_and_weight",
             lambda d: _lpl(_hidden(d).long(), _weight(d).long(), _targets(d)),
             ("hidden", "weight")),
        Case(op, "dtype", "weight_dtype_differs",
             lambda d: _lpl(_hidden(d), _weight(d).double(), _targets(d)), ("weight",)),
        Case(op, "dtype", "float_targets",
             lambda d: _lpl(_hidden(d), _weight(d), _targets(d).float()), ("targets",)),
        Case(op, "dtype", "int_advantages",
             lambda d: _lpl(_hidden(d), _weight(d), _targets(d), _targets(d)), ("advantages",)),
        Case(op, "dtype", "bool_token_weights",
             lambda d: _lpl(_hidden(d), _weight(d), _targets(d), _per_token(d),
                            torch.ones(N, dtype=torch.bool, device=d)), ("token_weights",)),
        Case(op, "dtype", "int_old_logprobs",
             lambda d: _lpl(_hidden(d), _weight(d), _targets(d),
                            old_logprobs=torch.zeros(N, dtype=torch.long, device=d)),
             ("old_logprobs",)),
        Case(op, "dtype", "bias_dtype_differs",
             lambda d: _lpl(_hidden(d), _weight(d), _targets(d),
                            bias=torch.zeros(V, device=d, dtype=torch.float64)), ("bias",)),
        Case(op, "device", "weight_on_cpu",
             lambda d: _lpl(_hidden(d), _weight("cpu"), _targets(d)), ("weight",),
             cuda_only=True),
        Case(op, "device", "targets_on_cpu",
             lambda d: _lpl(_hidden(d), _weight(d), _targets("cpu"), _per_token(d),
                            _per_token(d)), ("targets",), cuda_only=True),
        Case(op, "device", "advantages_on_cpu",
             lambda d: _lpl(_hidden(d), _weight(d), _targets(d), _per_token("cpu")),
             ("advantages",), cuda_only=True),
        Case(op, "device", "old_logprobs_on_cpu",
             lambda d: _lpl(_hidden(d), _weight(d), _targets(d), old_logprobs=_per_token("cpu")),
             ("old_logprobs",), cuda_only=True),
        Case(op, "device", "bias_on_cpu",
             lambda d: _lpl(_hidden(d), _weight(d), _targets(d), bias=torch.zeros(V)),
             ("bias",), cuda_only=True),
        Case(op, "range", "target_ge_vocab",
             lambda d: _lpl(_hidden(d), _weight(d), int64([0, 1, V, 2], d)), ("targets",)),
        Case(op, "range", "negative_target_not_ignore_index",
             lambda d: _lpl(_hidden(d), _weight(d), int64([0, -5, 1, 2], d)), ("targets",)),
        Case(op, "nonfinite", "temperature_nan",
             lambda d: _lpl(_hidden(d), _weight(d), _targets(d), temperature=math.nan),
             ("temperature",)),
        Case(op, "nonfinite", "temperature_inf",
             lambda d: _lpl(_hidden(d), _weight(d), _targets(d), temperature=math.inf),
             ("temperature",)),
        Case(op, "nonfinite", "kl_coef_nan",
             lambda d: _lpl(_hidden(d), _weight(d), _targets(d), kl_coef=math.nan,
                            ref_logprobs=_per_token(d)), ("kl_coef",)),
        Case(op, "nonfinite", "entropy_coef_inf",
             lambda d: _lpl(_hidden(d), _weight(d), _targets(d), entropy_coef=math.inf),
             ("entropy_coef",)),
        Case(op, "nonfinite", "clip_low_nan",
             lambda d: _lpl(_hidden(d), _weight(d), _targets(d), clip_low=math.nan),
             ("clip_low",)),
        Case(op, "empty", "vocab_zero",
             lambda d: _lpl(_hidden(d), _weight(d, v=0),
                            torch.zeros(N, dtype=torch.int64, device=d)), ("weight",)),
        Case(op, "empty", "vocab_zero_with_chunk_size",
             lambda d: _lpl(_hidden(d), _weight(d, v=0),
                            torch.zeros(N, dtype=torch.int64, device=d), chunk_size=2),
             ("weight",)),
        # H = 0: every logit is 0, so every log-prob is -log V and every entropy log V.
        Case(op, "empty", "hidden_size_zero",
             lambda d: _lpl(_hidden(d, h=0), _weight(d, h=0), _targets(d)),
             check=_uniform_logprobs),
        Case(op, "empty", "zero_rows",
             lambda d: _lpl(_hidden(d, n=0), _weight(d), _targets(d, n=0))[1:],
             check=check_shapes((0,), torch.float32)),
        Case(op, "scalar", "temperature_zero",
             lambda d: _lpl(_hidden(d), _weight(d), _targets(d), temperature=0.0),
             ("temperature",)),
        Case(op, "scalar", "clip_low_negative",
             lambda d: _lpl(_hidden(d), _weight(d), _targets(d), clip_low=-0.1), ("clip_low",)),
        Case(op, "scalar", "clip_high_negative",
             lambda d: _lpl(_hidden(d), _weight(d), _targets(d), clip_high=-1.0),
             ("clip_high",)),
        Case(op, "scalar", "kl_coef_without_ref_logprobs",
             lambda d: _lpl(_hidden(d), _weight(d), _targets(d), kl_coef=0.1),
             ("ref_logprobs",)),
        Case(op, "scalar", "chunk_size_zero",
             lambda d: _lpl(_hidden(d), _weight(d), _targets(d), chunk_size=0), ("chunk_size",)),
        Case(op, "scalar", "chunk_size_negative",
             lambda d: _lpl(_hidden(d), _weight(d), _targets(d), chunk_size=-3),
             ("chunk_size",)),
        Case(op, "memory", "hidden_transposed",
             lambda d: _with_grads(_transposed, _identity, d, hidden_shape=(H, N)), ("hidden",),
             equal_to=lambda d: _with_grads(_transposed_copy, _identity, d,
                                            hidden_shape=(H, N))),
        Case(op, "memory", "weight_transposed",
             lambda d: _with_grads(_identity, _transposed, d, weight_shape=(H, V)), ("weight",),
             equal_to=lambda d: _with_grads(_identity, _transposed_copy, d,
                                            weight_shape=(H, V))),
        Case(op, "memory", "hidden_expanded_rows",
             lambda d: _lpl(_hidden(d, n=1).expand(N, H), _weight(d), _targets(d)), ("hidden",),
             equal_to=lambda d: _lpl(_hidden(d, n=1).expand(N, H).contiguous(), _weight(d),
                                     _targets(d))),
        Case(op, "memory", "targets_strided",
             lambda d: _lpl(_hidden(d), _weight(d), _targets(d, n=2 * N)[::2]), ("targets",),
             equal_to=lambda d: _lpl(_hidden(d), _weight(d),
                                     _targets(d, n=2 * N)[::2].contiguous())),
        Case(op, "memory", "per_token_strided",
             lambda d: _lpl(_hidden(d), _weight(d), _targets(d), _per_token(d, n=2 * N)[::2],
                            _per_token(d, n=3 * N)[::3],
                            old_logprobs=_per_token(d, n=2 * N)[1::2]),
             ("advantages", "token_weights", "old_logprobs"),
             equal_to=lambda d: _lpl(_hidden(d), _weight(d), _targets(d),
                                     _per_token(d, n=2 * N)[::2].contiguous(),
                                     _per_token(d, n=3 * N)[::3].contiguous(),
                                     old_logprobs=_per_token(d, n=2 * N)[1::2].contiguous())),
    ]


CASES: list[Case] = linear_policy_loss_cases()
SMOKE_CALLS: dict[str, Callable[[str], Any]] = {
    "linear_policy_loss": lambda d: _lpl(_hidden(d), _weight(d), _targets(d)),
}
