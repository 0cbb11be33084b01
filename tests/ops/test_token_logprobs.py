import pytest
import torch

from lambdapo_ext import reference, token_logprobs
from tests.conftest import devices, skip_without_cuda, to_device

LOW_PRECISION = [torch.bfloat16, torch.float16]


def make_logits(shape, vocab, *, dtype=torch.float32, seed=0, scale=3.0, ignore_frac=0.1):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=gen, dtype=torch.float64) * scale).to(dtype)
    targets = torch.randint(0, vocab, shape, generator=gen)
    targets[torch.rand(shape, generator=gen) < ignore_frac] = -100
    return logits, targets


def ours_and_grads(logits, targets, g_lp, g_h, **kwargs):
    x = logits.detach().clone().requires_grad_(True)
    lp, h = token_logprobs(x, targets, return_entropy=True, **kwargs)
    (lp * g_lp + h * g_h).sum().backward()
    return lp, h, x.grad


def reference_and_grads(logits, targets, g_lp, g_h, *, dtype=torch.float64, **kwargs):
    """The reference computed in `dtype` (float64 for the truth, the logits' own dtype for
    the error plain torch makes at that precision)."""
    x = logits.detach().to(dtype).requires_grad_(True)
    log_p = torch.log_softmax(x / kwargs.get("temperature", 1.0), dim=-1)
    ignored = targets == -100
    lp = log_p.gather(-1, torch.where(ignored, 0, targets).unsqueeze(-1)).squeeze(-1)
    lp = torch.where(ignored, 0, lp)
    h = torch.where(ignored, 0, -(log_p.exp() * log_p).sum(-1))
    (lp * g_lp.to(dtype) + h * g_h.to(dtype)).sum().backward()
    return lp.double(), h.double(), x.grad.double()


def upstream(shape, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
@pytest.mark.parametrize("shape,vocab", [((5,), 11), ((2, 3), 1000), ((3, 17), 5003)])
@pytest.mark.parametrize("device", devices("token_logprobs_forward"))
def test_float32_matches_float64_reference(temperature, shape, vocab, device):
    logits, targets = make_logits(shape, vocab, seed=vocab)
    g_lp, g_h = upstream(shape)
    lp, h, grad = to_device(ours_and_grads(*to_device((logits, targets, g_lp, g_h), device),
                                           temperature=temperature), "cpu")
    rlp, rh, rgrad = reference_and_grads(logits, targets, g_lp, g_h, temperature=temperature)
    assert lp.dtype == h.dtype == torch.float32 and lp.shape == shape
    torch.testing.assert_close(lp.double(), rlp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.double(), rh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), rgrad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("device", devices("token_logprobs_forward"))
def test_low_precision_error_is_below_same_dtype_torch(dtype, device):
    shape, vocab = (4, 33), 4099
    logits, targets = make_logits(shape, vocab, dtype=dtype, seed=3)
    g_lp, g_h = upstream(shape)
    lp, h, grad = to_device(ours_and_grads(*to_device((logits, targets, g_lp, g_h), device),
                                           temperature=0.8), "cpu")
    rlp, rh, rgrad = reference_and_grads(logits, targets, g_lp, g_h, temperature=0.8)
    tlp, th, tgrad = reference_and_grads(logits, targets, g_lp, g_h, dtype=dtype,
                                         temperature=0.8)
    assert lp.dtype == torch.float32 and grad.dtype == dtype
    # Outputs accumulate in fp32: far below torch's error at the logits' precision.
    assert (lp.double() - rlp).abs().max() <= 1e-5
    assert (h.double() - rh).abs().max() <= 1e-5
    assert (lp.double() - rlp).abs().max() < 0.1 * (tlp - rlp).abs().max()
    # Gradients are rounded once to the logits' dtype: at most torch's own error.
    our_err = (grad.double() - rgrad).abs().max()
    torch_err = (tgrad - rgrad).abs().max()
    assert our_err <= torch_err
    assert our_err <= rgrad.abs().max() * 2.0 ** -7


def test_ignore_index_rows_give_zero_and_get_zero_gradient():
    logits, targets = make_logits((6,), 50, seed=4, ignore_frac=0.0)
    targets[[1, 4]] = -7
    g_lp, g_h = upstream((6,))
    lp, h, grad = ours_and_grads(logits, targets, g_lp, g_h, ignore_index=-7)
    assert (lp[[1, 4]] == 0).all() and (h[[1, 4]] == 0).all()
    assert (grad[[1, 4]] == 0).all()
    assert (grad[[0, 2, 3, 5]] != 0).any(dim=-1).all()


def test_logprobs_only_and_gradient_of_one_output():
    logits, targets = make_logits((3, 4), 300, seed=5)
    lp = token_logprobs(logits, targets)
    assert isinstance(lp, torch.Tensor) and lp.shape == (3, 4)
    assert (lp <= 0).all()
    # Gradient through the entropy alone.
    x = logits.clone().requires_grad_(True)
    _, h = token_logprobs(x, targets, return_entropy=True)
    h.sum().backward()
    xr = logits.double().requires_grad_(True)
    _, rh = reference.token_logprobs(xr, targets, return_entropy=True)
    rh.sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-6)


def test_strided_rows_need_no_copy_and_match():
    logits, targets = make_logits((2, 9), 777, seed=6)
    sliced = logits[:, :-1]          # rows strided in dim 1, a typical shift-by-one view
    assert not sliced.is_contiguous()
    g_lp, g_h = upstream((2, 8))
    lp, h, grad = ours_and_grads(sliced, targets[:, 1:], g_lp, g_h)
    clp, ch, cgrad = ours_and_grads(sliced.contiguous(), targets[:, 1:], g_lp, g_h)
    assert torch.equal(lp, clp) and torch.equal(h, ch) and torch.equal(grad, cgrad)


def test_masked_vocabulary_entries_at_minus_inf():
    logits, targets = make_logits((4,), 64, seed=7, ignore_frac=0.0)
    logits[:, 32:] = float("-inf")
    targets = targets % 32
    g_lp, g_h = upstream((4,))
    lp, h, grad = ours_and_grads(logits, targets, g_lp, g_h)
    rlp, rh, rgrad = reference_and_grads(logits[:, :32], targets, g_lp, g_h)
    torch.testing.assert_close(lp.double(), rlp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.double(), rh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad[:, :32].double(), rgrad, rtol=1e-5, atol=1e-6)
    assert (grad[:, 32:] == 0).all()


# A NaN where the CUDA forward folds it first (a thread's first value: column 0, column N*t of
# a vectorized row with N values a vector, any of the first 256 columns of an odd vocabulary,
# where each thread folds one value at a time), and elsewhere.
NAN_PLACEMENTS = [(torch.float32, 4496, 0), (torch.float32, 4496, 4 * 37),
                  (torch.float32, 4496, 4 * 255), (torch.bfloat16, 8800, 8 * 31),
                  (torch.float32, 1001, 0), (torch.float32, 1001, 200),
                  (torch.bfloat16, 999, 255), (torch.float32, 1001, 700), (torch.float32, 20, 5)]


@pytest.mark.parametrize("device", devices("token_logprobs_forward"))
@pytest.mark.parametrize("dtype,vocab,column", NAN_PLACEMENTS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("entropy_grad", [False, True], ids=["logprob-grad", "entropy-grad"])
def test_nan_logits_propagate(device, dtype, vocab, column, value, entropy_grad):
    """A NaN (or +inf) logit makes its row's log-prob, entropy and whole gradient NaN, with or
    without an entropy gradient; the other rows are those of a batch without it."""
    logits, targets = make_logits((3,), vocab, dtype=dtype, seed=8, ignore_frac=0.0)
    g_lp, g_h = upstream((3,))
    results = []
    for poisoned in (True, False):
        x = logits.clone().to(device).requires_grad_(True)
        if poisoned:
            with torch.no_grad():
                x[1, column] = value
        lp, h = token_logprobs(x, targets.to(device), return_entropy=True)
        loss = (lp * g_lp.to(device)).sum() + ((h * g_h.to(device)).sum() if entropy_grad else 0)
        loss.backward()
        results.append([t.detach().cpu() for t in (lp, h, x.grad)])
    (lp, h, grad), (clean_lp, clean_h, clean_grad) = results
    assert lp[1].isnan() and h[1].isnan() and grad[1].isnan().all()
    for row in (0, 2):
        assert torch.equal(lp[row], clean_lp[row]) and torch.equal(h[row], clean_h[row])
        assert torch.equal(grad[row], clean_grad[row])


def test_gradcheck_float64():
    logits, targets = make_logits((3, 2), 23, dtype=torch.float64, seed=9, scale=1.0)
    targets[0, 1] = -100
    x = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda z: token_logprobs(z, targets, temperature=1.3, return_entropy=True), (x,))
    assert torch.autograd.gradcheck(lambda z: token_logprobs(z, targets), (x,))


def test_inplace_backward_gives_the_same_gradients():
    logits, targets = make_logits((5, 7), 1200, dtype=torch.bfloat16, seed=10)
    g_lp, g_h = upstream((5, 7))
    _, _, expected = ours_and_grads(logits, targets, g_lp, g_h, temperature=1.1)

    hidden = logits.float().clone().requires_grad_(True)
    x = hidden.to(torch.bfloat16)   # a non-leaf logits tensor, as an lm-head output is
    lp, h = token_logprobs(x, targets, temperature=1.1, return_entropy=True,
                           inplace_backward=True)
    (lp * g_lp + h * g_h).sum().backward()
    assert torch.equal(hidden.grad, expected.float())
    assert torch.equal(x.detach(), expected)    # the logits were overwritten


def test_batch_invariance_and_determinism():
    logits, targets = make_logits((1000,), 1000, seed=11)
    lp, h = token_logprobs(logits, targets, return_entropy=True)
    lp2, h2 = token_logprobs(logits, targets, return_entropy=True)
    assert torch.equal(lp, lp2) and torch.equal(h, h2)
    for row in (0, 499, 999):
        alone_lp, alone_h = token_logprobs(logits[row:row + 1], targets[row:row + 1],
                                           return_entropy=True)
        assert torch.equal(alone_lp[0], lp[row]) and torch.equal(alone_h[0], h[row])


def test_int32_targets_and_empty_batch():
    logits, targets = make_logits((4,), 30, seed=12)
    assert torch.equal(token_logprobs(logits, targets.int()), token_logprobs(logits, targets))
    empty = token_logprobs(torch.empty(0, 30), torch.empty(0, dtype=torch.long))
    assert empty.shape == (0,)


def _opcheck_samples():
    logits, targets = make_logits((3, 4), 37, seed=13)
    bf16, _ = make_logits((3, 4), 37, dtype=torch.bfloat16, seed=13)
    return [
        (logits, targets, 1.0, -100, True, False),
        (logits[:, 1:], targets[:, 1:], 0.5, -100, False, False),
        (bf16, targets, 2.0, -100, True, False),
    ]


@pytest.mark.parametrize("device", devices("token_logprobs_forward"))
@pytest.mark.parametrize("args", _opcheck_samples())
def test_opcheck_forward(args, device):
    args = to_device(args, device)
    logits = args[0].clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.lambdapo.token_logprobs_forward.default, (logits, *args[1:]))


@pytest.mark.parametrize("device", devices("token_logprobs_backward"))
def test_opcheck_backward_ops(device):
    logits, targets = to_device(make_logits((3, 4), 37, seed=14), device)
    lp, h, lse = torch.ops.lambdapo.token_logprobs_forward(logits, targets, 1.0, -100, True, False)
    g_lp, g_h = to_device(upstream((3, 4)), device)
    args = (g_lp, g_h, logits, targets, lse, h, 1.0, -100)
    torch.library.opcheck(torch.ops.lambdapo.token_logprobs_backward.default, args)
    torch.library.opcheck(torch.ops.lambdapo.token_logprobs_backward_inplace.default,
                          (g_lp, g_h, logits.clone(), targets, lse, h, 1.0, -100))


@pytest.mark.parametrize("device", devices("token_logprobs_forward"))
def test_torch_compile_fullgraph_forward_and_backward(device):
    logits, targets = to_device(make_logits((4, 6), 300, seed=15), device)
    g_lp, g_h = to_device(upstream((4, 6)), device)

    @torch.compile(fullgraph=True)
    def loss_fn(x):
        lp, h = token_logprobs(x, targets, temperature=0.9, return_entropy=True)
        return (lp * g_lp + h * g_h).sum()

    x = logits.clone().requires_grad_(True)
    loss_fn(x).backward()
    _, _, expected = ours_and_grads(logits, targets, g_lp, g_h, temperature=0.9)
    torch.testing.assert_close(x.grad, expected)


BAD_INPUTS = [
    (lambda: (torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, dtype=torch.long)), {},
     RuntimeError, "logits must be float32"),
    (lambda: (torch.zeros(2, 5), torch.zeros(2)), {}, RuntimeError, "targets must be int64"),
    (lambda: (torch.zeros(2, 5), torch.zeros(3, dtype=torch.long)), {}, RuntimeError,
     "targets must have the leading shape"),
    (lambda: (torch.zeros(2, 5), torch.tensor([0, 5])), {}, ValueError, "targets must lie in"),
    (lambda: (torch.zeros(2, 5), torch.tensor([-1, 0])), {}, ValueError, "targets must lie in"),
    (lambda: (torch.zeros(2, 5), torch.tensor([0, 1])), {"temperature": 0.0}, ValueError,
     "temperature"),
    (lambda: (torch.zeros(5, 2).t(), torch.tensor([0, 1])), {}, RuntimeError,
     "contiguous in its last dimension"),
    (lambda: (torch.zeros(2, 0), torch.tensor([0, 1])), {}, RuntimeError,
     "non-empty last"),
    (lambda: (torch.zeros(1, 5).expand(3, 5).requires_grad_(False), torch.tensor([0, 1, 2])),
     {"inplace_backward": True, "_backward": True}, RuntimeError, "rows do not overlap"),
]


@pytest.mark.parametrize("make,kwargs,exc,message", BAD_INPUTS)
def test_bad_inputs_raise_naming_the_argument(make, kwargs, exc, message):
    logits, targets = make()
    kwargs = dict(kwargs)
    if kwargs.pop("_backward", False):
        x = logits.clone().requires_grad_(True)
        expanded = x[:1].expand(3, 5)
        lp = token_logprobs(expanded, targets, **kwargs)
        with pytest.raises(exc, match=message):
            lp.sum().backward()
        return
    with pytest.raises(exc, match=message):
        token_logprobs(logits, targets, **kwargs)


@skip_without_cuda("token_logprobs_forward")
def test_device_mismatch_names_the_argument():
    with pytest.raises(RuntimeError, match="targets is on"):
        token_logprobs(torch.zeros(2, 5, device="cuda"), torch.tensor([0, 1]))


@skip_without_cuda("token_logprobs_forward")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [7, 4096, 50257, 151936])
@pytest.mark.parametrize("inplace", [False, True])
def test_cuda_matches_cpu(dtype, vocab, inplace):
    shape = (3, 5)
    logits, targets = make_logits(shape, vocab, dtype=dtype, seed=vocab)
    g_lp, g_h = upstream(shape)
    lp, h, grad = ours_and_grads(logits, targets, g_lp, g_h, temperature=0.9)
    clp, ch, cgrad = ours_and_grads(logits.cuda(), targets.cuda(), g_lp.cuda(), g_h.cuda(),
                                    temperature=0.9, inplace_backward=inplace)
    torch.testing.assert_close(clp.cpu(), lp, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ch.cpu(), h, rtol=1e-5, atol=2e-5)
    # fp32: the two devices sum V terms in different orders; exp() turns the ~log2(V) ulp
    # difference in the log-normalizer into a relative difference of up to ~2e-5 in p.
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(cgrad.cpu().float(), grad.float(), rtol=tol, atol=1e-6)


@skip_without_cuda("token_logprobs_forward")
def test_cuda_beyond_int32_elements():
    rows, vocab = 16384, 151936     # 2.49e9 elements > 2^31
    if torch.cuda.mem_get_info()[0] < 3 * rows * vocab * 2:
        pytest.skip("needs about 15 GB of free GPU memory")
    logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, vocab, (rows,), device="cuda")
    x = logits.requires_grad_(True)
    lp = token_logprobs(x, targets)
    lp.sum().backward()
    for row in (0, rows - 1):   # the last rows lie past 2^31 elements
        expected = torch.log_softmax(logits[row].float(), -1)[targets[row]]
        torch.testing.assert_close(lp[row], expected, rtol=1e-5, atol=1e-5)
        p = torch.softmax(logits[row].float(), -1)
        p[targets[row]] -= 1
        torch.testing.assert_close(x.grad[row].float(), -p, rtol=1e-2, atol=1e-5)
