"""Bad inputs of lambda_advantages, run by tests/ops/test_bad_inputs.py through
tests/ops/bad_input_runner.py."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

import lambdapo_ext

from bad_input_runner import Case, check_shapes, int64, with_value

# The lambdapo:: dispatcher ops behind each public op (a backend is present for the public op
# when all of them have a kernel for it).
DISPATCH_OPS = {"lambda_advantages": ("lambda_advantages",)}


P, G = 3, 4


def _rewards(device: str, p: int = P, g: int = G) -> torch.Tensor:
    return torch.randn(p, g, device=device)


def _scores(device: str, p: int = P, g: int = G) -> torch.Tensor:
    return -torch.rand(p, g, device=device)


def _la(rewards, scores, **kwargs):
    return lambdapo_ext.lambda_advantages(rewards, scores, **kwargs)


def _masked_nan_gives_finite(result) -> None:
    assert bool(torch.isfinite(result).all()) and float(result[0, 0]) == 0.0, result.tolist()


def _nan_reward_masked_out(device: str):
    rewards = _rewards(device)
    rewards[0, 0] = math.nan
    mask = torch.ones(P, G, dtype=torch.bool, device=device)
    mask[0, 0] = False
    return _la(rewards, _scores(device), mask=mask)


def with_value(tensor: torch.Tensor, index, value) -> torch.Tensor:
    tensor[index] = value
    return tensor


def _flat(device: str, n: int = 6) -> torch.Tensor:
    return torch.randn(n, device=device)


def _group_ids(device: str, n: int = 6) -> torch.Tensor:
    return torch.arange(n, device=device) % 2


def _expanded_mask(device: str) -> torch.Tensor:
    return int64([[1, 0, 1, 1]], device).bool().expand(P, G)


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
        Case(op, "dtype", "rewards_as_list",
             lambda d: _la(_rewards(d).tolist(), _scores(d)), ("rewards",)),
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
             lambda d: _la(_flat(d), _flat(d), group_ids=int64([0, 0, -1, -1, 1, 1], d)),
             ("group_ids",)),
        Case(op, "nonfinite", "nan_reward",
             lambda d: _la(with_value(_rewards(d), (1, 2), math.nan), _scores(d)), ("rewards",)),
        Case(op, "nonfinite", "inf_score",
             lambda d: _la(_rewards(d), with_value(_scores(d), (0, 1), -math.inf)), ("scores",)),
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
             check=check_shapes((0, G), torch.float32)),
        Case(op, "empty", "zero_group_size",
             lambda d: _la(_rewards(d, g=0), _scores(d, g=0)),
             check=check_shapes((P, 0), torch.float32)),
        Case(op, "empty", "ragged_zero_members",
             lambda d: _la(_flat(d, 0), _flat(d, 0), group_ids=_group_ids(d, 0)),
             check=check_shapes((0,), torch.float32)),
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


CASES: list[Case] = lambda_advantages_cases()
# A small valid call of each op: after a case on CUDA, it shows whether the device still works.
SMOKE_CALLS: dict[str, Callable[[str], Any]] = {
    "lambda_advantages": lambda d: _la(_rewards(d), _scores(d)),
}
