"""Pairwise lambda advantages (DESIGN.md section 2): the typed op, its fake kernel."""

from __future__ import annotations

import torch
from torch import Tensor

from lambdapo_ext._checks import check_same_device, check_tensors
from lambdapo_ext._loader import _LOAD_ERROR, require_library

# lambda_advantages' normalize modes: the one Python list (configs and adapters import it).
# The C++ kernels parse the string themselves (kNormalizeModes in csrc/lambda_advantages.h);
# tests check that both accept exactly these.
NORMALIZE_MODES = ("mean", "none", "std")


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
        beta: sharpness of the confidence weighting (finite). ``beta < 0`` is defined and
            inverts the weighting (the pairs the policy already ranks right weigh most):
            the opposite of LambdaPO, which the method's settings (the training config, the
            TRL and verl adapters) refuse; the op computes it for studies that want it.
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
        TypeError: an input that is not a tensor (a Python list, say).
        RuntimeError: shape, dtype or device mismatches (the message names the argument),
            or the compiled library is unavailable.
    """
    check_tensors("lambda_advantages", rewards=rewards, scores=scores, mask=mask,
                  group_ids=group_ids)
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"lambda_advantages: normalize must be one of {NORMALIZE_MODES}, "
                         f"got {normalize!r}")
    require_library()
    return torch.ops.lambdapo.lambda_advantages.default(
        rewards.detach(), scores.detach(),
        None if mask is None else mask.detach(),
        None if group_ids is None else group_ids.detach(),
        float(beta), normalize, float(eps), bool(validate))


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
        check_same_device("lambda_advantages", ("rewards", rewards), ("scores", scores),
                          ("mask", mask), ("group_ids", group_ids))
        return rewards.new_empty(rewards.shape, dtype=torch.float32)
