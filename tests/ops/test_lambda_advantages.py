import itertools
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lambdapo_ext import lambda_advantages
from lambdapo_ext import reference
from lambdapo_ext.advantages import NORMALIZE_MODES as NORMALIZE
from tests.conftest import devices, skip_without_cuda, to_device


def random_groups(p, g, *, seed, binary=False, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    if binary:
        rewards = torch.randint(0, 2, (p, g), generator=gen).to(dtype)
    else:
        rewards = torch.randn(p, g, generator=gen, dtype=torch.float64).to(dtype)
    scores = (-torch.rand(p, g, generator=gen, dtype=torch.float64) * 3).to(dtype)
    return rewards, scores


def assert_matches_reference(out, rewards, scores, **kwargs):
    expected = reference.lambda_advantages(rewards.double(), scores.double(), **kwargs)
    assert out.dtype == torch.float32
    assert out.shape == rewards.shape
    torch.testing.assert_close(out.double(), expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("g", [1, 2, 3, 17, 1000])
@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 7.0])
def test_dense_matches_float64_reference(g, normalize, beta):
    p = 3 if g == 1000 else 11
    rewards, scores = random_groups(p, g, seed=g)
    out = lambda_advantages(rewards, scores, beta=beta, normalize=normalize)
    assert_matches_reference(out, rewards, scores, beta=beta, normalize=normalize)


@pytest.mark.parametrize("g", [2, 4, 16, 63, 64, 65])
@pytest.mark.parametrize("p", [1, 15, 16, 17, 300])
@pytest.mark.parametrize("normalize", NORMALIZE)
def test_many_small_groups_across_lane_blocks(p, g, normalize):
    """Dense groups of <= 64 members run many groups per vector step (blocks of 64 groups
    in lanes of 16): every lane padding and several blocks, with masked NaN padding, against float64."""
    rewards, scores = random_groups(p, g, seed=100 * p + g, binary=g % 2 == 0)
    mask = torch.rand(p, g, generator=torch.Generator().manual_seed(p + g)) > 0.2
    rewards[~mask], scores[~mask] = float("nan"), float("inf")
    out = lambda_advantages(rewards, scores, mask=mask, beta=1.5, normalize=normalize)
    clean = lambda t: t.masked_fill(~mask, 0.0)  # noqa: E731 - the reference multiplies
    assert_matches_reference(out, clean(rewards), clean(scores), mask=mask, beta=1.5,
                             normalize=normalize)
    assert (out[~mask] == 0).all()
    plain = lambda_advantages(clean(rewards), clean(scores), beta=1.5, normalize=normalize)
    assert_matches_reference(plain, clean(rewards), clean(scores), beta=1.5,
                             normalize=normalize)


@pytest.mark.parametrize("g", [4, 64])
def test_small_groups_are_batch_invariant(g):
    rewards, scores = random_groups(700, g, seed=g)
    batch = lambda_advantages(rewards, scores)
    for row in (0, 15, 16, 255, 256, 699):
        alone = lambda_advantages(rewards[row:row + 1], scores[row:row + 1])
        assert torch.equal(alone[0], batch[row])
    shifted = lambda_advantages(rewards[5:], scores[5:])   # every group in another lane
    assert torch.equal(shifted, batch[5:])


@pytest.mark.parametrize("normalize", NORMALIZE)
def test_binary_rewards_and_masks(normalize):
    rewards, scores = random_groups(64, 16, seed=1, binary=True)
    mask = torch.rand(64, 16, generator=torch.Generator().manual_seed(2)) > 0.3
    mask[0] = False          # empty group
    mask[1] = False
    mask[1, 3] = True        # a single valid member
    out = lambda_advantages(rewards, scores, mask=mask, beta=2.0, normalize=normalize)
    assert_matches_reference(out, rewards, scores, mask=mask, beta=2.0, normalize=normalize)
    assert (out[~mask] == 0).all()
    assert (out[:2] == 0).all()


def test_masked_members_may_hold_non_finite_padding():
    rewards, scores = random_groups(4, 8, seed=3)
    mask = torch.ones(4, 8, dtype=torch.bool)
    mask[:, -2:] = False
    padded_r, padded_s = rewards.clone(), scores.clone()
    padded_r[:, -2:] = float("nan")
    padded_s[:, -1] = float("inf")
    out = lambda_advantages(padded_r, padded_s, mask=mask)
    torch.testing.assert_close(out[:, :6], lambda_advantages(rewards[:, :6], scores[:, :6]),
                               rtol=0, atol=0)
    assert (out[:, 6:] == 0).all()


def test_all_tied_groups_are_zero():
    rewards = torch.full((5, 33), 0.7)
    scores = torch.randn(5, 33)
    for normalize in NORMALIZE:
        assert (lambda_advantages(rewards, scores, normalize=normalize, beta=3.0) == 0).all()


def test_ties_contribute_nothing():
    # Two tied members: each one's advantage only depends on the untied member.
    rewards = torch.tensor([[1.0, 1.0, 0.0]])
    scores = torch.tensor([[-0.1, -5.0, -1.0]])
    out = lambda_advantages(rewards, scores, beta=1.0, normalize="none")
    w = lambda si, sj: 2 * torch.sigmoid(torch.tensor(-(si - sj)))
    torch.testing.assert_close(out[0, 0], w(-0.1, -1.0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[0, 1], w(-5.0, -1.0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("normalize", ["mean", "none"])
def test_groups_sum_to_zero(normalize):
    rewards, scores = random_groups(20, 300, seed=5)
    out = lambda_advantages(rewards, scores, beta=1.5, normalize=normalize)
    scale = out.abs().max().item()
    assert out.double().sum(-1).abs().max().item() <= 1e-5 * max(scale, 1.0) * 300 ** 0.5


def test_beta_zero_is_rloo():
    rewards, scores = random_groups(16, 40, seed=6)
    out = lambda_advantages(rewards, scores, beta=0.0)
    torch.testing.assert_close(out.double(), reference.rloo_advantages(rewards.double()),
                               rtol=1e-6, atol=1e-6)


def test_swapping_two_members_swaps_their_advantages():
    rewards, scores = random_groups(1, 50, seed=7)
    out = lambda_advantages(rewards, scores)
    perm = torch.arange(50)
    perm[[4, 31]] = perm[[31, 4]]
    swapped = lambda_advantages(rewards[:, perm], scores[:, perm])
    torch.testing.assert_close(swapped, out[:, perm], rtol=1e-6, atol=1e-6)


def test_confident_preference_gets_smaller_weight():
    # The policy already prefers the better response: its advantage shrinks as beta grows.
    rewards = torch.tensor([[1.0, 0.0]])
    scores = torch.tensor([[-0.1, -2.0]])
    small = lambda_advantages(rewards, scores, beta=0.5)[0, 0]
    large = lambda_advantages(rewards, scores, beta=5.0)[0, 0]
    assert 0 < large < small < 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_input_dtypes_give_float32(dtype):
    rewards, scores = random_groups(4, 9, seed=8, dtype=dtype)
    out = lambda_advantages(rewards, scores)
    assert out.dtype == torch.float32
    assert_matches_reference(out, rewards.float(), scores.float())


def test_batch_invariance():
    rewards, scores = random_groups(300, 23, seed=9)
    batch = lambda_advantages(rewards, scores)
    for row in (0, 137, 299):
        alone = lambda_advantages(rewards[row:row + 1], scores[row:row + 1])
        assert torch.equal(alone[0], batch[row])


@pytest.mark.parametrize("normalize", NORMALIZE)
def test_ragged_groups_in_shuffled_order(normalize):
    gen = torch.Generator().manual_seed(10)
    sizes = [1, 2, 5, 17, 64, 3]
    ids = torch.cat([torch.full((n,), 1000 * k + 7) for k, n in enumerate(sizes)])
    perm = torch.randperm(ids.numel(), generator=gen)
    ids = ids[perm]
    rewards = torch.randint(0, 3, (ids.numel(),), generator=gen).float()
    scores = -torch.rand(ids.numel(), generator=gen) * 2
    mask = torch.rand(ids.numel(), generator=gen) > 0.1
    out = lambda_advantages(rewards, scores, group_ids=ids, mask=mask, beta=1.3,
                            normalize=normalize)
    assert_matches_reference(out, rewards, scores, group_ids=ids, mask=mask, beta=1.3,
                             normalize=normalize)
    # And independently: each group on its own as a dense [1, n] call.
    for gid in ids.unique():
        sel = ids == gid
        dense = lambda_advantages(rewards[sel][None], scores[sel][None], mask=mask[sel][None],
                                  beta=1.3, normalize=normalize)[0]
        torch.testing.assert_close(out[sel], dense, rtol=1e-6, atol=1e-6)


def test_empty_inputs():
    assert lambda_advantages(torch.empty(0, 4), torch.empty(0, 4)).shape == (0, 4)
    assert lambda_advantages(torch.empty(3, 0), torch.empty(3, 0)).shape == (3, 0)
    empty = torch.empty(0)
    assert lambda_advantages(empty, empty, group_ids=torch.empty(0, dtype=torch.long)).shape == (0,)


def test_no_gradient_flows_through():
    rewards, scores = random_groups(2, 5, seed=11)
    scores.requires_grad_(True)
    out = lambda_advantages(rewards, scores)
    assert not out.requires_grad


@settings(max_examples=150, deadline=None)
@given(
    p=st.integers(1, 4),
    g=st.integers(1, 24),
    beta=st.floats(0.0, 20.0),
    normalize=st.sampled_from(NORMALIZE),
    reward_levels=st.integers(1, 4),
    use_mask=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_hypothesis_against_reference(p, g, beta, normalize, reward_levels, use_mask, seed):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, reward_levels, (p, g), generator=gen).double() / reward_levels
    scores = -torch.rand(p, g, generator=gen, dtype=torch.float64) * 4
    mask = torch.rand(p, g, generator=gen) > 0.3 if use_mask else None
    out = lambda_advantages(rewards, scores, mask=mask, beta=beta, normalize=normalize)
    assert_matches_reference(out, rewards, scores, mask=mask, beta=beta, normalize=normalize)


def _sample_inputs():
    r, s = random_groups(3, 6, seed=12)
    ids = torch.tensor([2, 0, 2, 1, 0, 2])
    return [
        (r, s, None, None, 1.0, "mean", 1e-6),
        (r, s, r > 0, None, 0.5, "std", 1e-6),
        (r[0], s[0], None, ids, 2.0, "none", 1e-6),
    ]


@pytest.mark.parametrize("device", devices("lambda_advantages"))
@pytest.mark.parametrize("args", _sample_inputs())
def test_opcheck(args, device):
    torch.library.opcheck(torch.ops.lambdapo.lambda_advantages.default, to_device(args, device))


@pytest.mark.parametrize("device", devices("lambda_advantages"))
def test_torch_compile_fullgraph(device):
    @torch.compile(fullgraph=True)
    def scaled_advantages(rewards, scores):
        return lambda_advantages(rewards, scores, beta=0.7, normalize="std") * 2.0

    rewards, scores = to_device(random_groups(4, 10, seed=13), device)
    expected = lambda_advantages(rewards, scores, beta=0.7, normalize="std") * 2.0
    torch.testing.assert_close(scaled_advantages(rewards, scores), expected)


BAD_INPUTS = [
    (dict(rewards=torch.zeros(2, 3), scores=torch.zeros(2, 4)), RuntimeError, "scores has shape"),
    (dict(rewards=torch.zeros(2, 3, dtype=torch.long), scores=torch.zeros(2, 3)), RuntimeError,
     "rewards must be a floating-point"),
    (dict(rewards=torch.zeros(2, 3), scores=torch.zeros(2, 3, dtype=torch.int32)), RuntimeError,
     "scores must be a floating-point"),
    (dict(rewards=torch.zeros(6), scores=torch.zeros(6)), RuntimeError, "rewards must be 2-D"),
    (dict(rewards=torch.zeros(2, 2, 2), scores=torch.zeros(2, 2, 2)), RuntimeError,
     "rewards must be 2-D"),
    (dict(rewards=torch.tensor([[0.0, float("nan")]]), scores=torch.zeros(1, 2)), ValueError,
     "rewards holds non-finite"),
    (dict(rewards=torch.zeros(1, 2), scores=torch.tensor([[0.0, float("inf")]])), ValueError,
     "scores holds non-finite"),
    (dict(rewards=torch.zeros(2, 3), scores=torch.zeros(2, 3), normalize="median"), ValueError,
     "normalize"),
    (dict(rewards=torch.zeros(2, 3), scores=torch.zeros(2, 3), beta=float("inf")), ValueError,
     "beta"),
    (dict(rewards=torch.zeros(2, 3), scores=torch.zeros(2, 3), eps=-1.0), ValueError, "eps"),
    (dict(rewards=torch.zeros(2, 3), scores=torch.zeros(2, 3), mask=torch.ones(2, 3)),
     RuntimeError, "mask must be a bool"),
    (dict(rewards=torch.zeros(2, 3), scores=torch.zeros(2, 3),
          mask=torch.ones(3, 2, dtype=torch.bool)), RuntimeError, "mask has shape"),
    (dict(rewards=torch.zeros(4), scores=torch.zeros(4), group_ids=torch.zeros(3, dtype=torch.long)),
     RuntimeError, "group_ids has shape"),
    (dict(rewards=torch.zeros(4), scores=torch.zeros(4), group_ids=torch.tensor([0, 1, -1, 0])),
     ValueError, "group_ids must be non-negative"),
    (dict(rewards=torch.zeros(4), scores=torch.zeros(4), group_ids=torch.zeros(4)),
     RuntimeError, "group_ids must be an integer"),
    (dict(rewards=torch.zeros(2, 2), scores=torch.zeros(2, 2), group_ids=torch.zeros(4, dtype=torch.long)),
     RuntimeError, "with group_ids, rewards must be 1-D"),
]


@pytest.mark.parametrize("kwargs,exc,message", BAD_INPUTS)
def test_bad_inputs_raise_naming_the_argument(kwargs, exc, message):
    kwargs = dict(kwargs)
    rewards, scores = kwargs.pop("rewards"), kwargs.pop("scores")
    with pytest.raises(exc, match=message):
        lambda_advantages(rewards, scores, **kwargs)


def test_bad_normalize_through_the_raw_op():
    r = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="normalize"):
        torch.ops.lambdapo.lambda_advantages(r, r, None, None, 1.0, "bogus", 1e-6)


def test_kernel_accepts_exactly_the_python_normalize_modes():
    """The C++ guard (kNormalizeModes) and lambdapo_ext.advantages.NORMALIZE_MODES list the
    same modes: each Python mode runs through the raw op, and the op's error lists exactly
    them."""
    rewards, scores = random_groups(2, 5, seed=4)
    for mode in NORMALIZE:
        torch.ops.lambdapo.lambda_advantages(rewards, scores, None, None, 1.0, mode, 1e-6)
    for near_miss in ("", "Mean", "mean ", "std\0", "median", "max"):
        with pytest.raises(ValueError, match="normalize must be one of") as error:
            torch.ops.lambdapo.lambda_advantages(rewards, scores, None, None, 1.0, near_miss,
                                                 1e-6)
    listed = re.search(r"normalize must be one of (.*), got", str(error.value)).group(1)
    assert tuple(re.findall(r'"([^"]*)"', listed)) == tuple(NORMALIZE)


@pytest.mark.parametrize("normalize", NORMALIZE)
def test_groups_past_one_float_partial_match_float64_reference(normalize):
    """G = 2500 crosses the CPU kernel's blocks of 128 rows and columns (float partials of
    at most 128 pair terms summed in double, as on CUDA): still the float64 reference at the
    usual tolerance."""
    rewards, scores = random_groups(2, 2500, seed=5)
    out = lambda_advantages(rewards, scores, beta=1.3, normalize=normalize)
    assert_matches_reference(out, rewards, scores, beta=1.3, normalize=normalize)


@skip_without_cuda("lambda_advantages")
def test_device_mismatch_names_the_argument():
    with pytest.raises(RuntimeError, match="scores is on"):
        lambda_advantages(torch.zeros(2, 3, device="cuda"), torch.zeros(2, 3))


@skip_without_cuda("lambda_advantages")
@pytest.mark.parametrize("p,g", [(1, 1), (7, 3), (64, 257), (3, 1000), (2, 16384), (5000, 8)])
@pytest.mark.parametrize("normalize", NORMALIZE)
def test_cuda_matches_cpu(p, g, normalize):
    rewards, scores = random_groups(p, g, seed=p + g)
    mask = torch.rand(p, g, generator=torch.Generator().manual_seed(1)) > 0.2
    for m in (None, mask):
        cpu = lambda_advantages(rewards, scores, mask=m, beta=1.7, normalize=normalize)
        cuda = lambda_advantages(rewards.cuda(), scores.cuda(),
                                 mask=None if m is None else m.cuda(), beta=1.7,
                                 normalize=normalize)
        tol = 2e-5 * max(1.0, g ** 0.5) if normalize != "none" else 2e-5 * g
        torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-4, atol=tol)


@skip_without_cuda("lambda_advantages")
def test_cuda_ragged_matches_cpu():
    gen = torch.Generator().manual_seed(14)
    ids = torch.randint(0, 50, (5000,), generator=gen) * 3
    rewards = torch.randint(0, 2, (5000,), generator=gen).float()
    scores = -torch.rand(5000, generator=gen)
    cpu = lambda_advantages(rewards, scores, group_ids=ids)
    cuda = lambda_advantages(rewards.cuda(), scores.cuda(), group_ids=ids.cuda())
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-4, atol=1e-5)


def _extreme_groups(g: int, *, seed: int):
    """Groups that stress the weights: scores spread from 0.01 to 1e3 around offsets up to
    1e4 (the CUDA kernel's per-member factors underflow there and it falls back per pair),
    score ties, reward ties, a mask."""
    gen = torch.Generator().manual_seed(seed)
    spreads = torch.tensor([0.01, 1.0, 30.0, 1e3])
    offsets = torch.tensor([0.0, -1e4, 5e3, -3.0])
    rewards = torch.randint(0, 3, (4, g), generator=gen).float()
    rewards[1] = torch.randn(g, generator=gen)
    scores = offsets[:, None] - spreads[:, None] * torch.rand(4, g, generator=gen)
    scores[2, : g // 4] = scores[2, g // 4]  # tied scores
    mask = torch.rand(4, g, generator=gen) > 0.15
    return rewards, scores, mask


@pytest.mark.parametrize("g", [9, 300])
@pytest.mark.parametrize("beta", [-2.0, 0.3, 7.0, 200.0])
def test_extreme_scores_and_beta_match_float64_reference(g, beta):
    rewards, scores, mask = _extreme_groups(g, seed=g)
    out = lambda_advantages(rewards, scores, mask=mask, beta=beta)
    assert_matches_reference(out, rewards, scores, mask=mask, beta=beta)


@skip_without_cuda("lambda_advantages")
@pytest.mark.parametrize("g", [9, 64, 65, 300, 2000])
@pytest.mark.parametrize("beta", [-2.0, 0.3, 7.0, 200.0])
@pytest.mark.parametrize("normalize", NORMALIZE)
def test_cuda_extreme_scores_and_beta_match_float64_reference(g, beta, normalize):
    """Both CUDA kernels (member kernel up to G=64, factored tiles above) against the
    float64 reference, at the CPU test's tolerance scaled like test_cuda_matches_cpu."""
    rewards, scores, mask = _extreme_groups(g, seed=g)
    out = lambda_advantages(rewards.cuda(), scores.cuda(), mask=mask.cuda(), beta=beta,
                            normalize=normalize).cpu()
    expected = reference.lambda_advantages(rewards.double(), scores.double(), mask=mask,
                                           beta=beta, normalize=normalize)
    tol = 2e-5 * max(1.0, g ** 0.5) if normalize != "none" else 2e-5 * g
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=tol)


@skip_without_cuda("lambda_advantages")
@pytest.mark.parametrize("validate", [True, False])
def test_cuda_ragged_groups_of_every_size_match_cpu(validate):
    """Ragged groups from 1 to 700 members: validated calls use the group table (tiled
    kernel for groups over 64), trusted ones the member kernel for all."""
    gen = torch.Generator().manual_seed(15)
    sizes = torch.tensor([1, 2, 5, 64, 65, 130, 700])
    ids = torch.repeat_interleave(torch.arange(7) * 5 + 2, sizes)
    perm = torch.randperm(ids.numel(), generator=gen)
    ids = ids[perm]
    rewards = torch.randn(ids.numel(), generator=gen)
    scores = -torch.rand(ids.numel(), generator=gen) * 4
    mask = torch.rand(ids.numel(), generator=gen) > 0.1
    for normalize in NORMALIZE:
        cpu = lambda_advantages(rewards, scores, mask=mask, group_ids=ids, beta=2.0,
                                normalize=normalize)
        cuda = lambda_advantages(rewards.cuda(), scores.cuda(), mask=mask.cuda(),
                                 group_ids=ids.cuda(), beta=2.0, normalize=normalize,
                                 validate=validate)
        torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-4, atol=1e-3)
