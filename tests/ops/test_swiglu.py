import pytest
import torch
import torch.nn.functional as F

from lambdapo_ext import reference, swiglu
from tests.conftest import devices, to_device

OP = "swiglu_forward"


def make_inputs(rows, width, *, dtype=torch.float32, seed=0, scale=3.0):
    """gate_up [*rows, 2 width] and the output gradient [*rows, width]."""
    rows = rows if isinstance(rows, tuple) else (rows,)
    gen = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn(*rows, 2 * width, generator=gen, dtype=torch.float64) * scale)
    grad = torch.randn(*rows, width, generator=gen, dtype=torch.float64)
    return gate_up.to(dtype), grad.to(dtype)


def ours(gate_up, grad):
    gate_up = gate_up.detach().clone().requires_grad_(True)
    y = swiglu(gate_up)
    y.backward(grad)
    return y.detach(), gate_up.grad


def torch_swiglu(gate_up, grad, dtype=torch.float64):
    """transformers' act_fn(gate) * up in ``dtype``: float64 for the truth, the input's own
    dtype for the error plain torch makes at that precision."""
    gate_up = gate_up.detach().to(dtype).requires_grad_(True)
    gate, up = gate_up.chunk(2, -1)
    y = F.silu(gate) * up
    y.backward(grad.to(dtype))
    return y.detach(), gate_up.grad


@pytest.mark.parametrize("rows,width", [(1, 1), (5, 7), ((3, 17), 128), ((2, 30), 100),
                                        (1000, 64), (3, 4099)])
@pytest.mark.parametrize("device", devices(OP))
def test_float32_matches_float64_reference(rows, width, device):
    gate_up, grad = make_inputs(rows, width, seed=width)
    got = to_device(ours(*to_device((gate_up, grad), device)), "cpu")
    want = torch_swiglu(gate_up, grad)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape
        torch.testing.assert_close(a.double(), b, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", devices(OP))
def test_low_precision_error_is_within_same_dtype_torch(dtype, device):
    # Judged against float64, relative to the error of plain torch at this dtype.
    gate_up, grad = make_inputs(64, 256, dtype=dtype, seed=3)
    got = to_device(ours(*to_device((gate_up, grad), device)), "cpu")
    same_dtype = torch_swiglu(gate_up, grad, dtype=dtype)
    truth = torch_swiglu(gate_up, grad)
    for ours_out, torch_out, true_out in zip(got, same_dtype, truth):
        assert ours_out.dtype == dtype
        ours_err = (ours_out.double() - true_out).abs().max().item()
        torch_err = (torch_out.double() - true_out).abs().max().item()
        assert ours_err <= torch_err + 1e-6, (ours_err, torch_err)


@pytest.mark.parametrize("device", devices(OP))
def test_matches_torch_and_reference(device):
    gate_up, _ = to_device(make_inputs((4, 9), 48, seed=5), device)
    gate, up = gate_up.chunk(2, -1)
    y = swiglu(gate_up)
    torch.testing.assert_close(y, F.silu(gate) * up, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y, reference.swiglu(gate_up), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", devices(OP))
def test_gate_is_the_first_half(device):
    # silu(0) = 0: a zero gate half zeroes the output whatever up holds, a zero up half too.
    width = 24
    gate_up, _ = to_device(make_inputs(3, width, seed=6), device)
    zero_gate = gate_up.clone()
    zero_gate[:, :width] = 0
    assert bool((swiglu(zero_gate) == 0).all())
    zero_up = gate_up.clone()
    zero_up[:, width:] = 0
    assert bool((swiglu(zero_up) == 0).all())
    assert bool((swiglu(gate_up) != 0).all())


@pytest.mark.parametrize("device", devices(OP))
def test_very_negative_gates_give_zero(device):
    # silu(gate) underflows to 0 far below -88: its product with any finite up is 0.
    gate_up = torch.tensor([[-1e30, -1e4, -100.0, 1e30, 1e4, 1e20]], device=device)
    assert bool((swiglu(gate_up) == 0).all())


@pytest.mark.parametrize("device", devices(OP))
def test_gradcheck_float64(device):
    gate_up, _ = to_device(make_inputs((3, 5), 12, dtype=torch.float64, seed=7), device)
    gate_up.requires_grad_(True)
    assert torch.autograd.gradcheck(swiglu, (gate_up,))


@pytest.mark.parametrize("device", devices(OP))
def test_rows_are_batch_invariant(device):
    gate_up, _ = to_device(make_inputs(300, 80, seed=8), device)
    alone = torch.cat([swiglu(gate_up[i:i + 1]) for i in range(0, 300, 37)])
    torch.testing.assert_close(swiglu(gate_up)[::37], alone, rtol=0, atol=0)


def test_result_is_the_same_at_every_thread_count():
    gate_up, grad = make_inputs(1000, 200, seed=9)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(ours(gate_up, grad))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("device", devices(OP))
def test_strided_and_unaligned_inputs_give_the_contiguous_result(device):
    gate_up, grad = to_device(make_inputs((8, 2), 40, seed=10), device)
    strided = gate_up.transpose(0, 1)   # [2, 8, 80], rows not in memory order
    for a, b in zip(ours(strided, grad.transpose(0, 1)),
                    ours(strided.contiguous(), grad.transpose(0, 1).contiguous())):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # A contiguous view whose start is one element past an aligned one (no vector loads).
    flat = to_device(make_inputs(1, 16 * 80 + 1, seed=11)[0], device).view(-1)
    unaligned = flat[1:1 + 16 * 80].view(16, 80)
    assert unaligned.is_contiguous()
    torch.testing.assert_close(swiglu(unaligned), swiglu(unaligned.clone()), rtol=0, atol=0)


@pytest.mark.parametrize("device", devices(OP))
def test_zero_rows(device):
    gate_up = torch.empty(2, 0, 16, device=device, requires_grad=True)
    y = swiglu(gate_up)
    assert y.shape == (2, 0, 8)
    y.sum().backward()
    assert gate_up.grad.shape == gate_up.shape


@pytest.mark.parametrize("device", devices(OP))
def test_opcheck(device):
    gate_up, grad = to_device(make_inputs((3, 4), 24, seed=12), device)
    bf16, _ = to_device(make_inputs(5, 40, dtype=torch.bfloat16, seed=13), device)
    for x in (gate_up, gate_up[:, 1:], bf16):
        torch.library.opcheck(torch.ops.lambdapo.swiglu_forward.default,
                              (x.clone().requires_grad_(True),))
    torch.library.opcheck(torch.ops.lambdapo.swiglu_backward.default, (grad, gate_up))


@pytest.mark.parametrize("device", devices(OP))
def test_torch_compile_fullgraph_forward_and_backward(device):
    gate_up, grad = to_device(make_inputs((4, 6), 32, seed=14), device)

    @torch.compile(fullgraph=True)
    def loss_fn(x):
        return (swiglu(x) * grad).sum()

    x = gate_up.clone().requires_grad_(True)
    loss_fn(x).backward()
    torch.testing.assert_close(x.grad, ours(gate_up, grad)[1], rtol=1e-6, atol=1e-6)
