"""The fake kernels check shapes, dtypes and devices as the real kernels do, so torch.compile
(which traces with fake tensors) rejects a bad input at trace time with the argument's name,
and a mix of real and meta tensors never reaches a kernel."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import lambdapo_ext
from lambdapo_ext import (lambda_advantages, lcs_length, linear_token_logprobs, ngram_overlap,
                          token_logprobs)

L = torch.long


def _overlap_args(ref_index_len=2):
    # validate=False where these are used: fake tensors have no values to check on the host.
    seq = (torch.tensor([1, 2, 3, 4]), torch.tensor([0, 2, 4]))
    return dict(cand=seq, ref=seq, ref_index=torch.zeros(ref_index_len, dtype=L))


CASES = {
    "token_logprobs targets shape": (
        lambda: token_logprobs(torch.randn(2, 3, 8), torch.zeros(2, 4, dtype=L)), "targets"),
    "token_logprobs int logits": (
        lambda: token_logprobs(torch.zeros(2, 8, dtype=L), torch.zeros(2, dtype=L)),
        "logits"),
    "linear hidden size": (
        lambda: linear_token_logprobs(torch.randn(4, 16), torch.randn(32, 8),
                                      torch.zeros(4, dtype=L)), "weight"),
    "linear bias shape": (
        lambda: linear_token_logprobs(torch.randn(4, 16), torch.randn(32, 16),
                                      torch.zeros(4, dtype=L), bias=torch.randn(31)),
        "bias"),
    "lambda mask shape": (
        lambda: lambda_advantages(torch.rand(2, 4), torch.rand(2, 4),
                                  mask=torch.ones(2, 3, dtype=torch.bool)), "mask"),
    "lambda rewards rank": (
        lambda: lambda_advantages(torch.rand(8), torch.rand(8)), "rewards"),
    "ngram ref_index length": (
        lambda: ngram_overlap(**_overlap_args(ref_index_len=3), max_n=2, validate=False),
        "ref_index"),
    "lcs ref_index length": (
        lambda: lcs_length(**_overlap_args(ref_index_len=1), validate=False), "ref_index"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fake_kernels_reject_what_the_kernels_reject(case):
    call, argument = CASES[case]
    with pytest.raises(RuntimeError) as real:
        call()
    assert argument in str(real.value)
    with FakeTensorMode(), pytest.raises(Exception) as fake:
        call()
    assert argument in str(fake.value)


def test_fake_kernels_accept_valid_inputs():
    with FakeTensorMode():
        lp = token_logprobs(torch.randn(2, 3, 8), torch.zeros(2, 3, dtype=L))
        lin = linear_token_logprobs(torch.randn(4, 16), torch.randn(32, 16),
                                    torch.zeros(4, dtype=L), bias=torch.randn(32),
                                    chunk_size=4, vocab_chunk_size=32)
        adv = lambda_advantages(torch.rand(2, 4), torch.rand(2, 4))
        lcs = lcs_length(**_overlap_args(), validate=False)
    assert lp.shape == (2, 3) and lin.shape == (4,) and adv.shape == (2, 4)
    assert lcs.shape == (2,)


def test_real_and_meta_tensors_do_not_mix():
    with pytest.raises(RuntimeError, match="scores is on meta"):
        lambdapo_ext.lambda_advantages(torch.rand(2, 4), torch.rand(2, 4, device="meta"))
    with pytest.raises(RuntimeError, match="targets is on meta"):
        lambdapo_ext.token_logprobs(torch.randn(2, 8), torch.zeros(2, dtype=L, device="meta"))
