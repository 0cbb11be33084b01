import pytest
import torch

from lambdapo_ext import linear_token_logprobs, reference
from lambdapo_ext.logprobs import default_chunk_size
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


# (rows, vocabulary entries) per tile: whole rows, tiles in both directions, one tile.
TILES = [(1, None), (7, 128), (64, 300), (5, 1000), (None, None)]


@pytest.mark.parametrize("chunk_size,vocab_chunk_size", TILES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_float32_matches_float64_reference(chunk_size, vocab_chunk_size, with_bias):
    inputs = make_inputs((3, 11), 48, 1000, seed=chunk_size or 0, bias=with_bias)
    lp, h, grads = run(linear_token_logprobs, *inputs, temperature=0.8, chunk_size=chunk_size,
                       vocab_chunk_size=vocab_chunk_size)
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


GRAD_SETS = [(h, w, b) for h in (True, False) for w in (True, False) for b in (True, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("needs", GRAD_SETS, ids=lambda n: "".join("hwb"[i] if n[i] else "-"
                                                                     for i in range(3)))
def test_only_requested_gradients_match_float64(needs, dtype):
    """Every combination of which of hidden / weight / bias require grad: values and the
    requested gradients match float64; the others stay None."""
    hidden, weight, bias, targets, g_lp, g_h = make_inputs((2, 9), 40, 700, seed=11,
                                                           dtype=dtype)
    leaves = [t.detach().clone().requires_grad_(need) for t, need in zip((hidden, weight, bias),
                                                                        needs)]
    lp, h = linear_token_logprobs(leaves[0], leaves[1], targets, bias=leaves[2],
                                  temperature=1.3, return_entropy=True, chunk_size=7,
                                  vocab_chunk_size=256)
    ref = [t.double().requires_grad_(need) for t, need in zip((hidden, weight, bias), needs)]
    rlp, rh = reference.linear_token_logprobs(ref[0], ref[1], targets, bias=ref[2],
                                              temperature=1.3, return_entropy=True)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(lp.double(), rlp.detach(), **tol)
    torch.testing.assert_close(h.double(), rh.detach(), **tol)
    assert lp.requires_grad == any(needs)
    if not any(needs):
        return
    (lp * g_lp + h * g_h).sum().backward()
    (rlp * g_lp.double() + rh * g_h.double()).sum().backward()
    gtol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    for leaf, r, need in zip(leaves, ref, needs):
        if need:
            assert leaf.grad is not None and leaf.grad.dtype == dtype
            torch.testing.assert_close(leaf.grad.double(), r.grad, **gtol)
        else:
            assert leaf.grad is None


def test_backward_computes_only_the_masked_gradients():
    """The backward op returns empty tensors (no matmul, no buffer) for gradients left out
    of output_mask, and the same values as a full backward for the rest."""
    hidden, weight, bias, targets, g_lp, g_h = make_inputs((13,), 24, 500, seed=12)
    lp, h, lse = torch.ops.lambdapo.linear_token_logprobs_forward(
        hidden, weight, bias, targets, 1.0, -100, True, 4, 128)
    full = torch.ops.lambdapo.linear_token_logprobs_backward(
        g_lp, g_h, hidden, weight, bias, targets, lse, h, 1.0, -100, 4, 128, [True] * 3)
    for mask in ([True, False, False], [False, True, False], [False, False, True]):
        part = torch.ops.lambdapo.linear_token_logprobs_backward(
            g_lp, g_h, hidden, weight, bias, targets, lse, h, 1.0, -100, 4, 128, mask)
        for wanted, got, ref in zip(mask, part, full):
            if wanted:
                torch.testing.assert_close(got, ref)
            else:
                assert got.numel() == 0


@pytest.mark.parametrize("device", devices("linear_token_logprobs_backward"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("vocab_chunk", [128, 500])
def test_unrounded_grad_hidden_is_the_hidden_gradient_before_its_rounding(device, dtype,
                                                                          vocab_chunk):
    """unrounded_grad_hidden=True (the vocabulary-parallel path's: it sums the ranks' shares
    before rounding) gives grad_hidden in float32, within one rounding of the default output
    (the two may take different matmul kernels); the other gradients are unchanged. One
    vocabulary block or several."""
    inputs = to_device(make_inputs((13,), 24, 500, dtype=dtype, seed=13), device)
    hidden, weight, bias, targets, g_lp, g_h = inputs
    lp, h, lse = torch.ops.lambdapo.linear_token_logprobs_forward(
        hidden, weight, bias, targets, 1.0, -100, True, 4, vocab_chunk)
    args = (g_lp, g_h, hidden, weight, bias, targets, lse, h, 1.0, -100, 4, vocab_chunk,
            [True] * 3, True)
    rounded = torch.ops.lambdapo.linear_token_logprobs_backward(*args)
    unrounded = torch.ops.lambdapo.linear_token_logprobs_backward(*args, True)
    assert unrounded[0].dtype == torch.float32 and unrounded[0].shape == hidden.shape
    if dtype == torch.float32:
        assert torch.equal(unrounded[0], rounded[0])
    else:
        torch.testing.assert_close(unrounded[0], rounded[0].float(), rtol=2.0**-8, atol=1e-6)
    assert torch.equal(unrounded[1], rounded[1]) and torch.equal(unrounded[2], rounded[2])
    torch.library.opcheck(torch.ops.lambdapo.linear_token_logprobs_backward.default,
                          (*args, True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_is_at_most_same_dtype_torch(dtype):
    inputs = make_inputs((4, 16), 64, 2000, dtype=dtype, seed=3)
    lp, h, grads = run(linear_token_logprobs, *inputs, chunk_size=9, vocab_chunk_size=384)
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
                                               return_entropy=True, chunk_size=3,
                                               vocab_chunk_size=8), leaves)


def test_gradient_of_logprobs_only_and_no_bias():
    hidden, weight, _, targets, g_lp, _ = make_inputs((6,), 16, 100, seed=5, bias=False)
    x = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    (linear_token_logprobs(x, w, targets, chunk_size=4, vocab_chunk_size=32)
     * g_lp).sum().backward()
    xr = hidden.double().requires_grad_(True)
    wr = weight.double().requires_grad_(True)
    (reference.linear_token_logprobs(xr, wr, targets) * g_lp).sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), wr.grad, rtol=1e-5, atol=1e-6)


# (V, vocab_chunk_size, column): a NaN or inf logit at the first value a CUDA thread folds
# (column 0, N*t of a vectorized tile, the first 256 columns of an odd tile), at tile edges,
# and at the last column.
NAN_COLUMNS = [(1000, 1000, 0), (1000, 1000, 4 * 37), (1000, 1000, 8 * 31), (1001, 300, 0),
               (1001, 300, 255), (1001, 300, 300), (1001, 300, 599), (1001, 300, 1000)]


@pytest.mark.parametrize("device", devices("linear_token_logprobs_forward"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab,vocab_chunk,column", NAN_COLUMNS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("entropy_grad", [False, True], ids=["logprob-grad", "entropy-grad"])
def test_nan_logits_propagate(device, dtype, vocab, vocab_chunk, column, value, entropy_grad):
    """A NaN logit column (a NaN in the lm-head's bias, as a NaN weight row or an fp16
    overflow gives) makes every kept row's log-prob and entropy NaN and every gradient NaN;
    an ignored row keeps 0 and a zero hidden gradient."""
    hidden, weight, bias, targets, g_lp, g_h = make_inputs((4,), 16, vocab, dtype=dtype,
                                                           seed=12)
    targets[2] = -100
    bias[column] = value
    leaves = [t.to(device).requires_grad_(True) for t in (hidden, weight, bias)]
    lp, h = linear_token_logprobs(leaves[0], leaves[1], targets.to(device), bias=leaves[2],
                                  return_entropy=True, chunk_size=3,
                                  vocab_chunk_size=vocab_chunk)
    loss = (lp * g_lp.to(device)).sum() + ((h * g_h.to(device)).sum() if entropy_grad else 0)
    loss.backward()
    lp, h, (g_hidden, g_weight, g_bias) = lp.cpu(), h.cpu(), [t.grad.cpu() for t in leaves]
    kept = targets != -100
    assert lp[kept].isnan().all() and h[kept].isnan().all()
    assert (lp[~kept] == 0).all() and (h[~kept] == 0).all()
    assert g_hidden[kept].isnan().all() and (g_hidden[~kept] == 0).all()
    assert g_weight.isnan().all() and g_bias.isnan().all()


def test_batch_invariance():
    hidden, weight, bias, targets, _, _ = make_inputs((64,), 32, 500, seed=6)
    batch = linear_token_logprobs(hidden, weight, targets, bias=bias, chunk_size=64,
                                  vocab_chunk_size=128)
    for row in (0, 63):
        alone = linear_token_logprobs(hidden[row:row + 1], weight, targets[row:row + 1],
                                      bias=bias, chunk_size=64, vocab_chunk_size=128)
        torch.testing.assert_close(alone[0], batch[row], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", devices("linear_token_logprobs_forward"))
def test_opcheck(device):
    hidden, weight, bias, targets, g_lp, g_h = to_device(make_inputs((3, 4), 16, 50, seed=7),
                                                         device)
    args = (hidden.requires_grad_(True), weight.requires_grad_(True), bias, targets, 1.0, -100,
            True, 5, 16)
    torch.library.opcheck(torch.ops.lambdapo.linear_token_logprobs_forward.default, args)
    frozen = (hidden, weight.detach(), None, targets, 0.7, -100, False, 2, 50)
    torch.library.opcheck(torch.ops.lambdapo.linear_token_logprobs_forward.default, frozen)
    lp, h, lse = torch.ops.lambdapo.linear_token_logprobs_forward(*args)
    for mask in ([True, True, True], [True, False, False], [False, True, True]):
        torch.library.opcheck(
            torch.ops.lambdapo.linear_token_logprobs_backward.default,
            (g_lp, g_h, hidden.detach(), weight.detach(), bias, targets, lse.detach(),
             h.detach(), 1.0, -100, 5, 16, mask))


@pytest.mark.parametrize("train_weight", [True, False])
def test_torch_compile_fullgraph(train_weight):
    hidden, weight, bias, targets, g_lp, _ = make_inputs((2, 8), 16, 200, seed=8)

    @torch.compile(fullgraph=True)
    def loss_fn(x, w):
        return (linear_token_logprobs(x, w, targets, bias=bias, chunk_size=5,
                                      vocab_chunk_size=64) * g_lp).sum()

    x, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(train_weight)
    loss_fn(x, w).backward()
    xe, we = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(train_weight)
    (linear_token_logprobs(xe, we, targets, bias=bias, chunk_size=5, vocab_chunk_size=64)
     * g_lp).sum().backward()
    torch.testing.assert_close(x.grad, xe.grad)
    if train_weight:
        torch.testing.assert_close(w.grad, we.grad)
    else:
        assert w.grad is None


def test_default_chunk_size_bounds_logits_memory():
    cpu = torch.device("cpu")
    assert default_chunk_size(10, 1000, torch.float32, cpu) == (10, 1000)
    # The project machine's case: one tile over all rows, 64 MiB of fp32 logits.
    assert default_chunk_size(4096, 32000, torch.float32, cpu) == (4096, 4096)
    for rows in (1, 100_000, 10**8):
        chunk, vocab_chunk = default_chunk_size(rows, 151_936, torch.bfloat16, cpu)
        assert 1 <= chunk <= rows and 1 <= vocab_chunk <= 151_936
        assert chunk * vocab_chunk * 2 <= 64 * 2**20
    assert default_chunk_size(0, 10, torch.float32, cpu) == (1, 10)


def test_empty_vocabulary_raises_naming_weight():
    with pytest.raises(ValueError, match="weight must have at least one row"):
        default_chunk_size(4, 0, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="weight must have at least one row"):
        linear_token_logprobs(torch.zeros(3, 8), torch.zeros(0, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="weight must have at least one row"):
        torch.ops.lambdapo.linear_token_logprobs_forward(
            torch.zeros(3, 8), torch.zeros(0, 8), None, torch.zeros(3, dtype=torch.long), 1.0,
            -100, False, 4, 4)


BAD_INPUTS = [
    (dict(weight=torch.zeros(10, 7)), RuntimeError, "weight must be \\[V, H\\]"),
    (dict(weight=torch.zeros(10, 8, dtype=torch.float64)), RuntimeError, "weight has dtype"),
    (dict(bias=torch.zeros(9)), RuntimeError, "bias must be \\[V\\]"),
    (dict(targets=torch.zeros(4, dtype=torch.long)), RuntimeError,
     "targets must have the leading shape"),
    (dict(targets=torch.full((3,), 10)), ValueError, "targets must lie in"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(vocab_chunk_size=-1), ValueError, "vocab_chunk_size"),
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


@skip_without_cuda("linear_token_logprobs_forward")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, True)])
def test_cuda_matches_cpu(dtype, needs):
    inputs = make_inputs((4, 33), 128, 5000, dtype=dtype, seed=9)
    hidden, weight, bias, targets, g_lp, g_h = inputs

    def grads_on(device):
        leaves = [t.to(device, copy=True).requires_grad_(need)
                  for t, need in zip((hidden, weight, bias), needs)]
        lp, h = linear_token_logprobs(leaves[0], leaves[1], targets.to(device), bias=leaves[2],
                                      return_entropy=True, chunk_size=50, vocab_chunk_size=1024)
        (lp * g_lp.to(device) + h * g_h.to(device)).sum().backward()
        return [lp, h] + [leaf.grad for leaf in leaves]

    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for cpu, cuda in zip(grads_on("cpu"), grads_on("cuda")):
        if cpu is None:
            assert cuda is None
        else:
            torch.testing.assert_close(cuda.cpu().float(), cpu.float(), **tol)
