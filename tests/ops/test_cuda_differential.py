"""CPU-vs-CUDA differential tests of every op. Hypothesis draws shapes, dtypes, row strides,
storage offsets (rows on and off 16-byte boundaries), chunk and tile sizes, and special values
(NaN, +-inf, -inf rows, +-1000, -1e30, the smallest normal) placed at every position class of
the CUDA kernels' work split (softmax_kernel_emulation.py names them: the first value of a
thread's fold, vector ends, backward chunk edges, tile edges, row tails) and at random columns.
Each case runs on both devices; the results must agree within each op's bound (the bounds of
the ops' own CUDA tests), with NaN exactly where the CPU has NaN and integers exactly equal.

The CUDA cases skip without a GPU; benchmarks/gpu_check.sh runs this file as its
"differential" stage (LAMBDAPO_DIFFERENTIAL_EXAMPLES sets the examples per op, default 60).
test_harness_runs_with_the_cpu_standing_in runs every generator and comparison in CI with the
CPU on both sides, so a GPU run does not find a broken harness, and
test_token_logprobs_emulation_stands_in_for_cuda puts the numpy emulation of the CUDA kernels
in the GPU's place (400 examples of it passed when this file was written). rms_norm, swiglu and
decode_attention are left out: they are on their way out of the extension."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lambdapo_ext
import softmax_kernel_emulation as emu
from tests.conftest import cuda_available_for

IGNORE_INDICES = [-100, -1, 0, 5]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
EXAMPLES = int(os.environ.get("LAMBDAPO_DIFFERENTIAL_EXAMPLES", "60"))


def _settings(examples: int):
    return settings(max_examples=examples, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def assert_agree(got: torch.Tensor | None, expected: torch.Tensor | None, what: str,
                 **tol) -> None:
    """``got`` (from the device under test) equals ``expected`` (CPU) within ``tol``, NaN
    exactly where ``expected`` is NaN, +-inf where it is +-inf."""
    if expected is None:
        assert got is None, f"{what}: a gradient where the CPU has none"
        return
    got = got.detach().cpu()
    assert got.shape == expected.shape and got.dtype == expected.dtype, (
        f"{what}: {got.dtype} {tuple(got.shape)} vs {expected.dtype} {tuple(expected.shape)}")
    g, e = got.double(), expected.detach().double()
    differ = (g.isnan() != e.isnan()).nonzero().tolist()
    assert not differ, f"{what}: NaN on one device only at {differ[:8]}"
    torch.testing.assert_close(g, e, equal_nan=True, **tol, msg=lambda m: f"{what}: {m}")


def _rounding(logits: torch.Tensor, temperature: float) -> float:
    """The error the accumulation type's rounding of x = logit / T (or x log2(e) / T) and of
    the log-normalizer leaves in log p where p matters: a few ulps of the largest row maximum
    |x| (the largest finite logit of a row; -inf rows add nothing)."""
    rows = logits.detach().double().reshape(-1, logits.shape[-1])
    top = torch.where(rows.isfinite(), rows, -math.inf).max(-1).values
    top = top[top.isfinite()]
    if not top.numel():
        return 0.0
    eps = torch.finfo(torch.float64 if logits.dtype == torch.float64 else torch.float32).eps
    return 4 * eps * top.abs().max().item() / temperature


# Logits layouts: a base tensor and how the op's input is cut from it, the same on each device.


@dataclass
class Layout:
    """How logits [*lead, V] are cut from a base tensor: ``kind`` is "contiguous",
    "column-offset" (base [..., V + k] sliced [..., k:]: rows start k elements in, off their
    16-byte boundary for most k), "row-gap" (base [..., V + k] sliced [..., :V]), or
    "transposed" (base [b, a, V] transposed to [a, b, V]: leading dims not contiguous)."""

    kind: str
    extra: int = 0

    def base_shape(self, lead: tuple[int, ...], vocab: int) -> tuple[int, ...]:
        if self.kind == "transposed":
            return (lead[1], lead[0], vocab)
        return (*lead, vocab + self.extra)

    def view(self, base: torch.Tensor, vocab: int) -> torch.Tensor:
        if self.kind == "transposed":
            return base.transpose(0, 1)
        if self.kind == "column-offset":
            return base[..., self.extra:]
        return base[..., :vocab]


@st.composite
def layouts(draw, lead_dims: int) -> Layout:
    kinds = ["contiguous", "column-offset", "row-gap"] + (["transposed"] if lead_dims == 2 else [])
    kind = draw(st.sampled_from(kinds))
    return Layout(kind, draw(st.integers(1, 9)) if kind in ("column-offset", "row-gap") else 0)


@st.composite
def vocab_sizes(draw, dtype: torch.dtype, largest: int = 10000) -> int:
    """Vocabularies that reach each path of the kernels: fewer columns than threads, whole
    vectors (a few per thread), the forward's four-vector loop and its tail, the CPU block
    and backward chunk edges."""
    vec = emu.vector_width(dtype)
    loop = vec * emu.FORWARD_LOADS * emu.THREADS
    chunk = vec * emu.THREADS * emu.BACKWARD_VECS_PER_THREAD
    edges = [loop + vec, loop + emu.THREADS * vec + vec, 2 * loop + 3 * vec, chunk - 1, chunk,
             chunk + 1, emu.CPU_BLOCK, emu.CPU_BLOCK + 1]
    return draw(st.one_of(st.integers(1, 300), st.integers(1, 700).map(lambda k: k * vec),
                          st.sampled_from([v for v in edges if v <= largest])))


@st.composite
def special_placements(draw, dtype: torch.dtype, rows: int, vocab: int, vectorized: bool,
                       positions: dict[str, int] | None = None):
    """[(row, column or None for the whole row, value)]: values at the kernels' position
    classes or anywhere; a whole row of -inf, or of one value."""
    positions = positions or emu.token_logprobs_positions(vocab, emu.vector_width(dtype),
                                                          vectorized)
    values = emu.special_values(dtype)
    placements = []
    for _ in range(draw(st.integers(0, 4))):
        row = draw(st.integers(0, rows - 1))
        column = draw(st.one_of(st.sampled_from(sorted(positions.values())),
                                st.integers(0, vocab - 1), st.none()))
        placements.append((row, column, draw(st.sampled_from(sorted(values.values(), key=repr)))))
    return placements


def _place(x: torch.Tensor, placements) -> None:
    """Writes the placements into ``x`` (any strides): row r is the r-th row of x [..., V].
    A value of magnitude over 1e4 that ends up its row's largest finite value becomes -inf:
    the float32 rounding of a logit that large (x / T on the CPU, x log2(e) / T on CUDA)
    moves the log-normalizer by more than 1 on either device (docs/ops.md)."""
    def row_of(row: int) -> torch.Tensor:
        return x[torch.unravel_index(torch.tensor(row), x.shape[:-1])]

    for row, column, value in placements:
        row_of(row)[slice(None) if column is None else column] = value
    for row in range(math.prod(x.shape[:-1])):
        x_row = row_of(row)
        finite = x_row[x_row.isfinite()]
        if finite.numel() and finite.double().max() < -1e4:
            x_row[x_row.isfinite()] = -math.inf


# token_logprobs


@dataclass
class TokenLogprobsCase:
    base: torch.Tensor
    layout: Layout
    vocab: int
    targets: torch.Tensor
    ignore_index: int
    temperature: float
    entropy: bool
    inplace: bool
    upstream: torch.Tensor  # [2, *lead]: gradients of the log-probs and of the entropy
    special: list = field(default_factory=list)


@st.composite
def token_logprobs_cases(draw) -> TokenLogprobsCase:
    dtype = draw(st.sampled_from(DTYPES))
    vocab = draw(vocab_sizes(dtype))
    lead = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
    layout = draw(layouts(len(lead)))
    rows = math.prod(lead)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    base = (torch.randn(layout.base_shape(lead, vocab), generator=gen, dtype=torch.float64)
            * draw(st.sampled_from([0.1, 3.0, 30.0]))).to(dtype)
    view = layout.view(base, vocab)
    vectorized = layout.kind == "contiguous" and vocab % emu.vector_width(dtype) == 0
    special = draw(special_placements(dtype, rows, vocab, vectorized))
    _place(view, special)
    ignore_index = draw(st.sampled_from(IGNORE_INDICES))
    targets = torch.randint(0, vocab, lead, generator=gen)
    targets[torch.rand(lead, generator=gen) < 0.2] = ignore_index
    for row, column, _ in special[:2]:  # a target on a special value now and then
        if column is not None:
            targets[torch.unravel_index(torch.tensor(row), lead)] = column
    return TokenLogprobsCase(base, layout, vocab, targets, ignore_index,
                             draw(st.sampled_from([1.0, 0.7, 2.5])), draw(st.booleans()),
                             draw(st.booleans()), torch.randn(2, *lead, generator=gen), special)


def run_token_logprobs(case: TokenLogprobsCase, device: str):
    """(log-probs, entropy, gradient of the base tensor) on ``device``, moved to the CPU."""
    leaf = case.base.to(device, copy=True).requires_grad_(True)
    # The in-place backward writes over its input: it gets a non-leaf copy's view.
    source = leaf * 1 if case.inplace else leaf
    logits = case.layout.view(source, case.vocab)
    out = lambdapo_ext.token_logprobs(
        logits, case.targets.to(device), temperature=case.temperature,
        ignore_index=case.ignore_index, return_entropy=case.entropy,
        inplace_backward=case.inplace)
    lp, h = out if case.entropy else (out, None)
    upstream = case.upstream.to(device)
    loss = (lp * upstream[0]).sum() + ((h * upstream[1]).sum() if case.entropy else 0)
    loss.backward()
    return lp.detach().cpu(), None if h is None else h.detach().cpu(), leaf.grad.cpu()


def compare_token_logprobs(case: TokenLogprobsCase, cpu, device) -> None:
    rounding = _rounding(case.layout.view(case.base, case.vocab), case.temperature)
    # A gradient entry is (1/T) g p (...): an error e in log p moves it by about (|g|/T) p e.
    grad_rounding = rounding * case.upstream.abs().max().item() / case.temperature
    if case.base.dtype == torch.float64:
        tol = dict(rtol=1e-10, atol=1e-10 + rounding)
        grad_tol = dict(rtol=1e-9, atol=1e-12 + grad_rounding)
    else:
        tol = dict(rtol=1e-5, atol=2e-5 + rounding)
        # fp32: the devices sum V terms in different orders; exp turns the ~log2(V) ulp
        # difference in the log-normalizer into a relative ~2e-5 in p (test_token_logprobs).
        grad_tol = dict(rtol=2e-5 if case.base.dtype == torch.float32 else 1e-2,
                        atol=1e-6 + grad_rounding)
    assert_agree(device[0], cpu[0], "log-probs", **tol)
    assert_agree(device[1], cpu[1], "entropy", **tol)
    assert_agree(device[2], cpu[2], "gradient", **grad_tol)


# linear_token_logprobs


@dataclass
class LinearCase:
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    targets: torch.Tensor
    ignore_index: int
    temperature: float
    entropy: bool
    chunk_size: int | None
    vocab_chunk_size: int | None
    needs: tuple[bool, bool, bool]  # hidden, weight, bias require grad
    upstream: torch.Tensor
    special: list = field(default_factory=list)


@st.composite
def linear_cases(draw) -> LinearCase:
    dtype = draw(st.sampled_from(DTYPES))
    vocab = draw(vocab_sizes(dtype, largest=3000))
    width = draw(st.sampled_from([1, 8, 24, 64]))
    lead = tuple(draw(st.lists(st.integers(1, 12), min_size=1, max_size=2)))
    rows = math.prod(lead)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    hidden = torch.randn(*lead, width, generator=gen, dtype=torch.float64).to(dtype)
    weight = (torch.randn(vocab, width, generator=gen, dtype=torch.float64)
              * draw(st.sampled_from([0.1, 1.0])) / width ** 0.5).to(dtype)
    with_bias = draw(st.booleans())
    vocab_chunk = draw(st.one_of(st.none(), st.integers(1, vocab),
                                 st.integers(1, 64).map(lambda k: k * emu.vector_width(dtype))))
    special = []
    if with_bias:  # special values as whole logit columns: through the bias
        bias = torch.randn(vocab, generator=gen, dtype=torch.float64).to(dtype)
        positions = emu.linear_positions(vocab, emu.vector_width(dtype), vocab_chunk or vocab)
        special = [(None, column, value) for _, column, value in draw(special_placements(
            dtype, 1, vocab, False, positions)) if column is not None]
        # A 16-bit logit near 1000 or below is rounded to a few units (the matmuls' fp32
        # sums may round either way): only non-finite and tiny values for 16-bit inputs, and
        # for one column (which would be its row's maximum: see _place).
        special = [(r, c, -math.inf if (dtype in (torch.bfloat16, torch.float16) or vocab == 1)
                    and math.isfinite(v) and abs(v) > 1 else v) for r, c, v in special]
        for _, column, value in special:
            bias[column] = value
    else:
        bias = None
    if draw(st.booleans()):  # a NaN or inf in a hidden row, or a weight row
        target = draw(st.sampled_from(["hidden", "weight"]))
        value = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        (hidden.view(-1, width)[draw(st.integers(0, rows - 1))] if target == "hidden"
         else weight[draw(st.integers(0, vocab - 1))])[draw(st.integers(0, width - 1))] = value
        special.append((target, None, value))
    ignore_index = draw(st.sampled_from(IGNORE_INDICES))
    targets = torch.randint(0, vocab, lead, generator=gen)
    targets[torch.rand(lead, generator=gen) < 0.2] = ignore_index
    needs = draw(st.tuples(st.booleans(), st.booleans(), st.booleans()).filter(
        lambda n: n[0] or n[1] or (n[2] and with_bias)))
    return LinearCase(hidden, weight, bias, targets, ignore_index,
                      draw(st.sampled_from([1.0, 0.7])), draw(st.booleans()),
                      draw(st.one_of(st.none(), st.integers(1, rows))), vocab_chunk, needs,
                      torch.randn(2, *lead, generator=gen), special)


def run_linear(case: LinearCase, device: str):
    leaves = [None if t is None else t.to(device, copy=True).requires_grad_(need)
              for t, need in zip((case.hidden, case.weight, case.bias), case.needs)]
    out = lambdapo_ext.linear_token_logprobs(
        leaves[0], leaves[1], case.targets.to(device), bias=leaves[2],
        temperature=case.temperature, ignore_index=case.ignore_index,
        return_entropy=case.entropy, chunk_size=case.chunk_size,
        vocab_chunk_size=case.vocab_chunk_size)
    lp, h = out if case.entropy else (out, None)
    upstream = case.upstream.to(device)
    ((lp * upstream[0]).sum() + ((h * upstream[1]).sum() if case.entropy else 0)).backward()
    grads = [None if t is None or t.grad is None else t.grad.cpu() for t in leaves]
    return [lp.detach().cpu(), None if h is None else h.detach().cpu(), *grads]


def _lm_head_tolerance(case: LinearCase, float32: tuple[float, float],
                       low_precision: tuple[float, float]) -> dict:
    """(rtol, atol) of an lm-head op's comparison: the op's own bounds by dtype (``float32``,
    ``low_precision`` for 16-bit inputs, 1e-9 for float64), the atol widened by the rounding
    of the case's largest logit."""
    rtol, atol = {torch.float64: (1e-9, 1e-9), torch.float32: float32}.get(
        case.hidden.dtype, low_precision)
    logits = case.hidden.double() @ case.weight.double().T
    rounding = _rounding(logits if case.bias is None else logits + case.bias.double(),
                         case.temperature)
    return dict(rtol=rtol, atol=atol + rounding)


def compare_linear(case: LinearCase, cpu, device) -> None:
    # Bounds of test_linear_token_logprobs' test_cuda_matches_cpu: the logits come from
    # different matmuls (cuBLAS and the CPU's), rounded to 16 bits for 16-bit inputs.
    tol = _lm_head_tolerance(case, (1e-4, 1e-4), (2e-2, 2e-2))
    for name, c, d in zip(("log-probs", "entropy", "grad hidden", "grad weight", "grad bias"),
                          cpu, device):
        assert_agree(d, c, name, **tol)


# linear_policy_loss: linear_token_logprobs' cases (shapes, dtypes, bias columns of special
# values, a NaN or inf in a hidden or weight row) with the loss's per-token inputs.

# lp - old per token: each at least 0.07 from the ends of both clip ranges in log space
# (log 0.8 = -0.22, log 1.2 = 0.18, log 1.28 = 0.25), so the devices' log-prob rounding
# (16-bit: about 2e-2) cannot move a token across a clip boundary.
LOG_RATIOS = (-0.6, -0.3, 0.0, 0.1, 0.4)
CLIPS = ((0.2, 0.2), (0.2, 0.28))


@dataclass
class PolicyLossCase:
    linear: LinearCase
    advantages: torch.Tensor
    token_weights: torch.Tensor
    log_ratio: torch.Tensor | None  # [*lead] lp - old; None: on-policy (old not given)
    ref_offset: torch.Tensor        # [*lead] ref - lp
    kl_coef: float
    entropy_coef: float
    clip: tuple[float, float]
    upstream: float


@st.composite
def policy_loss_cases(draw) -> PolicyLossCase:
    linear = draw(linear_cases())
    lead = linear.targets.shape
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    ratios = torch.tensor(LOG_RATIOS)[torch.randint(0, len(LOG_RATIOS), lead, generator=gen)]
    return PolicyLossCase(
        linear, torch.randn(lead, generator=gen),
        torch.rand(lead, generator=gen) / math.prod(lead),
        None if draw(st.booleans()) else ratios, 0.5 * torch.randn(lead, generator=gen),
        draw(st.sampled_from([0.0, 0.1])), draw(st.sampled_from([0.0, 0.01])),
        draw(st.sampled_from(CLIPS)), draw(st.sampled_from([1.0, -2.5])))


def run_policy_loss(case: PolicyLossCase, device: str):
    lin = case.linear
    # old and ref from the CPU's float32 log-probs: the same inputs on both devices.
    with torch.no_grad():
        lp = lambdapo_ext.linear_token_logprobs(
            lin.hidden, lin.weight, lin.targets, bias=lin.bias, temperature=lin.temperature,
            ignore_index=lin.ignore_index).float()
    old = None if case.log_ratio is None else (lp - case.log_ratio).to(device)
    leaves = [None if t is None else t.to(device, copy=True).requires_grad_(need)
              for t, need in zip((lin.hidden, lin.weight, lin.bias), lin.needs)]
    loss, logprobs, entropy = lambdapo_ext.linear_policy_loss(
        leaves[0], leaves[1], lin.targets.to(device), case.advantages.to(device),
        case.token_weights.to(device), old_logprobs=old,
        ref_logprobs=(lp + case.ref_offset).to(device), kl_coef=case.kl_coef,
        entropy_coef=case.entropy_coef, clip_low=case.clip[0], clip_high=case.clip[1],
        temperature=lin.temperature, bias=leaves[2], ignore_index=lin.ignore_index,
        chunk_size=lin.chunk_size)
    (loss * case.upstream).backward()
    grads = [None if t is None or t.grad is None else t.grad.cpu() for t in leaves]
    return [loss.detach().cpu(), logprobs.cpu(), entropy.cpu(), *grads]


def compare_policy_loss(case: PolicyLossCase, cpu, device) -> None:
    # Bounds of test_linear_policy_loss' test_cuda_matches_cpu.
    tol = _lm_head_tolerance(case.linear, (1e-4, 1e-5), (3e-2, 3e-3))
    for name, c, d in zip(("loss", "log-probs", "entropy", "grad hidden", "grad weight",
                           "grad bias"), cpu, device):
        assert_agree(d, c, name, **tol)


# lambda_advantages


@dataclass
class AdvantageCase:
    rewards: torch.Tensor
    scores: torch.Tensor
    mask: torch.Tensor | None
    group_ids: torch.Tensor | None
    beta: float
    normalize: str
    validate: bool


@st.composite
def advantage_cases(draw) -> AdvantageCase:
    """Dense groups around the member/tiled kernels' edge (64) and the tile's (1024), ragged
    groups of 1 to 300 members in shuffled order, masks whose masked-out members hold NaN and
    inf, ties, score spreads far past the factored form's range (the per-pair fallback), and
    non-contiguous or 16-bit inputs."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    ragged = draw(st.booleans())
    if ragged:
        sizes = draw(st.lists(st.one_of(st.integers(1, 70), st.integers(60, 300)), min_size=1,
                              max_size=6))
        ids = torch.repeat_interleave(torch.tensor(draw(st.permutations(range(len(sizes))))) * 3,
                                      torch.tensor(sizes))
        ids = ids[torch.randperm(ids.numel(), generator=gen)]
        shape = ids.shape
    else:
        groups = draw(st.integers(1, 5))
        size = draw(st.sampled_from([1, 2, 7, 63, 64, 65, 200, 256, 257, 1024, 1025]))
        shape, ids = (groups, size), None
    levels = draw(st.sampled_from([2, 5, None]))  # ties (few reward levels) or none
    rewards = (torch.randint(0, levels, shape, generator=gen).double() if levels
               else torch.randn(shape, generator=gen, dtype=torch.float64))
    scores = -torch.rand(shape, generator=gen, dtype=torch.float64) * draw(
        st.sampled_from([0.1, 5.0, 60.0]))
    with_mask = draw(st.booleans())
    mask = torch.rand(shape, generator=gen) > draw(st.sampled_from([0.0, 0.3]))
    if with_mask and draw(st.booleans()):  # masked-out members may hold anything
        rewards[~mask] = math.nan
        scores[~mask] = math.inf
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    rewards, scores = rewards.to(dtype), scores.to(dtype)
    if not ragged and draw(st.booleans()):  # non-contiguous inputs
        rewards, scores, mask = (t.t().contiguous().t() for t in (rewards, scores, mask))
    return AdvantageCase(rewards, scores, mask if with_mask else None, ids,
                         draw(st.sampled_from([0.0, 1.0, -0.5, 3.0, 40.0])),
                         draw(st.sampled_from(["mean", "none", "std"])), draw(st.booleans()))


def run_advantages(case: AdvantageCase, device: str):
    def on(t):
        return None if t is None else t.to(device)
    return lambdapo_ext.lambda_advantages(
        on(case.rewards), on(case.scores), mask=on(case.mask), group_ids=on(case.group_ids),
        beta=case.beta, normalize=case.normalize, validate=case.validate).cpu()


def _pair_magnitude(case: AdvantageCase) -> torch.Tensor:
    """Per member, the bound's scale: 2 sum_j |r_i - r_j| over its valid group mates, times the
    normalization, in float64 (the advantage is a sum of such terms times weights in (0, 2))."""
    r = case.rewards.double().reshape(-1)
    valid = (torch.ones_like(r, dtype=torch.bool) if case.mask is None
             else case.mask.reshape(-1))
    ids = (case.group_ids if case.group_ids is not None
           else torch.arange(case.rewards.shape[0]).repeat_interleave(case.rewards.shape[1]))
    out = torch.zeros_like(r)
    for g in ids.unique():
        members = ((ids == g) & valid).nonzero().ravel()
        n = members.numel()
        if n < 2:
            continue
        rg = r[members]
        scale = 2 * (rg[:, None] - rg[None, :]).abs().sum(1)
        if case.normalize != "none":
            scale = scale / (n - 1)
        if case.normalize == "std":
            scale = scale / (rg.std(unbiased=False) + 1e-6)
        out[members] = scale
    return out.view(case.rewards.shape)


def compare_advantages(case: AdvantageCase, cpu, device) -> None:
    # Each side sums float partials of at most 128 pair terms (error below 8e-6 of the terms'
    # magnitudes) with its own exp; the factored CUDA form adds up to 2e-5 relative per term.
    bound = 4e-5 * _pair_magnitude(case) + 1e-6
    assert device.dtype == cpu.dtype == torch.float32 and device.shape == cpu.shape
    excess = (device.double() - cpu.double()).abs() - bound
    assert not excess.isnan().any() and (excess <= 0).all(), (
        f"advantages differ past the bound by up to {excess.max().item():.3g}")


# The n-gram and LCS ops (and rouge_n / rouge_l / semantic_density on top of them).


@dataclass
class OverlapCase:
    cand: tuple  # (values, starts, lengths) int64
    ref: tuple
    ref_index: torch.Tensor
    max_n: int
    validate: bool


@st.composite
def overlap_cases(draw) -> OverlapCase:
    """Packed sequences at the kernels' size edges: LCS words (63, 64, 65 tokens), the
    n-gram op's shared table (1024, 1025) and the LCS registers (8192, 8193), empty ones,
    sequences cut from anywhere in their values (overlapping, out of order), shared
    references, and (unchecked) lengths, starts and ref_index outside their ranges."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    vocab = draw(st.sampled_from([2, 20, 5000]))
    edge_lengths = st.sampled_from([0, 1, 63, 64, 65, 1024, 1025, 8192, 8193])

    def sequences(count):
        lengths = [draw(st.one_of(st.integers(0, 200), edge_lengths)) for _ in range(count)]
        total = sum(lengths) + draw(st.integers(0, 50))
        values = torch.randint(0, vocab, (total,), generator=gen)
        if draw(st.booleans()):  # ids far apart, negative ones when unchecked
            values = values * (2**40 + 1)
        starts = [draw(st.integers(0, total - n)) for n in lengths]
        return values, torch.tensor(starts, dtype=torch.int64), torch.tensor(lengths)

    batch, num_refs = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    cand, ref = sequences(batch), sequences(num_refs)
    ref_index = torch.tensor([draw(st.integers(0, num_refs - 1)) for _ in range(batch)])
    validate = draw(st.booleans())
    if not validate and draw(st.booleans()):  # bad values, trusted: the clipped input's counts
        cand = (cand[0] - vocab // 2, cand[1] - 3, cand[2] * 2 + 1)
        ref_index = ref_index * 2 - 1
    return OverlapCase(cand, ref, ref_index, draw(st.integers(1, 5)), validate)


def _packed(seqs: tuple, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, offsets) of the sequences values[start : start + length], packed."""
    values, starts, lengths = seqs
    parts = [values[s:s + n] for s, n in zip(starts.tolist(), lengths.tolist())]
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return torch.cat(parts).to(device), offsets.to(device)


def run_overlap(case: OverlapCase, device: str):
    """The raw ops' counts and lengths; with valid input also semantic_density (ROUGE-N and
    ROUGE-L) through the public function, on packed copies of the sequences."""
    args = [t.to(device) for t in (*case.cand, *case.ref, case.ref_index)]
    counts = torch.ops.lambdapo.ngram_overlap(*args, case.max_n, case.validate)
    lcs = torch.ops.lambdapo.lcs_length(*args, case.validate)
    out = [t.cpu() for t in (*counts, *lcs)]
    if case.validate:
        cand, ref = _packed(case.cand, device), _packed(case.ref, device)
        for metric in ("rouge_n", "rouge_l"):
            out.append(lambdapo_ext.semantic_density(cand, ref, metric=metric, max_n=case.max_n,
                                                     ref_index=args[6]).cpu())
    return out


def compare_overlap(case: OverlapCase, cpu, device) -> None:
    for k, (c, d) in enumerate(zip(cpu, device)):
        if c.dtype == torch.int64:
            assert torch.equal(d, c), f"output {k}: counts differ"
        else:
            assert_agree(d, c, f"output {k}", rtol=1e-6, atol=1e-7)


DIFFERENTIAL = {  # op -> (cases, run, compare, the kernel whose CUDA registration it needs)
    "token_logprobs": (token_logprobs_cases, run_token_logprobs, compare_token_logprobs,
                       "token_logprobs_forward"),
    "linear_token_logprobs": (linear_cases, run_linear, compare_linear,
                              "linear_token_logprobs_forward"),
    "linear_policy_loss": (policy_loss_cases, run_policy_loss, compare_policy_loss,
                           "linear_policy_loss_forward"),
    "lambda_advantages": (advantage_cases, run_advantages, compare_advantages,
                          "lambda_advantages"),
    "overlap": (overlap_cases, run_overlap, compare_overlap, "ngram_overlap"),
}


def _differential_test(name: str, device: str, examples: int):
    cases, run, compare, _ = DIFFERENTIAL[name]

    @_settings(examples)
    @given(case=cases())
    def check(case):
        compare(case, run(case, "cpu"), run(case, device))

    return check


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(DIFFERENTIAL))
def test_cuda_matches_cpu(name):
    if not cuda_available_for(DIFFERENTIAL[name][3]):
        pytest.skip(f"needs a GPU and the CUDA kernel of lambdapo::{DIFFERENTIAL[name][3]}")
    _differential_test(name, "cuda", EXAMPLES)()


@pytest.mark.parametrize("name", list(DIFFERENTIAL))
def test_harness_runs_with_the_cpu_standing_in(name):
    """Every generator, run and comparison, with the CPU on both sides (few examples)."""
    _differential_test(name, "cpu", 6)()


def run_token_logprobs_emulated(case: TokenLogprobsCase):
    """run_token_logprobs's outputs from the numpy emulation of the CUDA kernels (rows
    flattened to [R, V]: a row's path may differ from the CUDA run's, its values may not)."""
    logits = case.layout.view(case.base, case.vocab)
    rows, targets = logits.reshape(-1, case.vocab), case.targets.reshape(-1)
    lp, h, lse = emu.token_logprobs_forward(rows, targets, temperature=case.temperature,
                                            ignore_index=case.ignore_index, entropy=True)
    upstream = case.upstream.reshape(2, -1).numpy().astype(lp.dtype)
    dz = emu.token_logprobs_backward(rows, targets, upstream[0],
                                     upstream[1] if case.entropy else None, lse, h,
                                     temperature=case.temperature,
                                     ignore_index=case.ignore_index)
    grad = torch.zeros_like(case.base)
    grad_view = case.layout.view(grad, case.vocab)
    grad_view.copy_(torch.from_numpy(dz).to(grad.dtype).view(grad_view.shape))
    lead = case.targets.shape
    return (torch.from_numpy(lp).view(lead),
            torch.from_numpy(h).view(lead) if case.entropy else None, grad)


@_settings(12)
@given(case=token_logprobs_cases())
def test_token_logprobs_emulation_stands_in_for_cuda(case):
    """The token_logprobs comparison with the numpy emulation of the CUDA kernels in the
    GPU's place: a preview, on the CPU, of what the GPU run checks."""
    compare_token_logprobs(case, run_token_logprobs(case, "cpu"),
                           run_token_logprobs_emulated(case))
