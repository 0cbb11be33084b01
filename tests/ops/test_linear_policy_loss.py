"""linear_policy_loss (issue 40): the PPO-clip loss of the lm-head with its gradient made in
the forward. Loss, log-probs, entropies and the gradients of hidden, weight and bias match a
float64 eager reference (every term: the clipped surrogate and its zero-gradient region, k3,
the entropy bonus); NaN propagates; validate=False changes nothing; opcheck; torch.compile."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lambdapo_ext
from lambdapo_ext import linear_policy_loss, reference
from lambdapo_ext.policy_loss import AGG_MODES, aggregation_weights, default_chunk_size
from tests.conftest import devices, skip_without_cuda, to_device

OPS = ("linear_policy_loss_forward",)


def make_inputs(shape, hidden_size, vocab, *, dtype=torch.float32, seed=0, bias=True,
                ignore_frac=0.1, spread=0.4):
    """(hidden, weight, bias, targets, advantages, token_weights, old, ref): old and ref lie
    within about ``spread`` of the float64 log-probs, so ratios fall on both sides of the
    clip range."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, hidden_size, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64) / hidden_size ** 0.5
    b = torch.randn(vocab, generator=gen, dtype=torch.float64) if bias else None
    targets = torch.randint(0, vocab, shape, generator=gen)
    targets[torch.rand(shape, generator=gen) < ignore_frac] = -100
    lp = reference.linear_token_logprobs(hidden, weight, targets, bias=b)
    old = lp + spread * torch.randn(shape, generator=gen, dtype=torch.float64)
    ref = lp + spread * torch.randn(shape, generator=gen, dtype=torch.float64)
    adv = torch.randn(shape, generator=gen, dtype=torch.float64)
    tw = torch.rand(shape, generator=gen, dtype=torch.float64) / max(targets.numel(), 1)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return (cast(hidden), cast(weight), cast(b), targets, adv.float(), tw.float(), old.float(),
            ref.float())


def run(fn, hidden, weight, bias, targets, adv, tw, needs=(True, True, True), upstream=1.0,
        **kwargs):
    """(loss, logprobs, entropy, grad_hidden, grad_weight, grad_bias) of fn."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(need)
              for t, need in zip((hidden, weight, bias), needs)]
    loss, lp, h = fn(leaves[0], leaves[1], targets, adv, tw, bias=leaves[2], **kwargs)
    if loss.requires_grad:
        (loss * upstream).backward()
    return (loss.detach(), lp, h, *[None if t is None else t.grad for t in leaves])


def as64(hidden, weight, bias):
    return [None if t is None else t.double() for t in (hidden, weight, bias)]


def assert_matches_reference(inputs, *, rtol=1e-5, atol=1e-6, grad_rtol=1e-4, grad_atol=1e-6,
                             needs=(True, True, True), **kwargs):
    hidden, weight, bias, targets, adv, tw, old, ref = inputs
    ours = run(linear_policy_loss, hidden, weight, bias, targets, adv, tw, needs=needs, **kwargs)
    ref_kwargs = {k: v for k, v in kwargs.items() if k not in ("chunk_size", "validate")}
    theirs = run(reference.linear_policy_loss, *as64(hidden, weight, bias), targets, adv, tw,
                 needs=needs, **ref_kwargs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if b is None:
            assert a is None, i
            continue
        assert a is not None, i
        tol = dict(rtol=rtol, atol=atol) if i < 3 else dict(rtol=grad_rtol, atol=grad_atol)
        torch.testing.assert_close(a.double(), b.double(), **tol, msg=lambda m: f"output {i}: {m}")
    return ours, theirs


# Loss settings: (name, kwargs given the inputs' old and ref).
SETTINGS = {
    "ppo_clip": lambda old, ref: dict(old_logprobs=old),
    "on_policy": lambda old, ref: dict(),
    "kl": lambda old, ref: dict(old_logprobs=old, ref_logprobs=ref, kl_coef=0.3),
    "entropy": lambda old, ref: dict(old_logprobs=old, entropy_coef=0.05),
    "all_terms_temperature": lambda old, ref: dict(
        old_logprobs=old, ref_logprobs=ref, kl_coef=0.1, entropy_coef=0.02, clip_low=0.1,
        clip_high=0.28, temperature=0.7),
    "no_clip_high": lambda old, ref: dict(old_logprobs=old, clip_high=math.inf),
}


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("chunk_size", [1, 7, None])
@pytest.mark.parametrize("with_bias", [True, False])
def test_float32_matches_float64_reference(setting, chunk_size, with_bias):
    inputs = make_inputs((3, 11), 48, 1000, seed=chunk_size or 0, bias=with_bias)
    kwargs = SETTINGS[setting](*inputs[6:])
    (loss, lp, h, *grads), _ = assert_matches_reference(inputs, chunk_size=chunk_size, **kwargs)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert lp.shape == h.shape == (3, 11) and lp.dtype == h.dtype == torch.float32
    assert not lp.requires_grad and not h.requires_grad
    assert all(g.dtype == torch.float32 for g in grads if g is not None)


def test_clipped_tokens_get_no_surrogate_gradient():
    """Rows whose ratio is outside the clip range on the side where min picks the clipped
    term get exactly zero gradient; rows where it picks the unclipped term (outside the
    range too) get -A r; rows inside the range get -A r."""
    hidden, weight, _, targets, _, _, _, _ = make_inputs((6,), 16, 50, seed=3, bias=False,
                                                         ignore_frac=0.0)
    lp = reference.linear_token_logprobs(hidden.double(), weight.double(), targets).float()
    # ratios 2, 2, 0.5, 0.5, 1.1, 1 with A = +1, -1, +1, -1, +1, -1.
    old = lp - torch.tensor([math.log(2), math.log(2), -math.log(2), -math.log(2),
                             math.log(1.1), 0.0])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    tw = torch.ones(6)
    _, _, _, grad_hidden, grad_weight, _ = run(linear_policy_loss, hidden, weight, None, targets,
                                               adv, tw, old_logprobs=old)
    clipped = torch.tensor([True, False, False, True, False, False])
    assert (grad_hidden[clipped] == 0).all()
    assert (grad_hidden[~clipped].abs().sum(-1) > 0).all()
    (_, _, _, rgh, rgw, _), = [run(reference.linear_policy_loss, hidden.double(), weight.double(),
                                   None, targets, adv, tw, old_logprobs=old)]
    torch.testing.assert_close(grad_hidden.double(), rgh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_weight.double(), rgw, rtol=1e-5, atol=1e-6)


def test_ratio_at_the_clip_bounds_keeps_its_gradient():
    """The clip interval is closed: with clip_low = clip_high = 0 the on-policy ratio 1 is
    inside it, so every path gives the unclipped gradient (torch 2.14's clamp gives 0 at the
    ends of an empty interval; a reference on it halved the gradient)."""
    inputs = make_inputs((4,), 8, 30, seed=1, bias=False, ignore_frac=0.0)
    hidden, weight, _, targets, adv, tw = inputs[:6]
    open_grads = run(linear_policy_loss, hidden, weight, None, targets, adv, tw)[3:5]
    for fn, cast in ((linear_policy_loss, lambda t: t),
                     (reference.linear_policy_loss, lambda t: t.double())):
        grads = run(fn, cast(hidden), cast(weight), None, targets, adv, tw, clip_low=0.0,
                    clip_high=0.0)[3:5]
        for got, want in zip(grads, open_grads):
            assert got.abs().max() > 0
            torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("term", ["kl", "entropy"])
def test_each_extra_term_alone_matches_reference(term):
    """With zero advantages only the KL or the entropy term carries a gradient."""
    inputs = list(make_inputs((5, 4), 24, 300, seed=4))
    inputs[4] = torch.zeros_like(inputs[4])
    kwargs = (dict(ref_logprobs=inputs[7], kl_coef=0.7) if term == "kl"
              else dict(entropy_coef=0.3, temperature=1.3))
    (loss, _, _, gh, _, _), _ = assert_matches_reference(inputs, old_logprobs=inputs[6],
                                                         chunk_size=6, **kwargs)
    assert gh.abs().max() > 0
    if term == "entropy":
        assert loss < 0  # -entropy_coef * H with H > 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(0, 33), hidden_size=st.integers(1, 20), vocab=st.integers(1, 300),
       chunk=st.one_of(st.none(), st.integers(1, 40)), seed=st.integers(0, 2**16),
       with_bias=st.booleans(), with_old=st.booleans(),
       kl_coef=st.sampled_from([0.0, 0.05, 1.0]), entropy_coef=st.sampled_from([0.0, 0.01, -0.5]),
       clip=st.sampled_from([(0.2, 0.2), (0.1, 0.28), (0.0, 0.0), (0.5, math.inf)]),
       temperature=st.sampled_from([1.0, 0.6, 1.7]),
       weight_scale=st.sampled_from([1.0, 1e-3, 30.0]), adv_scale=st.sampled_from([1.0, 50.0]))
def test_hypothesis_matches_float64_reference(rows, hidden_size, vocab, chunk, seed, with_bias,
                                              with_old, kl_coef, entropy_coef, clip,
                                              temperature, weight_scale, adv_scale):
    hidden, weight, bias, targets, adv, tw, old, ref = make_inputs(
        (rows,), hidden_size, vocab, seed=seed, bias=with_bias)
    tw = tw * weight_scale * max(rows, 1)
    adv = adv * adv_scale
    kwargs = dict(old_logprobs=old if with_old else None, ref_logprobs=ref, kl_coef=kl_coef,
                  entropy_coef=entropy_coef, clip_low=clip[0], clip_high=clip[1],
                  temperature=temperature, chunk_size=chunk)
    ours = run(linear_policy_loss, hidden, weight, bias, targets, adv, tw, **kwargs)
    kwargs.pop("chunk_size")
    theirs = run(reference.linear_policy_loss, *as64(hidden, weight, bias), targets, adv, tw,
                 **kwargs)
    # fp32 rounding of terms of size |w| (|A| r + kl k3 + |ent| H), and of sums over rows.
    scale = float((tw.abs() * (adv.abs() * 2 + kl_coef * 10 + abs(entropy_coef) * 10 + 1)).sum())
    hidden_max = float(hidden.abs().amax()) if rows else 0.0
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if b is None:
            assert a is None
            continue
        if i == 0:
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6 * (1 + scale))
        elif i < 3:
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=2e-5)
        else:
            torch.testing.assert_close(a.double(), b, rtol=1e-4,
                                       atol=1e-6 * (1 + scale) * (1 + hidden_max))


GRAD_SETS = [(h, w, b) for h in (True, False) for w in (True, False) for b in (True, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("needs", GRAD_SETS, ids=lambda n: "".join("hwb"[i] if n[i] else "-"
                                                                     for i in range(3)))
def test_only_requested_gradients(needs, dtype):
    """Every combination of which of hidden / weight / bias require grad: the requested
    gradients match float64, the others stay None, and the op makes none it is not asked
    for (empty outputs)."""
    inputs = make_inputs((2, 9), 40, 700, seed=11, dtype=dtype)
    tol = {} if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2, grad_rtol=3e-2,
                                                  grad_atol=3e-3)
    old = inputs[6]
    assert_matches_reference(inputs, needs=needs, old_logprobs=old, chunk_size=7, **tol)
    hidden, weight, bias, targets, adv, tw, _, _ = inputs
    outs = torch.ops.lambdapo.linear_policy_loss_forward(
        hidden, weight, bias, targets, adv, tw, old, None, 0.0, 0.0, 0.2, 0.2, 1.0, -100, 7,
        list(needs))
    for got, need, like in zip(outs[3:], needs, (hidden, weight, bias)):
        assert got.shape == (like.shape if need else (0,))


def test_no_grad_makes_no_gradient():
    hidden, weight, bias, targets, adv, tw, old, _ = make_inputs((8,), 16, 100, seed=12)
    x, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    with torch.no_grad():
        loss, lp, h = linear_policy_loss(x, w, targets, adv, tw, old_logprobs=old, bias=bias)
    assert not loss.requires_grad
    rloss, rlp, rh = reference.linear_policy_loss(x.double(), w.double(), targets, adv, tw,
                                                  old_logprobs=old, bias=bias.double())
    torch.testing.assert_close(loss.double(), rloss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lp.double(), rlp, rtol=1e-5, atol=1e-6)


def test_upstream_gradient_scales_the_stored_gradients():
    inputs = make_inputs((4, 5), 24, 200, seed=13)
    hidden, weight, bias, targets, adv, tw, old, _ = inputs
    one = run(linear_policy_loss, hidden, weight, bias, targets, adv, tw, old_logprobs=old)
    three = run(linear_policy_loss, hidden, weight, bias, targets, adv, tw, old_logprobs=old,
                upstream=-3.0)
    for a, b in zip(one[3:], three[3:]):
        torch.testing.assert_close(b, -3.0 * a, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_gradient_scaling_keeps_the_scale_exact(dtype):
    """The upstream scale multiplies 16-bit gradients in fp32: scaling by 1/3 is the fp32
    product rounded once, not a product with a 16-bit rounded 1/3."""
    hidden, weight, bias, targets, adv, tw, old, _ = make_inputs((3, 4), 32, 300, seed=14,
                                                                 dtype=dtype)
    one = run(linear_policy_loss, hidden, weight, bias, targets, adv, tw, old_logprobs=old)
    third = run(linear_policy_loss, hidden, weight, bias, targets, adv, tw, old_logprobs=old,
                upstream=1 / 3)
    for a, b in zip(one[3:], third[3:]):
        assert b.dtype == dtype
        assert torch.equal(b, (a.float() * (1 / 3)).to(dtype))


def test_retained_graph_gives_the_same_gradients_again():
    """With retain_graph the stored gradients are scaled out of place, so a second backward
    gives the same gradients again (and autograd.grad works, as gradcheck uses it)."""
    hidden, weight, bias, targets, adv, tw, old, _ = make_inputs((6,), 8, 40, seed=15)
    x = hidden.requires_grad_(True)
    loss, _, _ = linear_policy_loss(x, weight, targets, adv, tw, old_logprobs=old)
    (first,) = torch.autograd.grad(2 * loss, x, retain_graph=True)
    (second,) = torch.autograd.grad(-loss, x, retain_graph=True)
    loss.backward()
    torch.testing.assert_close(second, -first / 2)
    torch.testing.assert_close(x.grad, first / 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_is_at_most_same_dtype_torch(dtype):
    """16-bit inputs: no worse than torch's eager loss in the same dtype against float64
    (the weight gradient rounded once per chunk: 4 chunks here)."""
    inputs = make_inputs((4, 16), 64, 2000, dtype=dtype, seed=3)
    hidden, weight, bias, targets, adv, tw, old, ref = inputs
    kwargs = dict(old_logprobs=old, ref_logprobs=ref, kl_coef=0.1, entropy_coef=0.01)
    ours = run(linear_policy_loss, hidden, weight, bias, targets, adv, tw, chunk_size=16,
               **kwargs)
    eager = run(reference.linear_policy_loss, hidden, weight, bias, targets, adv, tw, **kwargs)
    exact = run(reference.linear_policy_loss, *as64(hidden, weight, bias), targets, adv, tw,
                **kwargs)
    for i, (a, e, x) in enumerate(zip(ours, eager, exact)):
        err, eager_err = (a.double() - x).abs().max(), (e.double() - x).abs().max()
        assert err <= 2.0 * eager_err + 1e-6, (i, float(err), float(eager_err))
        if i >= 3:
            assert a.dtype == dtype


def test_gradcheck_float64():
    hidden, weight, bias, targets, adv, tw, old, ref = make_inputs((2, 5), 8, 30,
                                                                   dtype=torch.float64, seed=4,
                                                                   spread=0.05)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    assert torch.autograd.gradcheck(
        lambda hd, w, b: linear_policy_loss(hd, w, targets, adv.double(), tw.double() * 10,
                                            old_logprobs=old.double(), ref_logprobs=ref.double(),
                                            kl_coef=0.2, entropy_coef=0.1, bias=b,
                                            temperature=1.2, chunk_size=3)[0], leaves)


def test_nan_propagates():
    """A NaN logit makes its row's log-prob, entropy and gradient NaN and the loss NaN (as
    the eager formula does); a NaN advantage makes the loss and its row's gradient NaN; NaN
    values on an ignored row change nothing."""
    hidden, weight, _, targets, adv, tw, old, _ = make_inputs((5,), 12, 60, seed=16,
                                                              bias=False, ignore_frac=0.0)
    bad_weight = weight.clone()
    bad_weight[7, 3] = float("nan")       # every row's logit 7 is NaN
    loss, lp, h, gh, gw, _ = run(linear_policy_loss, hidden, bad_weight, None, targets, adv, tw,
                                 old_logprobs=old)
    assert torch.isnan(loss) and torch.isnan(lp).all() and torch.isnan(h).all()
    assert torch.isnan(gh).all() and torch.isnan(gw).any()

    nan_adv = adv.clone()
    nan_adv[2] = float("nan")
    loss, lp, _, gh, _, _ = run(linear_policy_loss, hidden, weight, None, targets, nan_adv, tw,
                                old_logprobs=old)
    _, _, _, rgh, _, _ = run(reference.linear_policy_loss, hidden.double(), weight.double(),
                             None, targets, nan_adv, tw, old_logprobs=old)
    assert torch.isnan(loss) and torch.isfinite(lp).all()
    assert torch.isnan(gh[2]).all() and torch.isfinite(gh[[0, 1, 3, 4]]).all()
    assert torch.isnan(rgh[2]).all() and torch.isfinite(rgh[[0, 1, 3, 4]]).all()

    ignored = targets.clone()
    ignored[2] = -100
    loss, lp, h, gh, _, _ = run(linear_policy_loss, hidden, weight, None, ignored, nan_adv,
                                tw.clone().index_fill_(0, torch.tensor([2]), float("nan")),
                                old_logprobs=old.clone().index_fill_(0, torch.tensor([2]),
                                                                     float("nan")))
    assert torch.isfinite(loss) and lp[2] == 0 and h[2] == 0 and (gh[2] == 0).all()


def test_ignored_rows_contribute_nothing():
    inputs = make_inputs((20,), 16, 90, seed=17, ignore_frac=0.4)
    hidden, weight, bias, targets, adv, tw, old, _ = inputs
    kept = targets != -100
    full = run(linear_policy_loss, hidden, weight, bias, targets, adv, tw, old_logprobs=old,
               entropy_coef=0.1)
    part = run(linear_policy_loss, hidden[kept], weight, bias, targets[kept], adv[kept], tw[kept],
               old_logprobs=old[kept], entropy_coef=0.1)
    torch.testing.assert_close(full[0], part[0], rtol=1e-6, atol=1e-7)
    assert (full[3][~kept] == 0).all() and (full[1][~kept] == 0).all()
    torch.testing.assert_close(full[4], part[4], rtol=1e-5, atol=1e-7)


def test_batch_invariance():
    hidden, weight, bias, targets, adv, tw, old, _ = make_inputs((64,), 32, 500, seed=6,
                                                                 ignore_frac=0.0)
    _, lp, h = linear_policy_loss(hidden, weight, targets, adv, tw, bias=bias, old_logprobs=old,
                                  chunk_size=64)
    for row in (0, 63):
        s = slice(row, row + 1)
        _, alone_lp, alone_h = linear_policy_loss(hidden[s], weight, targets[s], adv[s], tw[s],
                                                  bias=bias, old_logprobs=old[s], chunk_size=64)
        torch.testing.assert_close(alone_lp[0], lp[row], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(alone_h[0], h[row], rtol=1e-6, atol=1e-6)


def test_rollout_correction_folds_into_advantages():
    """The trainer's surrogate times a rollout-correction weight c >= 0 (lambdapo.loss,
    KL not weighted) equals the op with advantages A * c."""
    hidden, weight, bias, targets, adv, tw, old, ref = make_inputs((12,), 16, 80, seed=18)
    c = torch.rand(12, generator=torch.Generator().manual_seed(1)) * 2
    x = hidden.double().requires_grad_(True)
    lp = reference.linear_token_logprobs(x, weight.double(), targets, bias=bias.double())
    ratio = torch.exp(lp - old.double())
    a = adv.double()
    surrogate = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a) * c.double()
    d = ref.double() - lp
    per_token = surrogate + 0.1 * (torch.exp(d) - d - 1)
    expected = torch.where(targets != -100, per_token * tw.double(), 0).sum()
    expected.backward()
    loss, _, _, gh, _, _ = run(linear_policy_loss, hidden, weight, bias, targets, adv * c, tw,
                               needs=(True, False, False), old_logprobs=old, ref_logprobs=ref,
                               kl_coef=0.1)
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh.double(), x.grad, rtol=1e-4, atol=1e-6)


def test_validate_false_is_identical_and_trusts_targets():
    inputs = make_inputs((4, 7), 16, 90, seed=1)
    hidden, weight, bias, targets, adv, tw, old, ref = inputs
    kwargs = dict(old_logprobs=old, ref_logprobs=ref, kl_coef=0.1, chunk_size=5)
    checked = run(linear_policy_loss, hidden, weight, bias, targets, adv, tw, **kwargs)
    trusted = run(linear_policy_loss, hidden, weight, bias, targets, adv, tw, validate=False,
                  **kwargs)
    for a, b in zip(checked, trusted):
        assert torch.equal(a, b)
    bad = targets.clone()
    bad[0, 0] = 90
    with pytest.raises(ValueError, match="targets must lie in"):
        linear_policy_loss(hidden, weight, bad, adv, tw)
    loss, lp, _ = linear_policy_loss(hidden, weight, bad, adv, tw, validate=False)
    assert torch.isnan(lp[0, 0]) and torch.isnan(loss)
    assert torch.isfinite(lp.view(-1)[1:]).all()


@pytest.mark.parametrize("device", devices(OPS[0]))
def test_opcheck(device):
    inputs = to_device(make_inputs((3, 4), 16, 50, seed=7), device)
    hidden, weight, bias, targets, adv, tw, old, ref = inputs
    op = torch.ops.lambdapo.linear_policy_loss_forward.default
    trained = (hidden.requires_grad_(True), weight.requires_grad_(True),
               bias.requires_grad_(True), targets, adv, tw, old, ref, 0.1, 0.01, 0.2, 0.28, 0.9,
               -100, 5, [True, True, True])
    torch.library.opcheck(op, trained)
    frozen = (hidden, weight.detach(), None, targets, adv, tw, None, None, 0.0, 0.0, 0.2, 0.2,
              1.0, -100, 12, [True, False, False])
    torch.library.opcheck(op, frozen)
    no_grad = (hidden.detach(), weight.detach(), bias.detach(), targets, adv.double(), tw, old,
               None, 0.0, 0.0, 0.2, 0.2, 1.0, -100, 2, [False, False, False], False)
    torch.library.opcheck(op, no_grad)


@pytest.mark.parametrize("train_weight", [True, False])
def test_torch_compile_fullgraph(train_weight):
    hidden, weight, bias, targets, adv, tw, old, _ = make_inputs((2, 8), 16, 200, seed=8)

    def loss_fn(x, w):
        loss, lp, _ = linear_policy_loss(x, w, targets, adv, tw, bias=bias, old_logprobs=old,
                                         entropy_coef=0.01, chunk_size=5)
        return 2.0 * loss, lp

    compiled = torch.compile(loss_fn, fullgraph=True)
    x, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(train_weight)
    loss, lp = compiled(x, w)
    loss.backward()
    xe, we = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(train_weight)
    eloss, elp = loss_fn(xe, we)
    eloss.backward()
    torch.testing.assert_close(loss, eloss)
    torch.testing.assert_close(lp, elp)
    torch.testing.assert_close(x.grad, xe.grad)
    if train_weight:
        torch.testing.assert_close(w.grad, we.grad)
    else:
        assert w.grad is None


def test_default_chunk_size_bounds_logits_memory():
    cpu = torch.device("cpu")
    assert default_chunk_size(10, 1000, torch.float32, cpu) == 10
    # The issue-40 setting: 256 rows of fp32 logits over V = 32000 (31.25 MiB).
    assert default_chunk_size(4096, 32000, torch.float32, cpu) == 256
    for rows in (1, 100_000):
        chunk = default_chunk_size(rows, 151_936, torch.bfloat16, cpu)
        assert 1 <= chunk <= rows and chunk * 151_936 * 2 <= 32 * 2**20
    assert default_chunk_size(5, 10**9, torch.float32, cpu) == 1
    assert default_chunk_size(0, 10, torch.float32, cpu) == 1
    with pytest.raises(ValueError, match="weight must have at least one row"):
        default_chunk_size(4, 0, torch.float32, cpu)


def test_empty_inputs():
    hidden, weight, bias, _, _, _, _, _ = make_inputs((3,), 8, 20, seed=19)
    empty = torch.zeros(0, dtype=torch.long)
    loss, lp, h, gh, gw, gb = run(linear_policy_loss, hidden[:0], weight, bias, empty,
                                  torch.zeros(0), torch.zeros(0))
    assert loss == 0 and lp.shape == h.shape == (0,) and gh.shape == (0, 8)
    assert (gw == 0).all() and (gb == 0).all()


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregation_weights_equal_the_trainers_aggregation(mode):
    """sum(w * l) equals lambdapo.loss.aggregate(l, mask, mode, totals) for a micro-batch of
    a larger mini-batch."""
    gen = torch.Generator().manual_seed(20)
    mask = torch.rand(5, 9, generator=gen) > 0.3
    mask[3] = False
    per_token = torch.randn(5, 9, generator=gen, dtype=torch.float64)
    totals = dict(tokens=57, sequences=11, max_new_tokens=12)
    w = aggregation_weights(mask, mode, **totals)
    got = (w.double() * per_token).sum()
    m = mask.double()
    if mode == "token-mean":
        expected = (per_token * m).sum() / 57
    elif mode == "seq-mean-token-mean":
        expected = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).sum() / 11
    else:
        expected = ((per_token * m).sum(-1) / 12).sum() / 11
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
    try:
        from lambdapo.loss import BatchTotals, aggregate
    except ImportError:
        return
    torch.testing.assert_close(got, aggregate(per_token, mask, mode, BatchTotals(**totals)),
                               rtol=1e-6, atol=1e-9)


def test_aggregation_weights_default_totals_and_bad_mode():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(aggregation_weights(mask, "token-mean").sum(), torch.tensor(1.0))
    torch.testing.assert_close(aggregation_weights(mask, "seq-mean-token-mean").sum(),
                               torch.tensor(1.0))
    torch.testing.assert_close(aggregation_weights(mask, "seq-mean-token-sum-norm").sum(),
                               torch.tensor(0.5))
    with pytest.raises(ValueError, match="loss_agg_mode"):
        aggregation_weights(mask, "seq-sum")


def test_process_group_of_several_ranks_is_not_supported(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    hidden, weight, _, targets, adv, tw, _, _ = make_inputs((3,), 8, 20, seed=21)
    with pytest.raises(NotImplementedError, match="linear_token_logprobs"):
        linear_policy_loss(hidden, weight, targets, adv, tw, process_group=object())


def test_exported():
    assert lambdapo_ext.linear_policy_loss is linear_policy_loss


# ------------------------------------------------------------------ CUDA (skip without a GPU)
@skip_without_cuda(OPS[0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, True)])
def test_cuda_matches_cpu(dtype, needs):
    inputs = make_inputs((4, 33), 128, 5000, dtype=dtype, seed=9)
    hidden, weight, bias, targets, adv, tw, old, ref = inputs
    kwargs = dict(old_logprobs=old, ref_logprobs=ref, kl_coef=0.1, entropy_coef=0.01,
                  chunk_size=50)
    cpu = run(linear_policy_loss, hidden, weight, bias, targets, adv, tw, needs=needs, **kwargs)
    cuda_kwargs = {k: to_device(v, "cuda") for k, v in kwargs.items()}
    cuda = run(linear_policy_loss, *to_device((hidden, weight, bias, targets, adv, tw), "cuda"),
               needs=needs, **cuda_kwargs)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-3)
    for a, b in zip(cpu, cuda):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(b.cpu().float(), a.float(), **tol)


@skip_without_cuda(OPS[0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_float64_reference(dtype):
    inputs = to_device(make_inputs((3, 50), 64, 3001, dtype=dtype, seed=22), "cuda")
    tol = {} if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2, grad_rtol=3e-2,
                                                  grad_atol=3e-3)
    assert_matches_reference(inputs, old_logprobs=inputs[6], ref_logprobs=inputs[7],
                             kl_coef=0.2, entropy_coef=0.05, temperature=0.8, chunk_size=64,
                             **tol)


@skip_without_cuda(OPS[0])
@pytest.mark.parametrize("chunk_size", [5, None])
def test_cuda_unvalidated_makes_no_host_sync_and_captures_in_a_graph(chunk_size):
    from test_sync_free import run_in_cuda_graph, run_without_sync

    hidden, weight, bias, targets, adv, tw, old, ref = to_device(
        make_inputs((4, 7), 16, 90, seed=23), "cuda")

    def step():
        h = hidden.detach().clone().requires_grad_(True)
        w = weight.detach().clone().requires_grad_(True)
        b = bias.detach().clone().requires_grad_(True)
        loss, lp, ent = linear_policy_loss(h, w, targets, adv, tw, bias=b, old_logprobs=old,
                                           ref_logprobs=ref, kl_coef=0.1, entropy_coef=0.01,
                                           chunk_size=chunk_size, validate=False)
        loss.backward()
        return loss.detach(), lp, ent, h.grad, w.grad, b.grad

    run_without_sync(step)
    eager, replayed = run_in_cuda_graph(step)
    for e, r in zip(eager, replayed):
        torch.testing.assert_close(r, e, rtol=1e-5, atol=1e-6)
