import pytest
import torch
import torch.nn.functional as F

from lambdapo_ext import reference, rms_norm
from tests.conftest import devices, to_device

OP = "rms_norm_forward"


def make_inputs(shape, *, dtype=torch.float32, seed=0, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    weight = (1 + 0.5 * torch.randn(shape[-1], generator=gen, dtype=torch.float64)).to(dtype)
    grad = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
    return x, weight, grad


def ours(x, weight, grad, eps=1e-6):
    x = x.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    y = rms_norm(x, weight, eps=eps)
    y.backward(grad)
    return y.detach(), x.grad, weight.grad


def torch_rms_norm(x, weight, grad, eps=1e-6, dtype=torch.float64):
    """transformers' LlamaRMSNorm in ``dtype``: float64 for the truth, the input's own
    dtype for the error plain torch makes at that precision."""
    x = x.detach().to(dtype).requires_grad_(True)
    weight = weight.detach().to(dtype).requires_grad_(True)
    h = x.float() if dtype != torch.float64 else x
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * h.to(dtype)
    y.backward(grad.to(dtype))
    return y.detach(), x.grad, weight.grad


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (3, 17, 128), (2, 300, 96), (1000, 64)])
@pytest.mark.parametrize("device", devices(OP))
def test_float32_matches_float64_reference(shape, device):
    x, w, g = make_inputs(shape, seed=shape[-1])
    got = to_device(ours(*to_device((x, w, g), device)), "cpu")
    want = torch_rms_norm(x, w, g)
    for a, b, tol in zip(got, want, (1e-6, 1e-5, 1e-4)):
        assert a.dtype == torch.float32 and a.shape == b.shape
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", devices(OP))
def test_low_precision_error_is_within_same_dtype_torch(dtype, device):
    # Accuracy judged against float64, relative to the error of the same computation in
    # plain torch at this dtype (transformers' LlamaRMSNorm), as flash-attention judges.
    x, w, g = make_inputs((64, 256), dtype=dtype, seed=3)
    got = to_device(ours(*to_device((x, w, g), device)), "cpu")
    same_dtype = torch_rms_norm(x, w, g, dtype=dtype)
    truth = torch_rms_norm(x, w, g)
    for ours_out, torch_out, true_out in zip(got, same_dtype, truth):
        assert ours_out.dtype == dtype
        ours_err = (ours_out.double() - true_out).abs().max().item()
        torch_err = (torch_out.double() - true_out).abs().max().item()
        assert ours_err <= 2 * torch_err + 1e-6, (ours_err, torch_err)


@pytest.mark.parametrize("device", devices(OP))
def test_matches_functional_rms_norm_and_reference(device):
    x, w, _ = to_device(make_inputs((4, 9, 48), seed=5), device)
    y = rms_norm(x, w, eps=1e-5)
    torch.testing.assert_close(y, F.rms_norm(x, (48,), w, 1e-5), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y, reference.rms_norm(x, w, eps=1e-5), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", devices(OP))
def test_gradcheck_float64(device):
    x, w, _ = to_device(make_inputs((3, 5, 12), dtype=torch.float64, seed=6), device)
    x.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, eps=1e-3), (x, w))


@pytest.mark.parametrize("device", devices(OP))
def test_only_requested_gradients(device):
    x, w, g = to_device(make_inputs((6, 32), seed=7), device)
    frozen = x.detach().clone().requires_grad_(True)
    rms_norm(frozen, w, eps=1e-6).backward(g)   # weight frozen: only grad_x
    _, gx, _ = ours(x, w, g)
    torch.testing.assert_close(frozen.grad, gx, rtol=0, atol=0)
    weight_only = w.detach().clone().requires_grad_(True)
    rms_norm(x, weight_only, eps=1e-6).backward(g)
    assert weight_only.grad is not None and weight_only.grad.shape == w.shape


@pytest.mark.parametrize("device", devices(OP))
def test_rows_are_batch_invariant(device):
    x, w, _ = to_device(make_inputs((300, 80), seed=8), device)
    alone = torch.cat([rms_norm(x[i:i + 1], w) for i in range(0, 300, 37)])
    torch.testing.assert_close(rms_norm(x, w)[::37], alone, rtol=0, atol=0)


def test_weight_gradient_is_the_same_at_every_thread_count():
    x, w, g = make_inputs((1000, 64), seed=9)
    before = torch.get_num_threads()
    try:
        grads = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            grads.append(ours(x, w, g))
    finally:
        torch.set_num_threads(before)
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("device", devices(OP))
def test_strided_input_gives_the_contiguous_result(device):
    x, w, g = to_device(make_inputs((8, 2, 40), seed=10), device)
    strided = x.transpose(0, 1)   # [2, 8, 40], rows not in memory order
    got = ours(strided, w, g.transpose(0, 1))
    want = ours(strided.contiguous(), w, g.transpose(0, 1).contiguous())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("device", devices(OP))
def test_zero_rows(device):
    x = torch.empty(2, 0, 16, device=device, requires_grad=True)
    w = torch.ones(16, device=device, requires_grad=True)
    y = rms_norm(x, w)
    assert y.shape == (2, 0, 16)
    y.sum().backward()
    assert x.grad.shape == x.shape and bool((w.grad == 0).all())


@pytest.mark.parametrize("device", devices(OP))
def test_opcheck(device):
    x, w, g = to_device(make_inputs((3, 4, 24), seed=11), device)
    bf16 = to_device(make_inputs((5, 40), dtype=torch.bfloat16, seed=12), device)
    for args in ((x, w, 1e-6), (x[:, 1:], w, 0.1), (bf16[0], bf16[1], 1e-5)):
        torch.library.opcheck(torch.ops.lambdapo.rms_norm_forward.default,
                              (args[0].clone().requires_grad_(True),
                               args[1].clone().requires_grad_(True), args[2]))
    _, rstd = torch.ops.lambdapo.rms_norm_forward(x, w, 1e-6)
    for mask in ([True, True], [True, False], [False, True]):
        torch.library.opcheck(torch.ops.lambdapo.rms_norm_backward.default,
                              (g, x, w, rstd, mask))


@pytest.mark.parametrize("device", devices(OP))
def test_torch_compile_fullgraph_forward_and_backward(device):
    x, w, g = to_device(make_inputs((4, 6, 32), seed=13), device)

    @torch.compile(fullgraph=True)
    def loss_fn(a, b):
        return (rms_norm(a, b) * g).sum()

    a, b = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss_fn(a, b).backward()
    _, gx, gw = ours(x, w, g)
    torch.testing.assert_close(a.grad, gx, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.grad, gw, rtol=1e-5, atol=1e-5)
