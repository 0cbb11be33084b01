"""Small calls of every CUDA kernel, for compute-sanitizer (memcheck, racecheck, ...).

    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/sanitizer_cases.py

Each case is small (the sanitizers slow kernels down by orders of magnitude) but crosses
the kernels' internal boundaries: partial tiles and blocks, vocabularies that are not a
multiple of the vector width, references longer than the shared-memory copy, masked and
ignored entries, and the semantic-density ops' unchecked (validate=False) bad offsets,
lengths, ref_index and ids, which must stay within the inputs. Results are checked against
the CPU kernels, so a wrong answer fails too.
"""

from __future__ import annotations

import sys

import torch

import lambdapo_ext as lp
from lambdapo_ext.advantages import NORMALIZE_MODES


def _check(name: str, got, expected, **tol) -> None:
    got = got if isinstance(got, (tuple, list)) else (got,)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.cpu().float(), e.float(), **tol, msg=lambda m: f"{name}: {m}")
    print(f"ok  {name}", flush=True)


def lambda_advantages_cases(gen: torch.Generator) -> None:
    for p, g in [(3, 5), (2, 300), (1, 1)]:
        rewards = torch.randint(0, 2, (p, g), generator=gen).float()
        scores = -torch.rand(p, g, generator=gen)
        mask = torch.rand(p, g, generator=gen) > 0.3
        for normalize in NORMALIZE_MODES:
            cpu = lp.lambda_advantages(rewards, scores, mask=mask, normalize=normalize)
            gpu = lp.lambda_advantages(rewards.cuda(), scores.cuda(), mask=mask.cuda(),
                                       normalize=normalize)
            _check(f"lambda_advantages P={p} G={g} {normalize}", gpu, cpu, rtol=1e-4, atol=1e-4)
    # Scores spread far beyond the factored form's range (per-pair fallback), beta < 0.
    rewards = torch.randn(2, 300, generator=gen)
    scores = -torch.rand(2, 300, generator=gen) * 40
    for beta in (3.0, -0.5):
        _check(f"lambda_advantages wide scores beta={beta}",
               lp.lambda_advantages(rewards.cuda(), scores.cuda(), beta=beta),
               lp.lambda_advantages(rewards, scores, beta=beta), rtol=1e-4, atol=1e-4)
    # Ragged, validated and trusted: the member kernel with per-member bounds either way,
    # a group of 130 included.
    ids = torch.cat([torch.randint(0, 7, (400,), generator=gen), torch.full((130,), 9)])
    rewards, scores = torch.rand(530, generator=gen), -torch.rand(530, generator=gen)
    mask = torch.rand(530, generator=gen) > 0.1
    cpu = lp.lambda_advantages(rewards, scores, mask=mask, group_ids=ids)
    for validate in (True, False):
        _check(f"lambda_advantages ragged validate={validate}",
               lp.lambda_advantages(rewards.cuda(), scores.cuda(), mask=mask.cuda(),
                                    group_ids=ids.cuda(), validate=validate),
               cpu, rtol=1e-4, atol=1e-4)


def token_logprobs_cases(gen: torch.Generator) -> None:
    for rows, vocab, dtype in [(5, 7, torch.float32), (9, 1000, torch.bfloat16),
                               (4, 4099, torch.float16), (3, 50257, torch.float32)]:
        logits = (torch.randn(rows, vocab, generator=gen) * 3).to(dtype)
        targets = torch.randint(0, vocab, (rows,), generator=gen)
        targets[1] = -100
        upstream = torch.randn(rows, generator=gen), torch.randn(rows, generator=gen)
        tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
        for inplace in (False, True):
            results = []
            for device in ("cpu", "cuda"):
                x = logits.to(device, copy=True).requires_grad_(True)
                lps, ent = lp.token_logprobs(x, targets.to(device), temperature=0.8,
                                             return_entropy=True, inplace_backward=inplace)
                ((lps * upstream[0].to(device)).sum() + (ent * upstream[1].to(device)).sum()
                 ).backward()
                results.append((lps, ent, x.grad))
            _check(f"token_logprobs N={rows} V={vocab} {dtype} inplace={inplace}",
                   results[1], results[0], **tol)
        # Without entropy (its own kernels) and with unchecked targets, one out of range:
        # a NaN log-prob, no out-of-bounds read.
        bad = targets.clone()
        bad[0] = vocab + 5
        results = []
        for device in ("cpu", "cuda"):
            x = logits.to(device, copy=True).requires_grad_(True)
            lps = lp.token_logprobs(x, bad.to(device), validate=False)
            (lps[1:] * upstream[0][1:].to(device)).sum().backward()
            results.append((lps[1:], x.grad))
            assert torch.isnan(lps[0]), "token_logprobs: out-of-range target must give NaN"
        _check(f"token_logprobs N={rows} V={vocab} {dtype} no entropy, unchecked targets",
               results[1], results[0], **tol)


def linear_token_logprobs_cases(gen: torch.Generator) -> None:
    hidden = torch.randn(37, 64, generator=gen)
    weight = torch.randn(1001, 64, generator=gen) * 0.1
    bias = torch.randn(1001, generator=gen)
    targets = torch.randint(0, 1001, (37,), generator=gen)
    results = []
    for device in ("cpu", "cuda"):
        h = hidden.to(device, copy=True).requires_grad_(True)
        w = weight.to(device, copy=True).requires_grad_(True)
        lps, ent = lp.linear_token_logprobs(h, w, targets.to(device), bias=bias.to(device),
                                            return_entropy=True, chunk_size=16)
        (lps.sum() + ent.sum()).backward()
        results.append((lps, ent, h.grad, w.grad))
    _check("linear_token_logprobs", results[1], results[0], rtol=1e-4, atol=1e-4)


def linear_policy_loss_cases(gen: torch.Generator) -> None:
    """Rows of 1001 (not a multiple of the vector width: the scalar path) and 1024 entries,
    fp32 and bf16, with ignored rows, every term, chunks of 16 rows; and an unchecked
    out-of-range target (a NaN row, no stray read)."""
    for vocab, dtype in [(1001, torch.float32), (1024, torch.bfloat16), (1001, torch.bfloat16)]:
        hidden = torch.randn(37, 64, generator=gen).to(dtype)
        weight = (torch.randn(vocab, 64, generator=gen) * 0.1).to(dtype)
        bias = torch.randn(vocab, generator=gen).to(dtype)
        targets = torch.randint(0, vocab, (37,), generator=gen)
        targets[3] = -100
        adv, tw = torch.randn(37, generator=gen), torch.rand(37, generator=gen)
        old, ref = -7 + torch.randn(37, generator=gen) * 0.3, -7 + torch.randn(37, generator=gen)
        results = []
        for device in ("cpu", "cuda"):
            h = hidden.to(device, copy=True).requires_grad_(True)
            w = weight.to(device, copy=True).requires_grad_(True)
            b = bias.to(device, copy=True).requires_grad_(True)
            loss, lps, ent = lp.linear_policy_loss(
                h, w, targets.to(device), adv.to(device), tw.to(device), bias=b,
                old_logprobs=old.to(device), ref_logprobs=ref.to(device), kl_coef=0.1,
                entropy_coef=0.01, temperature=0.9, chunk_size=16)
            loss.backward()
            results.append((loss, lps, ent, h.grad, w.grad, b.grad))
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
        _check(f"linear_policy_loss V={vocab} {dtype}", results[1], results[0], **tol)
    bad = torch.randint(0, 1001, (9,), generator=gen)
    bad[4] = 1001 + 7
    hidden, weight = torch.randn(9, 32, generator=gen).cuda(), torch.randn(1001, 32).cuda()
    loss, lps, _ = lp.linear_policy_loss(hidden.requires_grad_(True), weight, bad.cuda(),
                                         torch.ones(9).cuda(), torch.ones(9).cuda(),
                                         validate=False)
    loss.backward()
    assert torch.isnan(lps[4]).item() and torch.isfinite(lps[:4]).all().item(), \
        "linear_policy_loss: out-of-range target must give a NaN row"
    print("ok  linear_policy_loss unchecked out-of-range target", flush=True)


def _packed_cuda(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in seqs])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return torch.tensor([t for s in seqs for t in s], dtype=torch.int64).cuda(), offsets.cuda()


def overlap_cases(gen: torch.Generator) -> None:
    lengths = [0, 1, 3, 63, 64, 65, 200, 5000]    # 5000 > the shared-memory reference copy
    seqs = [torch.randint(0, 20, (n,), generator=gen).tolist() for n in lengths]
    cands = [seqs[i] for i in range(len(seqs)) for _ in range(2)]
    ref_index = torch.tensor([j for j in range(len(seqs)) for _ in range(2)]).roll(1)
    cpu_n = lp.ngram_overlap(cands, seqs, max_n=4, ref_index=ref_index)
    cpu_l = lp.lcs_length(cands, seqs, ref_index=ref_index)
    gpu_cands, gpu_refs = _packed_cuda(cands), _packed_cuda(seqs)
    _check("ngram_overlap", lp.ngram_overlap(gpu_cands, gpu_refs, max_n=4,
                                             ref_index=ref_index.cuda()), cpu_n, rtol=0, atol=0)
    _check("lcs_length", lp.lcs_length(gpu_cands, gpu_refs, ref_index=ref_index.cuda()), cpu_l,
           rtol=0, atol=0)
    # Unchecked (validate=False) bad values: offsets and lengths negative, past the end or near
    # 2^63, ref_index outside [0, R), negative ids. The kernels must read only the clipped
    # sequences (memcheck finds any stray access) and agree with the CPU kernels' result.
    for validate_free_case in range(40):
        args = _unchecked_overlap_args(gen, validate_free_case)
        gpu_args = [t.cuda() for t in args]
        for max_n in (1, 3):
            _check(f"ngram_overlap unchecked #{validate_free_case} max_n={max_n}",
                   torch.ops.lambdapo.ngram_overlap(*gpu_args, max_n, False),
                   torch.ops.lambdapo.ngram_overlap(*args, max_n, False), rtol=0, atol=0)
        _check(f"lcs_length unchecked #{validate_free_case}",
               torch.ops.lambdapo.lcs_length(*gpu_args, False),
               torch.ops.lambdapo.lcs_length(*args, False), rtol=0, atol=0)
    # Unchecked, references past the shared n-gram table (1024 tokens) and the LCS's registers
    # (8192 tokens): the second launches, with scratch sized from the number of reference ids.
    long_refs = [torch.randint(-2, 20, (n,), generator=gen).tolist() for n in (1500, 9000)]
    long_cands = [seqs[3], long_refs[0][:700], long_refs[1], seqs[6]]
    long_index = torch.tensor([1, 0, 1, 5])            # 5: no such reference
    cpu_args = (_packed(long_cands), _packed(long_refs))
    gpu_args = tuple(tuple(t.cuda() for t in a) for a in cpu_args)
    for fn, name in ((lambda c, r, i: lp.ngram_overlap(c, r, max_n=4, ref_index=i,
                                                       validate=False), "ngram_overlap"),
                     (lambda c, r, i: lp.rouge_l(c, r, ref_index=i, validate=False), "rouge_l")):
        _check(f"{name} unchecked long references", fn(*gpu_args, long_index.cuda()),
               fn(*cpu_args, long_index), rtol=0, atol=0)
    _many_long_references_cases(gen)


def _many_long_references_cases(gen: torch.Generator) -> None:
    """The second launches over many listed chunks / candidates, unchecked and checked: their
    pools sized from the number of reference ids (validate=False) or the longest reference
    (validate=True), every block's or warp's stride the largest table or state any listed one
    needs, read on the device, the blocks and warps past the pool idle. With `unused` ids in a
    reference no candidate uses (over 2^22), the n-gram pool is one table for the longest
    reference the shape allows and the LCS pool its 64 MiB budget."""
    lengths = ([int(n) for n in torch.randint(1025, 2600, (24,), generator=gen)]
               + [int(n) for n in torch.randint(8193, 9500, (4,), generator=gen)])
    refs = [torch.randint(0, 9, (n,), generator=gen).tolist() for n in lengths]
    cands, index = [], []
    for r, ref in enumerate(refs):
        cands += [ref[: len(ref) // 2], torch.randint(0, 9, (700,), generator=gen).tolist()]
        index += [r, r]
    perm = torch.randperm(len(cands), generator=gen)
    cands, index = [cands[i] for i in perm.tolist()], torch.tensor(index)[perm]
    for unused in (0, 2**22 + 1):
        ref_values, ref_offsets = _packed(refs)
        ref_values = torch.cat([ref_values, torch.zeros(unused, dtype=torch.int64)])
        ref_offsets = torch.cat([ref_offsets, ref_offsets[-1:] + unused])
        cpu_args = (_packed(cands), (ref_values, ref_offsets))
        gpu_args = tuple(tuple(t.cuda() for t in a) for a in cpu_args)
        for fn, name in ((lambda c, r, i, v: lp.ngram_overlap(c, r, max_n=3, ref_index=i,
                                                              validate=v), "ngram_overlap"),
                         (lambda c, r, i, v: lp.rouge_l(c, r, ref_index=i, validate=v),
                          "rouge_l")):
            expected = fn(*cpu_args, index, True)
            for validate in (False, True):
                _check(f"{name} many long references, {unused} unused ids, validate={validate}",
                       fn(*gpu_args, index.cuda(), validate), expected, rtol=0, atol=0)


def _packed(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in seqs])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return torch.tensor([t for s in seqs for t in s], dtype=torch.int64), offsets


def _unchecked_overlap_args(gen: torch.Generator, case: int) -> list[torch.Tensor]:
    """Raw ngram_overlap / lcs_length arguments (CPU) with bad values of every kind."""
    def draw(low, high, count):
        values = torch.randint(low, high, (count,), generator=gen)
        extremes = torch.tensor([-2**62, 2**62, -2**63, 2**63 - 1])
        pick = torch.randint(0, 6, (count,), generator=gen)
        return torch.where(pick < 4, extremes[pick.clamp(max=3)], values) if case % 2 else values

    batch, num_refs = 1 + case % 7, case % 4
    cand_total, ref_total = 3 * case % 70, 5 * case % 90
    return [torch.randint(-3, 8, (cand_total,), generator=gen), draw(-5, cand_total + 5, batch),
            draw(-5, cand_total + 5, batch), torch.randint(-3, 8, (ref_total,), generator=gen),
            draw(-5, ref_total + 5, num_refs), draw(-5, ref_total + 5, num_refs),
            draw(-2, num_refs + 2, batch)]


def main() -> int:
    if not torch.cuda.is_available():
        print("no GPU visible to torch", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(0)
    for cases in (lambda_advantages_cases, token_logprobs_cases, linear_token_logprobs_cases,
                  overlap_cases, linear_policy_loss_cases):
        cases(gen)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
