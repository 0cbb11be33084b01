"""Vocabulary-parallel token_logprobs and linear_token_logprobs (process_group=...) over
gloo on the CPU, 1, 2 and 4 processes: values and gradients equal the single-process ops
(with ignore_index rows, temperature, entropy, fp32 and bf16, a trained and a frozen lm-head,
in-place backward), targets past the global vocabulary and uneven shards raise on every
rank, and a group of one is the single-device op bit for bit."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lambdapo_ext
import vocab_parallel_worker

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


@pytest.mark.parametrize("world", [1, 2, 4])
def test_sharded_ops_equal_the_single_process_ops(world, tmp_path):
    mp.spawn(vocab_parallel_worker.run, args=(world, str(tmp_path / "rendezvous")),
             nprocs=world, join=True)


def test_process_group_without_distributed_is_a_clear_error():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        lambdapo_ext.token_logprobs(torch.randn(2, 8), torch.zeros(2, dtype=torch.long),
                                    process_group=object())
