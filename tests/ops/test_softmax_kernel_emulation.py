"""The numpy emulation of the CUDA log-prob kernels' fold and merge logic
(softmax_kernel_emulation.py) against the CPU kernels, with NaN, +-inf and extreme values at
every position class of the CUDA work split (and of the CPU blocks), forward and backward,
with and without entropy; and the CPU kernels themselves against a float64 reference on the
same placements.

The contract both devices keep: a NaN or +inf logit in a kept row makes that row's lse,
log-prob and entropy NaN, and its whole gradient NaN (with or without an entropy gradient);
-inf logits take no probability and get a zero gradient; ignored rows give 0 and get 0."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import softmax_kernel_emulation as emu

IGNORE = -100
DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def layout_logits(layout: str, dtype: torch.dtype, rows: int) -> torch.Tensor:
    """Random logits [rows, V] laid out as ``layout``:

    * "vectorized": contiguous, V a multiple of the vector width and long enough for the
      forward's four-vector loop, its one-vector tail and several backward chunks;
    * "odd": V = 1001, the scalar path;
    * "misaligned": rows of a [rows, 1001] tensor sliced [:, 1:] (V = 1000), so that rows
      start on and off 16-byte boundaries;
    * "narrow": V = 40, fewer vectors than threads."""
    gen = torch.Generator().manual_seed(0)
    vec = emu.vector_width(dtype)
    vocab = {"vectorized": vec * (emu.FORWARD_LOADS * emu.THREADS + 300), "odd": 1001,
             "misaligned": 1001, "narrow": 40}[layout]
    logits = (torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * 3).to(dtype)
    return logits[:, 1:] if layout == "misaligned" else logits


def placed_rows(layout: str, dtype: torch.dtype, value: float, positions: dict[str, int]):
    """(logits [R, V], targets [R], row names): the row named after a position holds
    ``value`` at that column; "all-special" holds it everywhere (left out for magnitudes
    above 1e4, whose rounding alone moves a log-prob by more than 1); "minus-inf-prefix"
    holds it at column 0 with -inf up to the first CPU block edge (or V/2), so that it meets
    states and blocks that saw only -inf; "clean" and "ignored" (target ignore_index) hold
    none."""
    names = list(positions)
    if not (math.isfinite(value) and abs(value) > 1e4):
        names.append("all-special")
    names += ["minus-inf-prefix", "clean", "ignored"]
    logits = layout_logits(layout, dtype, len(names))
    for row, column in enumerate(positions.values()):
        logits[row, column] = value
    if "all-special" in names:
        logits[names.index("all-special")] = value
    vocab = logits.shape[-1]
    prefix = names.index("minus-inf-prefix")
    logits[prefix, :emu.CPU_BLOCK if vocab > emu.CPU_BLOCK else vocab // 2] = -math.inf
    logits[prefix, 0] = value
    gen = torch.Generator().manual_seed(1)
    targets = torch.randint(vocab // 2, vocab, (len(names),), generator=gen)
    targets[names.index("ignored")] = IGNORE
    return logits, targets, names


def forward_positions(layout: str, dtype: torch.dtype) -> dict[str, int]:
    logits = layout_logits(layout, dtype, 1)
    vectorized = layout in ("vectorized", "narrow") and emu.row_is_vectorized(logits, 0)
    return emu.token_logprobs_positions(logits.shape[-1], emu.vector_width(dtype), vectorized)


def assert_same_specials_and_close(got, expected, names, what: str, **tol) -> None:
    """Row by row: NaN exactly where ``expected`` has NaN, +-inf where it has them, finite
    values within ``tol``. ``got`` and ``expected`` are [rows] or [rows, V]."""
    got, expected = (torch.as_tensor(np.asarray(x)).double() for x in (got, expected))
    for row, name in enumerate(names):
        g, e = got[row].reshape(-1), expected[row].reshape(-1)
        differ = (g.isnan() != e.isnan()).nonzero().ravel().tolist()
        assert not differ, (f"{what}, row {name}: NaN in one but not the other at columns "
                            f"{differ[:8]}: got {g[differ[:8]].tolist()}, expected "
                            f"{e[differ[:8]].tolist()}")
        torch.testing.assert_close(g, e, equal_nan=True, **tol,
                                   msg=lambda m: f"{what}, row {name}: {m}")


def tolerances(dtype: torch.dtype, value: float) -> tuple[dict, dict]:
    """(forward, gradient) tolerances between the emulation and the CPU kernel. A logit of
    magnitude |v| carries a rounding error of about ulp(2 |v|) in the scaled logit (x / T or
    x log2(e) / T), so log-probs differ by that much and probabilities by that, relatively."""
    scaled = 2 * abs(value) if math.isfinite(value) and abs(value) <= 1e4 else 0.0
    rounding = 4 * float(np.spacing(np.float64(scaled) if dtype == torch.float64
                                    else np.float32(scaled)))
    if dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-10 + rounding), dict(rtol=1e-9 + rounding, atol=1e-12)
    grad_rtol = (1e-2 if dtype == torch.bfloat16 else 1e-4) + rounding
    return dict(rtol=1e-5, atol=1e-5 + rounding), dict(rtol=grad_rtol, atol=1e-6)


# token_logprobs


@pytest.mark.parametrize("entropy", [False, True], ids=["logprobs", "entropy"])
@pytest.mark.parametrize("special", list(emu.special_values(torch.float32)))
@pytest.mark.parametrize("layout", ["vectorized", "odd", "misaligned", "narrow"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_logprobs_emulation_matches_cpu(dtype, layout, special, entropy):
    value = emu.special_values(dtype)[special]
    logits, targets, names = placed_rows(layout, dtype, value, forward_positions(layout, dtype))
    temperature = 0.7
    lp, h, lse = torch.ops.lambdapo.token_logprobs_forward(logits, targets, temperature, IGNORE,
                                                           entropy, False)
    e_lp, e_h, e_lse = emu.token_logprobs_forward(logits, targets, temperature=temperature,
                                                  ignore_index=IGNORE, entropy=entropy)
    fwd_tol, grad_tol = tolerances(dtype, value)
    assert_same_specials_and_close(e_lp, lp, names, "log-prob", **fwd_tol)
    assert_same_specials_and_close(e_lse, lse, names, "lse", **fwd_tol)
    if entropy:
        assert_same_specials_and_close(e_h, h, names, "entropy", **fwd_tol)

    gen = torch.Generator().manual_seed(2)
    g_lp, g_h = torch.randn(2, len(names), generator=gen).to(lp.dtype)
    g_h = g_h if entropy else None
    grad = torch.ops.lambdapo.token_logprobs_backward(g_lp, g_h, logits, targets, lse, h,
                                                      temperature, IGNORE)
    e_grad = emu.token_logprobs_backward(logits, targets, g_lp.numpy(),
                                         None if g_h is None else g_h.numpy(), e_lse, e_h,
                                         temperature=temperature, ignore_index=IGNORE)
    assert_same_specials_and_close(e_grad, grad.double(), names, "gradient", **grad_tol)


@pytest.mark.parametrize("layout", ["vectorized", "odd", "narrow"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_logprobs_backward_writes_every_column_once(dtype, layout):
    logits = layout_logits(layout, dtype, 1)
    vectorized = emu.row_is_vectorized(logits, 0)
    writes = emu.token_logprobs_backward_columns(logits.shape[-1], emu.vector_width(dtype),
                                                 vectorized)
    assert (writes == 1).all()


def test_forward_folds_cover_every_column_once():
    for vocab, vec, vectorized in [(5296, 4, True), (10592, 8, True), (1001, 4, False),
                                   (40, 8, True), (7, 2, False), (4096 * 4, 4, True)]:
        seen = np.zeros(vocab, np.int64)
        for columns, active in emu.forward_fold_batches(vocab, vec, vectorized):
            np.add.at(seen, columns[active].ravel(), 1)
        assert (seen == 1).all(), (vocab, vec, vectorized)


@pytest.mark.parametrize("with_entropy_grad", [False, True])
def test_token_logprobs_backward_at_a_nan_logit_with_finite_lse(with_entropy_grad):
    """The backward op given a NaN logit but a finite lse (as a forward that missed the NaN
    would hand it): NaN at that logit only, on the CPU kernel and in the emulation."""
    logits = layout_logits("odd", torch.float32, 2)
    targets = torch.tensor([3, 9])
    lp, h, lse = torch.ops.lambdapo.token_logprobs_forward(logits, targets, 1.0, IGNORE, True,
                                                           False)
    logits[0, 17] = math.nan
    g_lp, g_h = torch.ones(2), (torch.ones(2) if with_entropy_grad else None)
    grad = torch.ops.lambdapo.token_logprobs_backward(g_lp, g_h, logits, targets, lse, h, 1.0,
                                                      IGNORE)
    e_grad = emu.token_logprobs_backward(logits, targets, g_lp.numpy(),
                                         None if g_h is None else g_h.numpy(), lse.numpy(),
                                         h.numpy(), temperature=1.0, ignore_index=IGNORE)
    expected = torch.zeros_like(grad, dtype=torch.bool)
    expected[0, 17] = True
    assert torch.equal(grad.isnan(), expected)
    assert torch.equal(torch.from_numpy(np.isnan(e_grad)), expected)


# linear_token_logprobs: logits = hidden [R, 1] of ones times weight [V, 1] (exact), so a
# value placed in the weight is that logit on every row, and grad_weight[:, 0] is the sum
# of dlogits over the rows.

LINEAR_TILES = {  # layout -> (V, vocab_chunk_size)
    "one-tile-vectorized": (1000, 1000), "tiles-odd": (1001, 300),
    "tiles-vectorized-wide": (5000, 2504), "tiles-narrow": (70, 16)}


def linear_rows(dtype: torch.dtype, layout: str, value: float | None, column: int | None):
    """(hidden [R, 1], weight [V, 1], targets [R]): three kept rows and an ignored one."""
    vocab, _ = LINEAR_TILES[layout]
    gen = torch.Generator().manual_seed(3)
    weight = (torch.randn(vocab, 1, generator=gen, dtype=torch.float64) * 3).to(dtype)
    if value is not None:
        weight[column] = value
    hidden = torch.ones(4, 1, dtype=dtype)
    targets = torch.tensor([0, vocab - 1, vocab // 2, IGNORE])
    return hidden, weight, targets


# bfloat16 matmuls are slow on CPUs without bf16 units (60 ms a call here): its finite values
# run with the slow tests only.
LINEAR_CASES = [
    pytest.param(dtype, special, id=f"{dtype}-{special}",
                 marks=[pytest.mark.slow] if dtype == torch.bfloat16 and special not in (
                     "nan", "inf", "-inf", "all-minus-inf") else [])
    for dtype in DTYPES for special in [*emu.special_values(torch.float32), "all-minus-inf"]]


@pytest.mark.parametrize("dtype,special", LINEAR_CASES)
@pytest.mark.parametrize("layout", list(LINEAR_TILES))
def test_linear_token_logprobs_emulation_matches_cpu(dtype, layout, special):
    """One CPU call per position (the value sits in every row's logits), the emulation of
    all positions' rows at once; backward with and without an entropy gradient."""
    vocab, vocab_chunk = LINEAR_TILES[layout]
    temperature = 1.3
    value = emu.special_values(dtype).get(special, -math.inf)
    columns = emu.linear_positions(vocab, emu.vector_width(dtype), vocab_chunk)
    if special == "all-minus-inf":
        columns = {"all": slice(None)}
    fwd_tol, grad_tol = tolerances(dtype, value)
    if dtype == torch.bfloat16:
        # grad_weight sums the rows' bfloat16 dlogits and rounds again: with terms of opposite
        # signs the error is a rounding of the terms, not of the sum.
        grad_tol["atol"] = 1e-4
    g_lp = torch.tensor([1.0, -0.5, 2.0, 1.0], dtype=torch.float64 if dtype == torch.float64
                        else torch.float32)
    g_h = torch.tensor([0.5, 1.0, -1.0, 1.0], dtype=g_lp.dtype)
    cpu, logits, targets = [], [], []
    for column in columns.values():
        hidden, weight, row_targets = linear_rows(dtype, layout, value, column)
        lp, h, lse = torch.ops.lambdapo.linear_token_logprobs_forward(
            hidden, weight, None, row_targets, temperature, IGNORE, True, 4, vocab_chunk)
        grads = [torch.ops.lambdapo.linear_token_logprobs_backward(
            g_lp, grad_h, hidden, weight, None, row_targets, lse, h, temperature, IGNORE, 4,
            vocab_chunk, [False, True, False])[1][:, 0].double() for grad_h in (None, g_h)]
        cpu.append((lp, h, lse, *grads))
        logits.append(hidden @ weight.t())
        targets.append(row_targets)
    logits, targets = torch.cat(logits), torch.cat(targets)
    e_lp, e_h, e_lse = emu.linear_token_logprobs_forward(
        logits, targets, temperature=temperature, ignore_index=IGNORE,
        vocab_chunk_size=vocab_chunk)
    rows = len(columns) * 4
    e_grads = [emu.linear_token_logprobs_backward(
        logits, targets, g_lp.repeat(rows // 4).numpy(),
        None if grad_h is None else grad_h.repeat(rows // 4).numpy(), e_lse, e_h,
        temperature=temperature, ignore_index=IGNORE) for grad_h in (None, g_h)]
    for k, name in enumerate(columns):
        mine = slice(4 * k, 4 * k + 4)
        lp, h, lse, *grads = cpu[k]
        names = [f"{name} row {r}" for r in range(4)]
        assert_same_specials_and_close(e_lp[mine], lp, names, "log-prob", **fwd_tol)
        assert_same_specials_and_close(e_lse[mine], lse, names, "lse", **fwd_tol)
        assert_same_specials_and_close(e_h[mine], h, names, "entropy", **fwd_tol)
        for e_dlogits, grad, what in zip(e_grads, grads, ("without", "with")):
            # The emulated dlogits rounded to the weight's dtype and summed over the rows, as
            # grad_weight = dlogits^T @ hidden (hidden all ones) does.
            e_grad = torch.from_numpy(e_dlogits[mine]).to(dtype).double().sum(0)
            assert_same_specials_and_close(e_grad[None], grad[None], [name],
                                           f"grad_weight {what} entropy", **grad_tol)


@pytest.mark.parametrize("layout", list(LINEAR_TILES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_tiles_fold_and_write_every_column_once(dtype, layout):
    vocab, vocab_chunk = LINEAR_TILES[layout]
    vec = emu.vector_width(dtype)
    for col0 in range(0, vocab, vocab_chunk):
        cols = min(vocab_chunk, vocab - col0)
        seen = np.zeros(cols, np.int64)
        for column, active in emu.tile_fold_columns(cols, vec):
            np.add.at(seen, column[active], 1)
        assert (seen == 1).all()
        assert (emu.linear_tile_backward_columns(cols, vec) == 1).all()


# The CPU kernels on the same placements against float64 math.


def reference_rows(logits: torch.Tensor, targets: torch.Tensor, temperature: float, g_lp, g_h):
    """float64 (lp, H, dlogits) of kept rows whose logits are finite or -inf: p log p and
    its gradient are 0 where p = 0."""
    x = logits.double() / temperature
    log_p = torch.log_softmax(x, -1)
    p = log_p.exp()
    p_log_p = torch.where(p > 0, p * log_p, 0.0)
    h = -p_log_p.sum(-1)
    safe = targets.clamp(min=0)
    lp = log_p.gather(-1, safe[:, None])[:, 0]
    onehot = torch.nn.functional.one_hot(safe, logits.shape[-1]).double()
    grad = (g_lp.double()[:, None] * (onehot - p)
            - g_h.double()[:, None] * torch.where(p > 0, p * (log_p + h[:, None]), 0.0))
    return lp, h, grad / temperature


@pytest.mark.parametrize("special", list(emu.special_values(torch.float32)))
@pytest.mark.parametrize("layout", ["vectorized", "odd", "misaligned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_logprobs_cpu_special_values_against_float64(dtype, layout, special):
    value = emu.special_values(dtype)[special]
    logits, targets, names = placed_rows(layout, dtype, value, forward_positions(layout, dtype))
    kept = targets != IGNORE
    gen = torch.Generator().manual_seed(4)
    g_lp, g_h = torch.randn(2, len(names), generator=gen)
    x = logits.clone().requires_grad_(True)
    lp, h = torch.ops.lambdapo.token_logprobs_forward(x, targets, 0.7, IGNORE, True, False)[:2]
    (lp * g_lp + h * g_h).sum().backward()
    if math.isnan(value) or value == math.inf:
        # Every kept row holding the value is NaN throughout, gradient included.
        poisoned = kept.clone()
        poisoned[names.index("clean")] = False
        assert lp[poisoned].isnan().all() and h[poisoned].isnan().all()
        assert x.grad[poisoned].isnan().all()
        check = ~poisoned & kept
    else:
        check = kept.clone()
        if value == -math.inf:  # an all -inf row has no distribution: NaN, as in torch
            row = names.index("all-special")
            assert lp[row].isnan() and h[row].isnan() and x.grad[row].isnan().all()
            check[row] = False
    rlp, rh, rgrad = reference_rows(logits[check], targets[check], 0.7, g_lp[check], g_h[check])
    tol, grad_tol = tolerances(dtype, value)
    if dtype == torch.bfloat16:  # the gradient is rounded to bfloat16
        grad_tol["atol"] = 1e-4
    torch.testing.assert_close(lp[check].double(), rlp, **tol)
    torch.testing.assert_close(h[check].double(), rh, **tol)
    torch.testing.assert_close(x.grad[check].double(), rgrad, **grad_tol)
    assert (lp[~kept] == 0).all() and (x.grad[~kept] == 0).all()
