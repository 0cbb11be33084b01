"""One rank of the vocabulary-parallel checks in test_vocab_parallel.py (run under
torch.multiprocessing.spawn with the gloo backend): every case compares the sharded ops
with the single-process ops on the same full tensors, which every rank builds from one seed."""

import datetime

import torch
import torch.distributed as dist

import lambdapo_ext

IGNORE = -100
ROWS = (3, 5)
VOCAB = 48  # divisible by 1, 2, 3 and 4 ranks
WIDTH = 16
# An ignore_index inside every shard's local id range [0, VOCAB / world): the global targets
# r * VOCAB / world + INSIDE_SHARD_IGNORE are valid and must not be taken for ignored rows.
INSIDE_SHARD_IGNORE = 3


def _tolerance(dtype: torch.dtype) -> dict:
    # bf16 logits/gradients may round differently by one unit in the last place.
    return dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=2e-5, atol=2e-5)


def _inputs(dtype: torch.dtype, world: int, ignore_index: int = IGNORE):
    """(logits, targets, upstream grads, hidden, weight, bias). The targets hold ignore_index
    in two rows and, when ignore_index lies inside a shard, the ids that map onto it on every
    rank."""
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(*ROWS, VOCAB, generator=g) * 3).to(dtype)
    targets = torch.randint(0, VOCAB, ROWS, generator=g)
    targets[0, :2] = ignore_index
    targets[2, 4] = VOCAB - 1
    targets[1, 1] = 0
    if 0 <= ignore_index < VOCAB // world:  # valid ids whose shard-local id is ignore_index
        for r in range(1, world):
            targets[2, r - 1] = r * (VOCAB // world) + ignore_index
    grads = torch.randn(2, *ROWS, generator=g)
    hidden = torch.randn(*ROWS, WIDTH, generator=g).to(dtype)
    weight = (torch.randn(VOCAB, WIDTH, generator=g) / 2).to(dtype)
    bias = torch.randn(VOCAB, generator=g).to(dtype)
    return logits, targets, grads, hidden, weight, bias


def _backward(logprobs, entropy, grads):
    (logprobs * grads[0] + entropy * grads[1]).sum().backward()


def check_logits_op(rank: int, world: int, dtype: torch.dtype, inplace: bool,
                    ignore_index: int = IGNORE) -> None:
    logits, targets, grads, *_ = _inputs(dtype, world, ignore_index)
    shard = VOCAB // world
    full = logits.clone().requires_grad_()
    lp, h = lambdapo_ext.token_logprobs(full, targets, temperature=0.7, return_entropy=True,
                                        ignore_index=ignore_index)
    _backward(lp, h, grads)
    mine = logits[..., rank * shard:(rank + 1) * shard].clone().requires_grad_()
    # inplace_backward writes over its input: hand it a non-leaf copy.
    src = mine.clone() if inplace else mine
    lp_s, h_s = lambdapo_ext.token_logprobs(src, targets, temperature=0.7, return_entropy=True,
                                            ignore_index=ignore_index, inplace_backward=inplace,
                                            process_group=dist.group.WORLD)
    torch.testing.assert_close(lp_s, lp, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(h_s, h, rtol=2e-5, atol=2e-5)
    _backward(lp_s, h_s, grads)
    torch.testing.assert_close(mine.grad, full.grad[..., rank * shard:(rank + 1) * shard],
                               **_tolerance(dtype))
    if world == 1:  # a group of one is the single-device op, bit for bit
        assert torch.equal(lp_s, lp) and torch.equal(mine.grad, full.grad)


def check_linear_op(rank: int, world: int, dtype: torch.dtype, frozen: bool,
                    ignore_index: int = IGNORE) -> None:
    _, targets, grads, hidden, weight, bias = _inputs(dtype, world, ignore_index)
    shard = VOCAB // world
    rows = slice(rank * shard, (rank + 1) * shard)
    h_full = hidden.clone().requires_grad_()
    w_full = weight.clone().requires_grad_(not frozen)
    b_full = bias.clone().requires_grad_(not frozen)
    lp, h = lambdapo_ext.linear_token_logprobs(h_full, w_full, targets, bias=b_full,
                                               temperature=0.7, return_entropy=True,
                                               ignore_index=ignore_index)
    _backward(lp, h, grads)
    h_mine = hidden.clone().requires_grad_()
    w_mine = weight[rows].clone().requires_grad_(not frozen)
    b_mine = bias[rows].clone().requires_grad_(not frozen)
    lp_s, h_s = lambdapo_ext.linear_token_logprobs(
        h_mine, w_mine, targets, bias=b_mine, temperature=0.7, return_entropy=True,
        ignore_index=ignore_index, vocab_chunk_size=5, process_group=dist.group.WORLD)
    tol = _tolerance(dtype)
    torch.testing.assert_close(lp_s, lp, **tol)
    torch.testing.assert_close(h_s, h, **tol)
    _backward(lp_s, h_s, grads)
    torch.testing.assert_close(h_mine.grad, h_full.grad, **tol)
    if dtype == torch.bfloat16:
        # The ranks' shares are summed unrounded and rounded once, as on one device: the two
        # differ only where the order of the fp32 sums moves a value across a rounding edge.
        differ = (h_mine.grad != h_full.grad).double().mean()
        assert differ <= 0.02, f"{differ:.1%} of the bf16 hidden gradient differs"
    if frozen:
        assert w_mine.grad is None and b_mine.grad is None
    else:
        torch.testing.assert_close(w_mine.grad, w_full.grad[rows], **tol)
        torch.testing.assert_close(b_mine.grad, b_full.grad[rows], **tol)


class _NoGradient(torch.autograd.Function):
    """Passes its input on but hands back no gradient for it: the op's backward then runs
    with no gradient for its outputs, as on a rank whose loss does not use them."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return None


def check_loss_on_one_rank(rank: int, world: int) -> None:
    """Only rank 0's loss uses the linear op's outputs; the others' backward still reaches
    the op (with no gradient for its outputs). Every rank must join the hidden gradient's
    all-reduce, and ends with rank 0's share of it."""
    _, targets, grads, hidden, weight, _ = _inputs(torch.float32, world)
    shard = VOCAB // world
    h_mine = hidden.clone().requires_grad_()
    w_mine = weight[rank * shard:(rank + 1) * shard].clone().requires_grad_()
    lp_s = lambdapo_ext.linear_token_logprobs(h_mine, w_mine, targets,
                                              process_group=dist.group.WORLD)
    loss = (lp_s * grads[0]).sum() if rank == 0 else _NoGradient.apply(lp_s).sum()
    loss.backward()
    assert h_mine.grad is not None, f"rank {rank} skipped the hidden gradient's all-reduce"
    assert w_mine.grad is None or rank == 0
    shares = [torch.empty_like(h_mine.grad) for _ in range(world)]
    dist.all_gather(shares, h_mine.grad)
    assert all(torch.equal(s, shares[0]) for s in shares) and h_mine.grad.abs().sum() > 0


def check_errors(rank: int, world: int) -> None:
    logits, targets, *_ = _inputs(torch.float32, world)
    shard = VOCAB // world
    bad = targets.clone()
    bad[1, 2] = VOCAB  # past the global vocabulary: every rank raises
    try:
        lambdapo_ext.token_logprobs(logits[..., :shard], bad, process_group=dist.group.WORLD)
    except ValueError as exc:
        assert "targets" in str(exc) and f"[0, {VOCAB})" in str(exc), exc
    else:
        raise AssertionError("a target past the global vocabulary was accepted")
    # Unchecked, it is owned by no rank: a NaN log-prob, as on one device.
    lp = lambdapo_ext.token_logprobs(logits[..., rank * shard:(rank + 1) * shard], bad,
                                     validate=False, process_group=dist.group.WORLD)
    assert lp.isnan().nonzero().tolist() == [[1, 2]], lp
    if world > 1:  # shards of unequal size: every rank raises, naming the sharded input
        width = shard + (1 if rank == 0 else 0)
        try:
            lambdapo_ext.token_logprobs(torch.randn(*ROWS, width), targets,
                                        process_group=dist.group.WORLD)
        except ValueError as exc:
            assert "logits" in str(exc) and "same number" in str(exc), exc
        else:
            raise AssertionError("shards of unequal size were accepted")


def run(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    # A rank left waiting in a collective fails the test after a minute instead of hanging.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        for dtype in (torch.float32, torch.bfloat16):
            for inplace in (False, True):
                check_logits_op(rank, world, dtype, inplace)
            for frozen in (False, True):
                check_linear_op(rank, world, dtype, frozen)
        check_logits_op(rank, world, torch.float32, False, INSIDE_SHARD_IGNORE)
        check_linear_op(rank, world, torch.bfloat16, False, INSIDE_SHARD_IGNORE)
        check_errors(rank, world)
        check_loss_on_one_rank(rank, world)
        dist.barrier()
    finally:
        dist.destroy_process_group()
