"""One rank of the vocabulary-parallel checks in test_vocab_parallel.py (run under
torch.multiprocessing.spawn with the gloo backend): every case compares the sharded ops
with the single-process ops on the same full tensors, which every rank builds from one seed."""

import torch
import torch.distributed as dist

import lambdapo_ext

IGNORE = -100
ROWS = (3, 5)
VOCAB = 48  # divisible by 1, 2, 3 and 4 ranks
WIDTH = 16


def _tolerance(dtype: torch.dtype) -> dict:
    # bf16 logits/gradients may round differently by one unit in the last place.
    return dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=2e-5, atol=2e-5)


def _inputs(dtype: torch.dtype):
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(*ROWS, VOCAB, generator=g) * 3).to(dtype)
    targets = torch.randint(0, VOCAB, ROWS, generator=g)
    targets[0, :2] = IGNORE
    targets[2, 4] = VOCAB - 1
    targets[1, 1] = 0
    grads = torch.randn(2, *ROWS, generator=g)
    hidden = torch.randn(*ROWS, WIDTH, generator=g).to(dtype)
    weight = (torch.randn(VOCAB, WIDTH, generator=g) / 2).to(dtype)
    bias = torch.randn(VOCAB, generator=g).to(dtype)
    return logits, targets, grads, hidden, weight, bias


def _backward(logprobs, entropy, grads):
    (logprobs * grads[0] + entropy * grads[1]).sum().backward()


def check_logits_op(rank: int, world: int, dtype: torch.dtype, inplace: bool) -> None:
    logits, targets, grads, *_ = _inputs(dtype)
    shard = VOCAB // world
    full = logits.clone().requires_grad_()
    lp, h = lambdapo_ext.token_logprobs(full, targets, temperature=0.7, return_entropy=True)
    _backward(lp, h, grads)
    mine = logits[..., rank * shard:(rank + 1) * shard].clone().requires_grad_()
    # inplace_backward writes over its input: hand it a non-leaf copy.
    src = mine.clone() if inplace else mine
    lp_s, h_s = lambdapo_ext.token_logprobs(src, targets, temperature=0.7, return_entropy=True,
                                            inplace_backward=inplace, process_group=dist.group.WORLD)
    torch.testing.assert_close(lp_s, lp, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(h_s, h, rtol=2e-5, atol=2e-5)
    _backward(lp_s, h_s, grads)
    torch.testing.assert_close(mine.grad, full.grad[..., rank * shard:(rank + 1) * shard],
                               **_tolerance(dtype))
    if world == 1:  # a group of one is the single-device op, bit for bit
        assert torch.equal(lp_s, lp) and torch.equal(mine.grad, full.grad)


def check_linear_op(rank: int, world: int, dtype: torch.dtype, frozen: bool) -> None:
    _, targets, grads, hidden, weight, bias = _inputs(dtype)
    shard = VOCAB // world
    rows = slice(rank * shard, (rank + 1) * shard)
    h_full = hidden.clone().requires_grad_()
    w_full = weight.clone().requires_grad_(not frozen)
    b_full = bias.clone().requires_grad_(not frozen)
    lp, h = lambdapo_ext.linear_token_logprobs(h_full, w_full, targets, bias=b_full,
                                               temperature=0.7, return_entropy=True)
    _backward(lp, h, grads)
    h_mine = hidden.clone().requires_grad_()
    w_mine = weight[rows].clone().requires_grad_(not frozen)
    b_mine = bias[rows].clone().requires_grad_(not frozen)
    lp_s, h_s = lambdapo_ext.linear_token_logprobs(
        h_mine, w_mine, targets, bias=b_mine, temperature=0.7, return_entropy=True,
        vocab_chunk_size=5, process_group=dist.group.WORLD)
    tol = _tolerance(dtype)
    torch.testing.assert_close(lp_s, lp, **tol)
    torch.testing.assert_close(h_s, h, **tol)
    _backward(lp_s, h_s, grads)
    torch.testing.assert_close(h_mine.grad, h_full.grad, **tol)
    if frozen:
        assert w_mine.grad is None and b_mine.grad is None
    else:
        torch.testing.assert_close(w_mine.grad, w_full.grad[rows], **tol)
        torch.testing.assert_close(b_mine.grad, b_full.grad[rows], **tol)


def check_errors(rank: int, world: int) -> None:
    logits, targets, *_ = _inputs(torch.float32)
    shard = VOCAB // world
    bad = targets.clone()
    bad[1, 2] = VOCAB  # past the global vocabulary: every rank raises
    try:
        lambdapo_ext.token_logprobs(logits[..., :shard], bad, process_group=dist.group.WORLD)
    except ValueError as exc:
        assert "targets" in str(exc) and f"[0, {VOCAB})" in str(exc), exc
    else:
        raise AssertionError("a target past the global vocabulary was accepted")
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
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            for inplace in (False, True):
                check_logits_op(rank, world, dtype, inplace)
            for frozen in (False, True):
                check_linear_op(rank, world, dtype, frozen)
        check_errors(rank, world)
        dist.barrier()
    finally:
        dist.destroy_process_group()
