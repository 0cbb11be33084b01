"""validate=False: no host synchronisation (CUDA, under torch.cuda.set_sync_debug_mode("error")
and inside a CUDA-graph capture), the same results as validate=True on valid input, and
validate=True still rejecting bad values."""

from __future__ import annotations

import contextlib
import random

import pytest
import torch

import lambdapo_ext as ops
from bad_inputs_overlap import MAX_REFERENCE_TOKENS, clipped_sequences
from tests.conftest import skip_without_cuda


def _token_logprobs_case(device, *, entropy=False, inplace=False, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 5, 300, generator=gen) * 3).to(dtype).to(device)
    targets = torch.randint(0, 300, (6, 5), generator=gen).to(device)
    targets[0, 1] = -100
    upstream = torch.randn(2, 6, 5, generator=gen).to(device)
    return logits, targets, upstream


def token_logprobs_step(logits, targets, upstream, *, validate, entropy=False, inplace=False):
    """Forward and backward; returns (outputs..., grad of logits)."""
    x = logits.detach().clone().requires_grad_(True)
    # The in-place backward writes over its input, so it gets a non-leaf copy.
    inp = x * 1.0 if inplace else x
    out = ops.token_logprobs(inp, targets, return_entropy=entropy, inplace_backward=inplace,
                             validate=validate)
    outs = out if entropy else (out,)
    loss = sum((o * g).sum() for o, g in zip(outs, upstream))
    loss.backward()
    return (*[o.detach() for o in outs], x.grad)


def _linear_case(device):
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(4, 7, 16, generator=gen).to(device)
    weight = (torch.randn(90, 16, generator=gen) * 0.3).to(device)
    bias = torch.randn(90, generator=gen).to(device)
    targets = torch.randint(0, 90, (4, 7), generator=gen).to(device)
    targets[1, 2] = -100
    upstream = torch.randn(4, 7, generator=gen).to(device)
    return hidden, weight, bias, targets, upstream


def linear_step(hidden, weight, bias, targets, upstream, *, validate, chunk_size=None):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    b = bias.detach().clone().requires_grad_(True)
    lp, ent = ops.linear_token_logprobs(h, w, targets, bias=b, return_entropy=True,
                                        chunk_size=chunk_size, validate=validate)
    ((lp * upstream).sum() + ent.sum()).backward()
    return lp.detach(), ent.detach(), h.grad, w.grad, b.grad


ADVANTAGE_CASES = ("small", "large-masked-std", "ragged", "ragged-large-masked-std")


def _advantage_cases(device):
    """(kwargs of lambda_advantages) for each of ADVANTAGE_CASES: small dense groups, large
    dense groups with a mask, ragged groups of about 22 members, and ragged groups of 65 to
    300 members (past the CUDA member kernel's dense limit of 64) in shuffled order."""
    gen = torch.Generator().manual_seed(2)
    small = dict(rewards=torch.randint(0, 2, (33, 8), generator=gen).float(),
                 scores=-torch.rand(33, 8, generator=gen) * 2)
    large = dict(rewards=torch.randn(3, 300, generator=gen),
                 scores=-torch.rand(3, 300, generator=gen) * 5,
                 mask=torch.rand(3, 300, generator=gen) > 0.2, normalize="std")
    ids = torch.randint(0, 9, (200,), generator=gen) * 4
    ragged = dict(rewards=torch.randn(200, generator=gen), scores=-torch.rand(200, generator=gen),
                  group_ids=ids, beta=3.0)
    sizes = torch.cat([torch.tensor([65, 300]), torch.randint(66, 300, (4,), generator=gen)])
    big_ids = torch.repeat_interleave(torch.arange(6) * 5 + 2, sizes)
    big_ids = big_ids[torch.randperm(big_ids.numel(), generator=gen)]
    n = big_ids.numel()
    ragged_large = dict(rewards=torch.randn(n, generator=gen),
                        scores=-torch.rand(n, generator=gen) * 5,
                        mask=torch.rand(n, generator=gen) > 0.1, group_ids=big_ids, beta=2.0,
                        normalize="std")
    return [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in case.items()}
            for case in (small, large, ragged, ragged_large)]


def _overlap_case(device):
    gen = torch.Generator().manual_seed(3)
    cand = torch.randint(0, 20, (6, 40), generator=gen).to(device)
    cand_len = torch.tensor([40, 0, 13, 27, 40, 5]).to(device)
    ref_values = torch.randint(0, 20, (70,), generator=gen).to(device)
    ref_offsets = torch.tensor([0, 31, 70]).to(device)
    ref_index = torch.tensor([0, 1, 1, 0, 1, 0]).to(device)
    return (cand, cand_len), (ref_values, ref_offsets), ref_index


OVERLAP_OPS = {
    "ngram_overlap": lambda c, r, i, v: ops.ngram_overlap(c, r, max_n=3, ref_index=i, validate=v),
    "lcs_length": lambda c, r, i, v: (ops.lcs_length(c, r, ref_index=i, validate=v),),
    "rouge_n": lambda c, r, i, v: ops.rouge_n(c, r, ref_index=i, validate=v),
    "rouge_l": lambda c, r, i, v: ops.rouge_l(c, r, ref_index=i, validate=v),
    "semantic_density": lambda c, r, i, v: (ops.semantic_density(c, r, ref_index=i, validate=v),),
}


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


# CPU (and CUDA): validate=False changes nothing on valid input.

DEVICES = ["cpu", pytest.param("cuda", marks=skip_without_cuda("token_logprobs_forward"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entropy,inplace", [(False, False), (True, False), (True, True)])
def test_token_logprobs_unvalidated_is_identical(device, entropy, inplace):
    case = _token_logprobs_case(device)
    checked = token_logprobs_step(*case, validate=True, entropy=entropy, inplace=inplace)
    trusted = token_logprobs_step(*case, validate=False, entropy=entropy, inplace=inplace)
    assert_same(checked, trusted)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk_size", [5, None])
def test_linear_token_logprobs_unvalidated_is_identical(device, chunk_size):
    case = _linear_case(device)
    assert_same(linear_step(*case, validate=True, chunk_size=chunk_size),
                linear_step(*case, validate=False, chunk_size=chunk_size))


@pytest.mark.parametrize("device", DEVICES)
def test_lambda_advantages_unvalidated_is_identical(device):
    for case in _advantage_cases(device):
        assert_same((ops.lambda_advantages(**case, validate=True),),
                    (ops.lambda_advantages(**case, validate=False),))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OVERLAP_OPS)
def test_overlap_unvalidated_is_identical(device, name):
    case = _overlap_case(device)
    assert_same(OVERLAP_OPS[name](*case, True), OVERLAP_OPS[name](*case, False))


# validate=True still rejects bad values; validate=False trusts them without crashing.

def test_validated_token_logprobs_rejects_out_of_range_targets():
    logits, targets, _ = _token_logprobs_case("cpu")
    targets[2, 3] = 300
    with pytest.raises(ValueError, match="targets must lie in"):
        ops.token_logprobs(logits, targets)
    lp = ops.token_logprobs(logits, targets, validate=False)
    assert torch.isnan(lp[2, 3])  # trusted, but never read out of bounds
    assert torch.isfinite(lp[targets != 300]).all()


def test_validated_token_logprobs_backward_rejects_out_of_range_targets():
    logits, targets, _ = _token_logprobs_case("cpu")
    lp, _, lse = torch.ops.lambdapo.token_logprobs_forward(logits, targets, 1.0, -100, False,
                                                           False)
    bad = targets.clone()
    bad[0, 0] = -5
    args = (torch.ones_like(lp), None, logits, bad, lse, torch.empty(0), 1.0, -100)
    with pytest.raises(ValueError, match="targets must lie in"):
        torch.ops.lambdapo.token_logprobs_backward(*args, True)
    grad = torch.ops.lambdapo.token_logprobs_backward(*args, False)
    assert torch.isfinite(grad).all()


def test_validated_linear_token_logprobs_rejects_out_of_range_targets():
    hidden, weight, bias, targets, _ = _linear_case("cpu")
    targets[0, 0] = 90
    with pytest.raises(ValueError, match="targets must lie in"):
        ops.linear_token_logprobs(hidden, weight, targets, bias=bias)
    lp = ops.linear_token_logprobs(hidden, weight, targets, bias=bias, validate=False)
    assert torch.isnan(lp[0, 0]) and torch.isfinite(lp.view(-1)[1:]).all()


@pytest.mark.parametrize("field,value,message", [
    ("rewards", float("nan"), "rewards holds non-finite"),
    ("scores", float("inf"), "scores holds non-finite"),
])
def test_validated_lambda_advantages_rejects_non_finite(field, value, message):
    case = _advantage_cases("cpu")[0]
    case[field] = case[field].clone()
    case[field][4, 2] = value
    with pytest.raises(ValueError, match=message):
        ops.lambda_advantages(**case)
    out = ops.lambda_advantages(**case, validate=False)
    assert out[4].isnan().any() and torch.isfinite(out[5:]).all()


def test_validated_lambda_advantages_rejects_negative_group_ids():
    case = _advantage_cases("cpu")[2]
    case["group_ids"] = case["group_ids"] - 4  # group -4 is still a group when trusted
    with pytest.raises(ValueError, match="group_ids must be non-negative"):
        ops.lambda_advantages(**case)
    shifted = dict(case, group_ids=case["group_ids"] + 4)
    assert_same((ops.lambda_advantages(**case, validate=False),),
                (ops.lambda_advantages(**shifted),))


@pytest.mark.parametrize("name", OVERLAP_OPS)
def test_validated_overlap_rejects_bad_lengths_and_ref_index(name):
    cand, ref, ref_index = _overlap_case("cpu")
    with pytest.raises(ValueError, match="lengths must lie in"):
        OVERLAP_OPS[name]((cand[0], cand[1] + 1), ref, ref_index, True)
    with pytest.raises(ValueError, match="ref_index must lie in"):
        OVERLAP_OPS[name](cand, ref, ref_index + 2, True)


# validate=False on the overlap ops: bad offsets, lengths, ref_index or ids give the result of
# the clipped input (csrc/sequence_overlap.h), never an out-of-bounds access.

def _random_unchecked_overlap(rng: random.Random):
    """Raw op arguments with values of every kind: starts and lengths negative, past the end
    or near 2^63 (start + length overflows), ref_index outside [0, R), negative ids, no ids."""
    def edge(low, high):
        return rng.choice([rng.randint(low, high), rng.randint(low, high),
                           rng.choice([-2**62, 2**62, -2**63, 2**63 - 1])])

    def sequences(count):
        total = rng.choice([0, rng.randint(1, 60)])
        values = [rng.randint(-3, 6) for _ in range(total)]
        starts = [edge(-5, total + 5) for _ in range(count)]
        lengths = [edge(-5, total + 5) for _ in range(count)]
        return [torch.tensor(x, dtype=torch.int64) for x in (values, starts, lengths)]

    batch, num_refs = rng.randint(0, 7), rng.randint(0, 4)
    ref_index = torch.tensor([edge(-2, num_refs + 2) for _ in range(batch)], dtype=torch.int64)
    return sequences(batch), sequences(num_refs), ref_index


def _unchecked_overlap_expected(cand, ref, ref_index, max_n):
    """The validated ops on the clipped sequences (ids renamed to non-negative ones)."""
    cands, refs = clipped_sequences(*cand), clipped_sequences(*ref, MAX_REFERENCE_TOKENS)
    paired = [refs[i] if 0 <= i < len(refs) else [] for i in ref_index.tolist()]
    low = min([0] + [t for seq in cands + paired for t in seq])
    cands, paired = ([[t - low for t in seq] for seq in seqs] for seqs in (cands, paired))
    counts = ops.ngram_overlap(cands, paired, max_n=max_n)
    lengths = (torch.tensor([len(c) for c in cands], dtype=torch.int64),
               torch.tensor([len(r) for r in paired], dtype=torch.int64))
    return counts, (ops.lcs_length(cands, paired), *lengths)


@pytest.mark.parametrize("device", DEVICES)
def test_unchecked_bad_overlap_inputs_give_the_clipped_result(device):
    rng = random.Random(17)
    for _ in range(300):
        cand, ref, ref_index = _random_unchecked_overlap(rng)
        max_n = rng.randint(1, 4)
        args = [t.to(device) for t in (*cand, *ref, ref_index)]
        counts = torch.ops.lambdapo.ngram_overlap(*args, max_n, False)
        lcs = torch.ops.lambdapo.lcs_length(*args, False)
        expected_counts, expected_lcs = _unchecked_overlap_expected(cand, ref, ref_index, max_n)
        assert_same(tuple(t.cpu() for t in counts), expected_counts)
        assert_same(tuple(t.cpu() for t in lcs), expected_lcs)


@pytest.mark.parametrize("device", DEVICES)
def test_unchecked_and_checked_overlap_agree_where_the_input_is_valid(device):
    """The clipping changes nothing on valid input, long references too (past the n-gram
    op's shared-memory table and the LCS's registers: the second CUDA launch)."""
    gen = torch.Generator().manual_seed(5)
    ref_lengths = torch.tensor([0, 1, 1100, 9000])
    cand_lengths = torch.tensor([5, 0, 1100, 8000, 300])
    ref = (torch.randint(0, 9, (int(ref_lengths.sum()),), generator=gen).to(device),
           torch.cat([torch.zeros(1, dtype=torch.int64), ref_lengths.cumsum(0)]).to(device))
    cand = (torch.randint(0, 9, (int(cand_lengths.sum()),), generator=gen).to(device),
            torch.cat([torch.zeros(1, dtype=torch.int64), cand_lengths.cumsum(0)]).to(device))
    ref_index = torch.tensor([3, 0, 2, 3, 1]).to(device)
    for fn in (lambda v: ops.ngram_overlap(cand, ref, max_n=3, ref_index=ref_index, validate=v),
               lambda v: ops.rouge_l(cand, ref, ref_index=ref_index, validate=v)):
        assert_same(fn(True), fn(False))


# CUDA: no host sync, and capturable in a CUDA graph.

@contextlib.contextmanager
def sync_debug_error():
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def run_without_sync(fn):
    """fn() once to warm up (lazy initialisation may sync), then again where any host sync
    raises; returns the second result."""
    fn()
    torch.cuda.synchronize()
    with sync_debug_error():
        out = fn()
    torch.cuda.synchronize()
    return out


def run_in_cuda_graph(fn):
    """Captures fn() in a CUDA graph (after the warm-up on a side stream that capture
    needs), replays it and returns the replayed outputs, with an eager run to compare."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            eager = fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn()
    graph.replay()
    torch.cuda.synchronize()
    return eager, static_out


def _cuda_sync_free_cases():
    """name -> a step over CUDA inputs made once (a host-to-device copy inside the step
    would itself be a sync, and is not allowed in a capture)."""
    cases = {}
    for entropy, inplace in [(False, False), (True, False), (True, True)]:
        for dtype in (torch.float32, torch.bfloat16):
            case = _token_logprobs_case("cuda", dtype=dtype)
            cases[f"token_logprobs-entropy{entropy}-inplace{inplace}-{str(dtype)[6:]}"] = (
                lambda c=case, e=entropy, i=inplace: token_logprobs_step(
                    *c, validate=False, entropy=e, inplace=i))
    linear = _linear_case("cuda")
    cases["linear_token_logprobs"] = lambda: linear_step(*linear, validate=False)
    cases["linear_token_logprobs-chunked"] = lambda: linear_step(*linear, validate=False,
                                                                 chunk_size=5)
    for case, label in zip(_advantage_cases("cuda"), ADVANTAGE_CASES):
        cases[f"lambda_advantages-{label}"] = (
            lambda c=case: (ops.lambda_advantages(**c, validate=False),))
    overlap = _overlap_case("cuda")
    for name, fn in OVERLAP_OPS.items():
        cases[name] = lambda fn=fn: fn(*overlap, False)
    # Bad values, unchecked: clipped on the device, still no sync.
    (cand, cand_len), (ref_values, ref_offsets), ref_index = overlap
    bad = ((cand, cand_len * 3 - 20), (ref_values, ref_offsets.flip(0)), ref_index * 7 - 3)
    for name, fn in OVERLAP_OPS.items():
        cases[f"{name}-bad-values"] = lambda fn=fn: fn(*bad, False)
    # References longer than the shared n-gram table and the LCS's registers (second launch).
    long_ref = torch.randint(0, 5, (9000,), generator=torch.Generator().manual_seed(4)).cuda()
    long = ((cand, cand_len), (long_ref, torch.tensor([0, 9000, 9000]).cuda()),
            torch.tensor([0, 1, 0, 0, 1, 0]).cuda())
    for name, fn in OVERLAP_OPS.items():
        cases[f"{name}-long-reference"] = lambda fn=fn: fn(*long, False)
    # The same in a bank of over 2^22 ids (an unused reference): the pools are sized from that
    # shape, the strides from the device.
    bank = torch.cat([long_ref, torch.zeros(2**22 + 1, dtype=torch.int64, device="cuda")])
    banked = ((cand, cand_len), (bank, torch.tensor([0, 9000, 9000, bank.numel()]).cuda()),
              long[2])
    for name, fn in OVERLAP_OPS.items():
        cases[f"{name}-long-reference-bank"] = lambda fn=fn: fn(*banked, False)
    return cases


@pytest.fixture(scope="module")
def cuda_steps():
    return _cuda_sync_free_cases()


SYNC_FREE_CASES = [
    pytest.param(name, id=name)
    for name in [f"token_logprobs-entropy{e}-inplace{i}-{d}"
                 for e, i in [(False, False), (True, False), (True, True)]
                 for d in ("float32", "bfloat16")]
    + ["linear_token_logprobs", "linear_token_logprobs-chunked"]
    + [f"lambda_advantages-{label}" for label in ADVANTAGE_CASES] + list(OVERLAP_OPS)
    + [f"{name}-{kind}" for kind in ("bad-values", "long-reference", "long-reference-bank")
       for name in OVERLAP_OPS]
]


@skip_without_cuda("token_logprobs_forward")
@pytest.mark.parametrize("name", SYNC_FREE_CASES)
def test_unvalidated_op_makes_no_host_sync(name, cuda_steps):
    out = run_without_sync(cuda_steps[name])
    assert all(t.is_cuda for t in out)


@skip_without_cuda("token_logprobs_forward")
@pytest.mark.parametrize("name", SYNC_FREE_CASES)
def test_unvalidated_op_captures_in_a_cuda_graph(name, cuda_steps):
    eager, replayed = run_in_cuda_graph(cuda_steps[name])
    for e, r in zip(eager, replayed):
        torch.testing.assert_close(r, e, rtol=1e-5, atol=1e-5)
