import math

import pytest
import torch

from lambdapo_ext import decode_attention, reference
from tests.conftest import devices, to_device

OP = "decode_attention"


def make_inputs(batch, kv_heads, groups, width, dim, *, dtype=torch.float32, seed=0,
                padded=3):
    """q, keys, values and a mask whose first ``padded`` columns are -inf on odd rows."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads, groups, dim, generator=gen, dtype=torch.float64)
    keys = torch.randn(batch, kv_heads, width, dim, generator=gen, dtype=torch.float64)
    values = torch.randn(batch, kv_heads, width, dim, generator=gen, dtype=torch.float64)
    mask = torch.zeros(batch, width, dtype=torch.float64)
    mask[1::2, :padded] = -math.inf
    return tuple(t.to(dtype) for t in (q, keys, values, mask))


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (3, 2, 1, 9, 64), (4, 2, 7, 40, 64),
                                   (2, 3, 2, 17, 128), (5, 1, 3, 33, 24), (2, 2, 1, 300, 256)])
@pytest.mark.parametrize("device", devices(OP))
def test_float32_matches_float64_reference(shape, device):
    batch, kv_heads, groups, width, dim = shape
    q, k, v, mask = make_inputs(*shape, seed=dim, padded=min(3, width - 1))
    scale = dim ** -0.5
    for seen in sorted({1, max(1, width // 2), width}):
        if seen <= 3 and width > 1:
            continue   # odd rows would be all padding: see the NaN test
        got = decode_attention(*to_device((q, k, v), device), seen, scale=scale,
                               mask=mask.to(device)).cpu()
        want = reference.decode_attention(q.double(), k.double(), v.double(), seen, scale=scale,
                                          mask=mask.double())
        assert got.dtype == torch.float32 and got.shape == q.shape
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", devices(OP))
def test_low_precision_error_is_within_same_dtype_torch(dtype, device):
    q, k, v, mask = make_inputs(8, 2, 2, 50, 64, dtype=dtype, seed=3)
    got = decode_attention(*to_device((q, k, v), device), 40, scale=0.125,
                           mask=mask.to(device)).cpu()
    # plain torch at this dtype: the score matmul, softmax and value matmul in bf16/fp16.
    scores = 0.125 * q @ k[:, :, :40].transpose(-1, -2) + mask[:, None, None, :40]
    same_dtype = torch.softmax(scores, -1) @ v[:, :, :40]
    truth = reference.decode_attention(q.double(), k.double(), v.double(), 40, scale=0.125,
                                       mask=mask.double())
    ours_err = (got.double() - truth).abs().max().item()
    torch_err = (same_dtype.double() - truth).abs().max().item()
    assert got.dtype == dtype and ours_err <= torch_err + 1e-6, (ours_err, torch_err)


@pytest.mark.parametrize("device", devices(OP))
def test_matches_sdpa_with_grouped_heads_and_no_mask(device):
    q, k, v, _ = to_device(make_inputs(3, 2, 4, 20, 32, seed=4), device)
    got = decode_attention(q, k, v, 20, scale=0.3)
    # SDPA over [B, heads, 1, D] with each key-value head repeated for its query heads.
    heads_q = q.reshape(3, 8, 1, 32)
    want = torch.nn.functional.scaled_dot_product_attention(
        heads_q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), scale=0.3)
    torch.testing.assert_close(got.reshape(3, 8, 1, 32), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", devices(OP))
def test_columns_past_seen_and_masked_columns_are_not_read(device):
    q, k, v, mask = to_device(make_inputs(4, 2, 1, 30, 16, seed=5), device)
    want = decode_attention(q, k, v, 20, scale=0.25, mask=mask)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 20:], v2[:, :, 20:] = math.nan, math.nan   # past seen
    k2[1::2, :, :3], v2[1::2, :, :3] = 1e30, 1e30       # masked (-inf) columns
    torch.testing.assert_close(decode_attention(q, k2, v2, 20, scale=0.25, mask=mask), want,
                               rtol=0, atol=0)


@pytest.mark.parametrize("device", devices(OP))
def test_all_masked_row_gives_nan_as_softmax_does(device):
    q, k, v, mask = to_device(make_inputs(2, 1, 1, 8, 16, seed=6), device)
    mask[0] = -math.inf
    out = decode_attention(q, k, v, 8, scale=0.25, mask=mask)
    assert bool(out[0].isnan().all()) and not bool(out[1].isnan().any())


@pytest.mark.parametrize("device", devices(OP))
def test_strided_inputs_give_the_contiguous_result(device):
    q, k, v, mask = to_device(make_inputs(4, 2, 1, 12, 64, seed=7), device)
    q_strided = q.transpose(0, 1).contiguous().transpose(0, 1)
    wide_mask = torch.zeros(4, 24, device=device)
    wide_mask[:, ::2] = mask
    got = decode_attention(q_strided, k, v, 12, scale=0.1, mask=wide_mask[:, ::2])
    torch.testing.assert_close(got, decode_attention(q, k, v, 12, scale=0.1, mask=mask),
                               rtol=0, atol=0)


@pytest.mark.parametrize("device", devices(OP))
def test_result_is_the_same_at_every_thread_count(device):
    q, k, v, mask = to_device(make_inputs(64, 2, 2, 40, 64, seed=8), device)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(decode_attention(q, k, v, 33, scale=0.125, mask=mask))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=0, atol=0)


@pytest.mark.parametrize("device", devices(OP))
def test_opcheck(device):
    q, k, v, mask = to_device(make_inputs(3, 2, 2, 10, 32, seed=9), device)
    bf16 = to_device(make_inputs(2, 1, 1, 6, 64, dtype=torch.bfloat16, seed=10), device)
    for args in ((q, k, v, mask, 10, 0.2), (q, k, v, None, 4, 0.2),
                 (*bf16, 5, 0.125)):
        torch.library.opcheck(torch.ops.lambdapo.decode_attention.default, args,
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("device", devices(OP))
def test_torch_compile_fullgraph(device):
    q, k, v, mask = to_device(make_inputs(2, 2, 1, 9, 16, seed=11), device)

    @torch.compile(fullgraph=True)
    def step(a, b, c, m):
        return decode_attention(a, b, c, 9, scale=0.25, mask=m) * 2

    torch.testing.assert_close(step(q, k, v, mask),
                               2 * decode_attention(q, k, v, 9, scale=0.25, mask=mask))
