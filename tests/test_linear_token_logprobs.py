import pytest
import torch

from lambdapo_ext import linear_token_logprobs, reference
from lambdapo_ext.ops import default_chunk_size
from tests.conftest import devices, skip_without_cuda, to_device


def make_inputs(shape, hidden_size, vocab, *, dtype=torch.float32, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, hidden_size, generator=gen, dtype=torch.float64).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64)
              / hidden_size ** 0.5).to(dtype)
    b = torch.randn(vocab, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    targets = torch.randint(0, vocab, shape, generator=gen)
    targets[torch.rand(shape, generator=gen) < 0.1] = -100
    g_lp = torch.randn(shape, generator=gen)
    g_h = torch.randn(shape, generator=gen)
    return hidden, weight, b, targets, g_lp, g_h


def run(fn, hidden, weight, bias, targets, g_lp, g_h, **kwargs):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None
              for t in (hidden, weight, bias)]
    lp, h = fn(leaves[0], leaves[1], targets, bias=leaves[2], return_entropy=True, **kwargs)
    (lp * g_lp.to(lp.dtype) + h * g_h.to(h.dtype)).sum().backward()
    grads = [t.grad if t is not None else None for t in leaves]
    return lp, h, grads


@pytest.mark.parametrize("chunk_size", [1, 7, 64, None])
@pytest.mark.parametrize("with_bias", [True, False])
def test_float32_matches_float64_reference(chunk_size, with_bias):
    inputs = make_inputs((3, 11), 48, 1000, seed=chunk_size or 0, bias=with_bias)
    lp, h, grads = run(linear_token_logprobs, *inputs, temperature=0.8, chunk_size=chunk_size)
    as64 = [t.double() if t is not None else None for t in inputs[:3]]
    rlp, rh, rgrads = run(reference.linear_token_logprobs, *as64, *inputs[3:], temperature=0.8)
    assert lp.dtype == torch.float32 and lp.shape == (3, 11)
    torch.testing.assert_close(lp.double(), rlp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.double(), rh, rtol=1e-5, atol=1e-5)
    for g, rg in zip(grads, rgrads):
        if rg is None:
            assert g is None
        else:
            assert g.dtype == torch.float32
            torch.testing.assert_close(g.double(), rg, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_is_at_most_same_dtype_torch(dtype):
    inputs = make_inputs((4, 16), 64, 2000, dtype=dtype, seed=3)
    lp, h, grads = run(linear_token_logprobs, *inputs, chunk_size=9)
    torch_lp, torch_h, torch_grads = run(reference.linear_token_logprobs, *inputs)
    as64 = [t.double() for t in inputs[:3]]
    rlp, rh, rgrads = run(reference.linear_token_logprobs, *as64, *inputs[3:])
    # Our logits go through the same-dtype matmul as plain torch's: no worse than torch.
    assert (lp.double() - rlp).abs().max() <= 1.5 * (torch_lp.double() - rlp).abs().max() + 1e-5
    assert (h.double() - rh).abs().max() <= 1.5 * (torch_h.double() - rh).abs().max() + 1e-5
    for g, tg, rg in zip(grads, torch_grads, rgrads):
        assert g.dtype == dtype
        assert (g.double() - rg).abs().max() <= 1.5 * (tg.double() - rg).abs().max() + 1e-6


def test_gradcheck_float64():
    hidden, weight, bias, targets, _, _ = make_inputs((2, 5), 8, 30, dtype=torch.float64, seed=4)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    assert torch.autograd.gradcheck(
        lambda hd, w, b: linear_token_logprobs(hd, w, targets, bias=b, temperature=1.2,
                                               return_entropy=True, chunk_size=3), leaves)


def test_gradient_of_logprobs_only_and_no_bias():
    hidden, weight, _, targets, g_lp, _ = make_inputs((6,), 16, 100, seed=5, bias=False)
    x = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    (linear_token_logprobs(x, w, targets, chunk_size=4) * g_lp).sum().backward()
    xr = hidden.double().requires_grad_(True)
    wr = weight.double().requires_grad_(True)
    (reference.linear_token_logprobs(xr, wr, targets) * g_lp).sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), wr.grad, rtol=1e-5, atol=1e-6)


def test_batch_invariance():
    hidden, weight, bias, targets, _, _ = make_inputs((64,), 32, 500, seed=6)
    batch = linear_token_logprobs(hidden, weight, targets, bias=bias, chunk_size=64)
    for row in (0, 63):
        alone = linear_token_logprobs(hidden[row:row + 1], weight, targets[row:row + 1],
                                      bias=bias, chunk_size=64)
        torch.testing.assert_close(alone[0], batch[row], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", devices("token_logprobs_forward"))
def test_opcheck(device):
    hidden, weight, bias, targets, g_lp, g_h = to_device(make_inputs((3, 4), 16, 50, seed=7),
                                                         device)
    args = (hidden.requires_grad_(True), weight.requires_grad_(True), bias, targets, 1.0, -100,
            True, 5)
    torch.library.opcheck(torch.ops.lambdapo.linear_token_logprobs_forward.default, args)
    lp, h, lse = torch.ops.lambdapo.linear_token_logprobs_forward(*args)
    torch.library.opcheck(
        torch.ops.lambdapo.linear_token_logprobs_backward.default,
        (g_lp, g_h, hidden.detach(), weight.detach(), bias, targets, lse.detach(), h.detach(),
         1.0, -100, 5))


def test_torch_compile_fullgraph():
    hidden, weight, bias, targets, g_lp, _ = make_inputs((2, 8), 16, 200, seed=8)

    @torch.compile(fullgraph=True)
    def loss_fn(x, w):
        return (linear_token_logprobs(x, w, targets, bias=bias, chunk_size=5) * g_lp).sum()

    x, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss_fn(x, w).backward()
    xe, we = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    (linear_token_logprobs(xe, we, targets, bias=bias, chunk_size=5) * g_lp).sum().backward()
    torch.testing.assert_close(x.grad, xe.grad)
    torch.testing.assert_close(w.grad, we.grad)


def test_default_chunk_size_bounds_logits_memory():
    cpu = torch.device("cpu")
    assert default_chunk_size(10, 1000, torch.float32, cpu) == 10
    rows = default_chunk_size(100_000, 151_936, torch.bfloat16, cpu)
    assert 1 <= rows and rows * 151_936 * 2 <= 64 * 2**20
    assert default_chunk_size(0, 10, torch.float32, cpu) == 1


BAD_INPUTS = [
    (dict(weight=torch.zeros(10, 7)), RuntimeError, "weight must be \\[V, H\\]"),
    (dict(weight=torch.zeros(10, 8, dtype=torch.float64)), RuntimeError, "weight has dtype"),
    (dict(bias=torch.zeros(9)), RuntimeError, "bias must be \\[V\\]"),
    (dict(targets=torch.zeros(4, dtype=torch.long)), RuntimeError,
     "targets must have the leading shape"),
    (dict(targets=torch.full((3,), 10)), ValueError, "targets must lie in"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(hidden=torch.zeros(3, 8, dtype=torch.long)), RuntimeError,
     "hidden must be a floating-point"),
    (dict(temperature=-1.0), ValueError, "temperature"),
]


@pytest.mark.parametrize("override,exc,message", BAD_INPUTS)
def test_bad_inputs_raise_naming_the_argument(override, exc, message):
    args = dict(hidden=torch.zeros(3, 8), weight=torch.zeros(10, 8), targets=torch.zeros(3, dtype=torch.long))
    args.update(override)
    kwargs = {k: args.pop(k) for k in list(args) if k not in ("hidden", "weight", "targets")}
    with pytest.raises(exc, match=message):
        linear_token_logprobs(args["hidden"], args["weight"], args["targets"], **kwargs)


@skip_without_cuda("token_logprobs_forward")  # the composite op runs on these kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    inputs = make_inputs((4, 33), 128, 5000, dtype=dtype, seed=9)
    lp, h, grads = run(linear_token_logprobs, *inputs, chunk_size=50)
    cuda_inputs = [t.cuda() if t is not None else None for t in inputs]
    clp, ch, cgrads = run(linear_token_logprobs, *cuda_inputs, chunk_size=50)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(clp.cpu(), lp, **tol)
    torch.testing.assert_close(ch.cpu(), h, **tol)
    for g, cg in zip(grads, cgrads):
        torch.testing.assert_close(cg.cpu().float(), g.float(), **tol)
