import os
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer

from lambdapo_ext import (lcs_length, ngram_overlap, reference, rouge_l, rouge_n,
                          semantic_density)
from tests.conftest import devices, skip_without_cuda, to_device


class WhitespaceTokenizer:
    """rouge-score on token ids: ids joined by spaces, split back unchanged."""

    def tokenize(self, text):
        return text.split()


SCORER = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rouge3", "rouge4", "rougeL"],
                                  tokenizer=WhitespaceTokenizer())
NGRAM_SCORER = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rouge3", "rouge4"],
                                        tokenizer=WhitespaceTokenizer())


def rouge_score_reference(cands, refs, scorer=SCORER):
    """{"rouge1": [(p, r, f), ...], ...} from Google's rouge-score, as float32."""
    out = {}
    for cand, ref in zip(cands, refs):
        scores = scorer.score(" ".join(map(str, ref)), " ".join(map(str, cand)))
        for key, s in scores.items():
            triple = torch.tensor([s.precision, s.recall, s.fmeasure], dtype=torch.float64)
            out.setdefault(key, []).append(triple.float())
    return {k: torch.stack(v) for k, v in out.items()}


def random_pairs(count, *, vocab, max_len, seed, long_every=0, long_len=0):
    rng = random.Random(seed)
    cands, refs = [], []
    for i in range(count):
        length = long_len if long_every and i % long_every == 0 else max_len
        cands.append([rng.randrange(vocab) for _ in range(rng.randrange(0, length + 1))])
        refs.append([rng.randrange(vocab) for _ in range(rng.randrange(0, length + 1))])
    return cands, refs


def assert_rouge_n_exact(cands, refs, expected, max_n=4):
    p, r, f = rouge_n(cands, refs, max_n=max_n)
    for n in range(max_n):
        got = torch.stack([p[:, n], r[:, n], f[:, n]], dim=1)
        assert torch.equal(got, expected[f"rouge{n + 1}"]), f"ROUGE-{n + 1} differs"


def test_rouge_n_equals_rouge_score_on_thousands_of_pairs():
    cands, refs = random_pairs(2000, vocab=12, max_len=300, seed=0, long_every=250,
                               long_len=4000)
    assert_rouge_n_exact(cands, refs, rouge_score_reference(cands, refs, NGRAM_SCORER))


def test_rouge_l_equals_rouge_score():
    cands, refs = random_pairs(300, vocab=10, max_len=150, seed=1)
    expected = rouge_score_reference(cands, refs)["rougeL"]
    p, r, f = rouge_l(cands, refs)
    assert torch.equal(torch.stack([p, r, f], dim=1), expected)


@pytest.mark.slow
def test_rouge_l_equals_rouge_score_on_thousands_of_pairs():
    """rouge-score's pure-Python O(nm) LCS bounds the size: 2000 pairs up to 300 tokens,
    every 500th up to 1500."""
    cands, refs = random_pairs(2000, vocab=10, max_len=300, seed=11, long_every=500,
                               long_len=1500)
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=WhitespaceTokenizer())
    expected = rouge_score_reference(cands, refs, scorer)["rougeL"]
    p, r, f = rouge_l(cands, refs)
    assert torch.equal(torch.stack([p, r, f], dim=1), expected)


@pytest.mark.parametrize("length", [1, 63, 64, 65, 127, 128, 129, 3000])
def test_lcs_across_word_boundaries_equals_the_dynamic_programme(length):
    cands, refs = random_pairs(6, vocab=5, max_len=length, seed=length)
    refs[0] = [1] * length                      # long runs: carries across every word
    cands[0] = [1] * (length // 2) + [2] * (length // 2)
    assert torch.equal(lcs_length(cands, refs), reference.lcs_length(cands, refs))


def test_ngram_overlap_equals_torch_unique_reference():
    cands, refs = random_pairs(300, vocab=20, max_len=200, seed=2)
    ours = ngram_overlap(cands, refs, max_n=5)
    ref = reference.ngram_overlap(cands, refs, max_n=5)
    for a, b in zip(ours, ref):
        assert a.dtype == torch.int64 and torch.equal(a, b)


def test_token_ids_of_any_size_count_the_same():
    # Renaming tokens one-to-one leaves every count unchanged. The CPU kernel looks ids below
    # 2^20 up directly and larger ones in a table: mix both, within and across references.
    cands, refs = random_pairs(300, vocab=10, max_len=80, seed=7, long_every=60, long_len=2000)
    rng = random.Random(7)
    large = [2**20 - 1, 2**20, 2**20 + 1, 2**31, 2**40 + 3]
    large += [rng.randrange(2**62, 2**63) for _ in range(5)]
    renames = [list(range(10)), large, [t if t % 3 else large[t] for t in range(10)]]

    def renamed(seqs):
        return [[renames[i % 3][t] for t in s] for i, s in enumerate(seqs)]

    expected = ngram_overlap(cands, refs, max_n=5)
    assert all(torch.equal(a, b)
               for a, b in zip(expected, reference.ngram_overlap(cands, refs, max_n=5)))
    for got in (ngram_overlap(renamed(cands), renamed(refs), max_n=5),
                ngram_overlap(packed(renamed(cands)), packed(renamed(refs)), max_n=5)):
        assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_edge_cases_match_rouge_score():
    cands = [[], [1, 2], [], [5], [1, 1, 1, 1], [1, 2, 1, 2, 1], [7, 8, 9], [3, 3]]
    refs = [[], [], [1, 2], [5], [1, 1], [2, 1, 2], [7, 8, 9], [4, 4, 4]]
    expected = rouge_score_reference(cands, refs)
    assert_rouge_n_exact(cands, refs, expected)
    p, r, f = rouge_l(cands, refs)
    assert torch.equal(torch.stack([p, r, f], dim=1), expected["rougeL"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(0, 5), max_size=30),
                          st.lists(st.integers(0, 5), max_size=30)), min_size=1, max_size=6))
def test_hypothesis_against_rouge_score(pairs):
    cands = [c for c, _ in pairs]
    refs = [r for _, r in pairs]
    expected = rouge_score_reference(cands, refs)
    assert_rouge_n_exact(cands, refs, expected)
    p, r, f = rouge_l(cands, refs)
    assert torch.equal(torch.stack([p, r, f], dim=1), expected["rougeL"])


def packed(seqs, dtype=torch.int64):
    lengths = torch.tensor([len(s) for s in seqs])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return torch.tensor([t for s in seqs for t in s], dtype=dtype), offsets


def padded(seqs, pad=0):
    width = max([len(s) for s in seqs] + [1])
    ids = torch.full((len(seqs), width), pad, dtype=torch.int64)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.int64)
    return ids, torch.tensor([len(s) for s in seqs])


def test_every_input_form_gives_the_same_result():
    cands, refs = random_pairs(40, vocab=9, max_len=50, seed=3)
    expected = ngram_overlap(cands, refs, max_n=3)
    expected_lcs = lcs_length(cands, refs)
    for c in (packed(cands), packed(cands, torch.int32), padded(cands)):
        for r in (packed(refs), padded(refs, pad=-100), refs):
            got = ngram_overlap(c, r, max_n=3)
            assert all(torch.equal(a, b) for a, b in zip(got, expected))
            assert torch.equal(lcs_length(c, r), expected_lcs)


def test_one_to_many_groups_share_a_reference():
    rng = random.Random(4)
    refs = [[rng.randrange(7) for _ in range(rng.randrange(1, 90))] for _ in range(5)]
    group = 16
    cands = [[rng.randrange(7) for _ in range(rng.randrange(0, 90))] for _ in range(5 * group)]
    ref_index = torch.arange(5).repeat_interleave(group)
    copied = [refs[i] for i in ref_index.tolist()]
    for fn in (lambda **kw: rouge_n(max_n=3, **kw), rouge_l):
        shared = fn(cand=cands, ref=refs, ref_index=ref_index)
        assert all(torch.equal(a, b) for a, b in zip(shared, fn(cand=cands, ref=copied)))
    # Shuffled mapping too.
    perm = torch.randperm(5 * group, generator=torch.Generator().manual_seed(0))
    shuffled = lcs_length([cands[i] for i in perm.tolist()], refs, ref_index=ref_index[perm])
    assert torch.equal(shuffled, lcs_length(cands, copied)[perm])


def test_semantic_density_definition():
    cands, refs = random_pairs(50, vocab=8, max_len=40, seed=5)
    sd = semantic_density(cands, refs)                         # mean of F1, F2
    assert sd.dtype == torch.float32 and sd.shape == (50,)
    torch.testing.assert_close(sd, rouge_n(cands, refs, max_n=2)[2].mean(-1))
    assert torch.equal(semantic_density(cands, refs, metric="rouge_l"), rouge_l(cands, refs)[2])
    assert ((sd >= 0) & (sd <= 1)).all()
    same = semantic_density([[1, 2, 3, 4]], [[1, 2, 3, 4]], max_n=4)
    disjoint = semantic_density([[1, 2, 3]], [[4, 5, 6]], metric="rouge_l")
    assert same.item() == 1.0 and disjoint.item() == 0.0


def test_beta_weights_recall():
    p, r, f = rouge_n([[1, 2, 3, 4]], [[1, 2]], max_n=1, beta=2.0)
    assert p.item() == pytest.approx(0.5) and r.item() == 1.0
    assert f.item() == pytest.approx(5 * 0.5 * 1.0 / (4 * 0.5 + 1.0))


def _op_args():
    cand_values, cand_offsets = packed([[1, 2, 3, 2], [], [4, 4]])
    ref_values, ref_offsets = packed([[2, 3, 4], [1]])
    return (cand_values, cand_offsets[:-1], cand_offsets[1:] - cand_offsets[:-1], ref_values,
            ref_offsets[:-1], ref_offsets[1:] - ref_offsets[:-1], torch.tensor([0, 1, 0]))


@pytest.mark.parametrize("device", devices("ngram_overlap"))
def test_opcheck(device):
    args = to_device(_op_args(), device)
    torch.library.opcheck(torch.ops.lambdapo.ngram_overlap.default, (*args, 3))
    torch.library.opcheck(torch.ops.lambdapo.lcs_length.default, args)


BAD_INPUTS = [
    (lambda: dict(cand=(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 1])), ref=[[1], [2]]),
     ValueError, "cand offsets must be non-decreasing"),
    (lambda: dict(cand=(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 5])), ref=[[1], [2]]),
     ValueError, "cand offsets must lie in"),
    (lambda: dict(cand=[[1], [2]], ref=(torch.tensor([[1, 2], [3, 4]]), torch.tensor([2, 3]))),
     ValueError, "ref lengths must lie in"),
    (lambda: dict(cand=[[1], [2]], ref=[[1]], ref_index=torch.tensor([0, 1])), ValueError,
     "ref_index must lie in"),
    (lambda: dict(cand=[[1], [2]], ref=[[1]]), ValueError, "ref_index is needed"),
    (lambda: dict(cand=[[1, -100]], ref=[[1]]), ValueError, "negative token ids"),
    (lambda: dict(cand=(torch.tensor([1.0, 2.0]), torch.tensor([0, 2])), ref=[[1]]), TypeError,
     "cand ids must be an integer tensor"),
    (lambda: dict(cand=[[1]], ref=[[1]], ref_index=torch.tensor([0.0])), TypeError,
     "ref_index must be an integer"),
    (lambda: dict(cand="1 2 3", ref=[[1]]), TypeError, "cand must be"),
]


@pytest.mark.parametrize("make,exc,message", BAD_INPUTS)
def test_bad_inputs_raise_naming_the_argument(make, exc, message):
    with pytest.raises(exc, match=message):
        ngram_overlap(**make())
    with pytest.raises(exc, match=message):
        lcs_length(**make())


@pytest.mark.parametrize("make,exc,message", BAD_INPUTS)
def test_the_scores_name_themselves_in_their_inputs_errors(make, exc, message):
    """rouge_n, rouge_l and semantic_density are what a user calls: their errors start with
    their own names, not with the ops they are built on."""
    import lambdapo_ext

    for name, call in (("rouge_n", lambdapo_ext.rouge_n), ("rouge_l", lambdapo_ext.rouge_l),
                       ("semantic_density", lambdapo_ext.semantic_density),
                       ("semantic_density", lambda **kw: lambdapo_ext.semantic_density(
                           metric="rouge_l", **kw))):
        with pytest.raises(exc, match=message) as info:
            call(**make())
        assert not str(info.value).startswith(("ngram_overlap:", "lcs_length:")), name
        if ":" in str(info.value).split(" ")[0]:
            assert str(info.value).startswith(f"{name}:"), (name, str(info.value))


@pytest.mark.parametrize("device", devices("lcs_length"))
def test_negative_ids_are_found_in_every_sequence_and_only_there(device):
    # The CPU kernels scan the sequences as their tasks read them, and the references that no
    # candidate reads at the end: a negative id anywhere inside a sequence raises, naming the
    # side; padding outside the sequences may hold anything.
    ids = lambda rows: torch.tensor(rows, device=device)  # noqa: E731
    cand = (ids([[1, 2, 3, -100], [4, 5, -100, -100]]), ids([3, 2]))
    ref = (ids([[1, 2, -100], [7, 8, 9], [4, -5, 6]]), ids([2, 3, 3]))
    for op in (ngram_overlap, lcs_length):
        with pytest.raises(ValueError, match="ref_values holds negative token ids"):
            op(cand, ref, ref_index=ids([1, 1]))          # only in the unread reference 2
        with pytest.raises(ValueError, match="cand_values holds negative token ids"):
            op((ids([[1, 2], [3, -4]]), ids([2, 2])), ref, ref_index=ids([1, 1]))
        op(cand, (ref[0], ids([2, 3, 1])), ref_index=ids([0, 1]))   # -5 outside reference 2
        op(cand, ref, ref_index=ids([1, 1]), validate=False)        # unchecked: counted


def test_bad_options_raise():
    with pytest.raises(ValueError, match="max_n must be >= 1"):
        ngram_overlap([[1]], [[1]], max_n=0)
    with pytest.raises(ValueError, match="metric must be one of"):
        semantic_density([[1]], [[1]], metric="bleu")
    with pytest.raises(ValueError, match="beta must be finite and > 0"):
        rouge_n([[1]], [[1]], beta=0.0)
    with pytest.raises(ValueError, match="ref_lengths must be >= 0"):
        torch.ops.lambdapo.lcs_length(torch.tensor([1]), torch.tensor([0]), torch.tensor([1]),
                                      torch.tensor([1]), torch.tensor([0]), torch.tensor([-1]),
                                      torch.tensor([0]))


@skip_without_cuda("ngram_overlap")
def test_cuda_matches_cpu_including_8k_token_sequences():
    cands, refs = random_pairs(64, vocab=50, max_len=400, seed=6, long_every=16, long_len=8192)
    ref_index = torch.arange(64)
    for fn in (lambda c, r, i: ngram_overlap(c, r, max_n=4, ref_index=i),
               lambda c, r, i: (lcs_length(c, r, ref_index=i),)):
        cpu = fn(packed(cands), packed(refs), ref_index)
        gpu = fn(tuple(t.cuda() for t in packed(cands)), tuple(t.cuda() for t in packed(refs)),
                 ref_index.cuda())
        assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu, gpu))


def warp_lcs_emulation(cand, ref):
    """The CUDA lcs_length algorithm in Python: lane l of a 32-lane warp holds words l, l + 32,
    ... of the bit-parallel state; per step each lane adds its word, and the carries between
    lanes come from the lanes' generate / propagate bits as in lane_carries
    (csrc/sequence_overlap.h), chunk after chunk."""
    full = (1 << 64) - 1
    words = (len(ref) + 63) // 64
    chunks = (words + 31) // 32
    lanes = 32 * chunks
    v = [full if w < words else 0 for w in range(lanes)]
    masks = {}
    for j, token in enumerate(ref):
        masks.setdefault(token, [0] * lanes)[j // 64] |= 1 << (j % 64)
    for token in cand:
        if token not in masks:
            continue
        match = masks[token]
        carry = 0
        for c in range(chunks):
            lane_words = range(32 * c, 32 * c + 32)
            sums = [v[w] + (v[w] & match[w]) for w in lane_words]
            generate = sum(1 << i for i, s in enumerate(sums) if s > full)
            propagate = sum(1 << i for i, s in enumerate(sums) if s == full)
            a, b = generate | propagate, generate
            carries = (a + b + carry) ^ a ^ b
            carry = (carries >> 32) & 1
            for i, w in enumerate(lane_words):
                v[w] = (((sums[i] & full) + ((carries >> i) & 1)) & full) | (v[w] & ~match[w] & full)
    ones = sum(bin(v[w] & ((1 << min(64, len(ref) - 64 * w)) - 1)).count("1")
               for w in range(words))
    return len(ref) - ones


def test_warp_parallel_carries_give_the_lcs():
    # Long runs of one token carry across words, lanes and 32-word chunks (2100 tokens: two).
    cases = [([1] * 2100, [1] * 2100), ([1] * 40 + [2] * 40, [1] * 2100), ([], [3]), ([3], [])]
    cases += [tuple(p) for p in zip(*random_pairs(6, vocab=4, max_len=700, seed=12))]
    cases += [tuple(p) for p in zip(*random_pairs(2, vocab=3, max_len=2200, seed=13,
                                                 long_every=1, long_len=2200))]
    cands, refs = [list(c) for c, _ in cases], [list(r) for _, r in cases]
    expected = reference.lcs_length(cands, refs)
    assert [warp_lcs_emulation(c, r) for c, r in cases] == expected.tolist()


def cuda_edge_cases():
    """Pairs that take every path of the CUDA kernels: empty sequences, lengths around the
    64-token words and 32-word chunks of the LCS, references past the shared-memory n-gram
    table (2048 tokens) and past the LCS's registers (8192 tokens), and many candidates per
    reference, in order and shuffled."""
    rng = random.Random(14)
    lengths = [0, 1, 63, 64, 65, 127, 1000, 1024, 1025, 2047, 2048, 2049, 4096, 8192, 8300]
    refs = [[rng.randrange(6) for _ in range(n)] for n in lengths]
    cands, ref_index = [], []
    for r, ref in enumerate(refs):
        for n in (0, 1, len(ref), 65, 1500, 9000):
            cands.append([rng.randrange(6) for _ in range(n)])
            ref_index.append(r)
    for _ in range(60):                    # a group of 60 candidates on one reference
        cands.append([rng.randrange(6) for _ in range(rng.randrange(0, 300))])
        ref_index.append(6)
    cands.append(list(refs[8]))            # identical pair
    ref_index.append(8)
    return cands, refs, torch.tensor(ref_index)


@skip_without_cuda("ngram_overlap")
@pytest.mark.parametrize("shuffle", [False, True])
def test_cuda_edge_cases_match_cpu(shuffle):
    cands, refs, ref_index = cuda_edge_cases()
    if shuffle:
        perm = torch.randperm(len(cands), generator=torch.Generator().manual_seed(1)).tolist()
        cands, ref_index = [cands[i] for i in perm], ref_index[perm]
    cpu_args = (packed(cands), packed(refs))
    gpu_args = tuple(tuple(t.cuda() for t in a) for a in cpu_args)
    for max_n in (1, 2, 4, 7):
        cpu = ngram_overlap(*cpu_args, max_n=max_n, ref_index=ref_index)
        gpu = ngram_overlap(*gpu_args, max_n=max_n, ref_index=ref_index.cuda())
        assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu, gpu)), f"max_n={max_n}"
    assert torch.equal(lcs_length(*cpu_args, ref_index=ref_index),
                       lcs_length(*gpu_args, ref_index=ref_index.cuda()).cpu())


def long_reference_bank(seed, unused_ids=0):
    """Packed (cand, ref, ref_index) with many long references: 200 of 1025..3000 tokens (past
    the shared n-gram table: the n-gram op's second launch) and 20 of 8193..12000 (past the
    LCS's registers: its second launch), 4 candidates each, in shuffled order, some of them
    pieces of their reference. `unused_ids` more ids follow the references as one reference
    no candidate uses: unchecked, the kernels size their pools from the number of ids, so a
    bank of over 2^22 ids makes the n-gram pool one table for the longest reference those ids
    allow (docs/ops.md)."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    lengths = ([rng.randrange(1025, 3000) for _ in range(200)]
               + [rng.randrange(8193, 12000) for _ in range(20)] + [unused_ids])
    ref_values = torch.randint(0, 8, (sum(lengths),), generator=gen)
    ref_offsets = torch.tensor([0] + lengths).cumsum(0)
    cands, ref_index = [], []
    for r in range(len(lengths) - 1):
        start, end = int(ref_offsets[r]), int(ref_offsets[r + 1])
        for _ in range(4):
            if rng.random() < 0.5:
                a = rng.randrange(start, end)
                cands.append(ref_values[a:rng.randrange(a, end + 1)])
            else:
                cands.append(torch.randint(0, 8, (rng.randrange(0, 2500),), generator=gen))
            ref_index.append(r)
    perm = torch.randperm(len(cands), generator=gen)
    cands = [cands[i] for i in perm.tolist()]
    cand_offsets = torch.tensor([0] + [len(c) for c in cands]).cumsum(0)
    return ((torch.cat(cands), cand_offsets), (ref_values, ref_offsets),
            torch.tensor(ref_index)[perm])


@skip_without_cuda("ngram_overlap")
@pytest.mark.parametrize("unused_ids", [0, 2**22 + 1])
def test_cuda_many_long_references_match_cpu_checked_or_not(unused_ids):
    """The second launches over many pending chunks / candidates, their pools sized from the
    longest reference read back (validate=True) or from the number of ids (validate=False,
    the stride then taken from the device): the CPU kernels' counts either way."""
    cand, ref, ref_index = long_reference_bank(20, unused_ids)
    gpu = (to_device(cand, "cuda"), to_device(ref, "cuda"), ref_index.cuda())
    expected_n = ngram_overlap(cand, ref, max_n=4, ref_index=ref_index)
    expected_l = rouge_l(cand, ref, ref_index=ref_index)
    for validate in (True, False):
        got_n = ngram_overlap(*gpu[:2], max_n=4, ref_index=gpu[2], validate=validate)
        assert all(torch.equal(a, b.cpu()) for a, b in zip(expected_n, got_n)), validate
        got_l = rouge_l(*gpu[:2], ref_index=gpu[2], validate=validate)
        assert all(torch.equal(a, b.cpu()) for a, b in zip(expected_l, got_l)), validate


def _holds_a_reference_past_2_29(device):
    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory >= 48 * 2**30
    return os.environ.get("LAMBDAPO_BIG_MEMORY_TESTS") == "1"


@pytest.mark.parametrize("device", devices("ngram_overlap"))
def test_references_past_2_29_tokens_raise_checked_and_are_cut_unchecked(device):
    """A reference holds at most 2^29 tokens (docs/ops.md): with validate=True a longer one
    raises, with validate=False it is cut to its first 2^29 tokens and every count and length
    is that of the cut reference, on CPU and CUDA alike. It takes 4 GiB of ids (and about 8 GiB
    more on the CPU, 12 GiB more on CUDA for the n-gram pool of the longest reference the shape
    allows), so it runs on GPUs of 48 GiB or more and on the CPU only with
    LAMBDAPO_BIG_MEMORY_TESTS=1. No smaller input reaches the rule: a length is first clipped
    to the ids there are, and the rule (clipped_sequences, csrc/sequence_overlap.h) is not
    reachable from Python."""
    if not _holds_a_reference_past_2_29(device):
        pytest.skip("needs a 2^29-token reference (see the docstring)")
    limit = 2**29
    ref = (torch.zeros(limit + 3, dtype=torch.int64, device=device),
           torch.tensor([0, limit + 3], device=device))
    cand = (torch.zeros(3, dtype=torch.int64, device=device), torch.tensor([0, 3], device=device))
    index = torch.zeros(1, dtype=torch.int64, device=device)
    for call in (lambda: ngram_overlap(cand, ref, max_n=1, ref_index=index),
                 lambda: lcs_length(cand, ref, ref_index=index)):
        with pytest.raises(ValueError, match=f"ref_lengths holds a sequence of {limit + 3} "
                                             f"tokens; at most {limit} are supported"):
            call()
    counts = ngram_overlap(cand, ref, max_n=1, ref_index=index, validate=False)
    assert [t.item() for t in counts] == [3, 3, limit]
    args = [t for seqs in (cand, ref) for t in (seqs[0], seqs[1][:-1], seqs[1].diff())]
    lcs = torch.ops.lambdapo.lcs_length(*args, index, False)
    assert [t.item() for t in lcs] == [3, 3, limit]
