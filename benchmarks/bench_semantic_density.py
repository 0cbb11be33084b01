"""Semantic-density ops (ROUGE-1/2 via ngram_overlap, ROUGE-L via the bit-parallel
lcs_length) vs Google's pure-Python rouge-score and the Rust rouge-score-rs (CPU), and vs
the vectorized torch references in lambdapo_ext.reference (torch.unique n-gram counting,
TensorBLEU-style; cummax LCS dynamic programme), on CPU and CUDA.

    pytest benchmarks/bench_semantic_density.py --benchmark-only [--bench-size full]
    python benchmarks/bench_semantic_density.py --device cpu   # or cuda, all; --quick

Layouts: 1024 candidate/reference pairs of 1024 tokens, and 64 references x 16 candidates
(candidates mapped by ref_index, references not copied). Tokens follow a Zipf law over a
32000-token vocabulary, so overlaps are realistic. rouge-score's ROUGE-L is an O(n m)
Python loop: a round scores the first 16 pairs and its clock is scaled to the whole batch
(extra ``scaled_from_pairs``); rouge-score runs one round, without warm-up.

rouge-score-rs (when importable) is called as a user would: text in (the ids written as
words), `RougeScorer.score_batch` on all cores, its own tokenization included; the time its
DefaultTokenizer takes alone on the same texts is given as tokenize_ms. On CUDA the CPU op
(lambdapo_cpu, all cores) runs on the same inputs. The targets of issue 18 come last.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import lambdapo_ext  # noqa: E402
from lambdapo_ext import reference  # noqa: E402

OP = "semantic_density"
RATIOS = {"cpu": ("rouge_score", "rouge_score_rs"), "cuda": ("torch_reference", "lambdapo_cpu")}
KERNELS = ("ngram_overlap", "lcs_length")
# layout, references, candidates per reference, tokens
FULL = [("pairs", 1024, 1, 1024), ("groups", 64, 16, 1024)]
SMALL = [("pairs", 64, 1, 256), ("groups", 8, 8, 256)]
SIZES = {"small": {"cpu": SMALL, "cuda": SMALL}, "full": {"cpu": FULL, "cuda": FULL}}
METRICS = ("rouge12", "rougeL")
IMPLS = ("lambdapo", "lambdapo_cpu", "torch_reference", "rouge_score", "rouge_score_rs")
ROUGE_L_SAMPLE = 16
VOCAB = 32000
# Issue 18: (impl, the impl it is compared with, device, metric, minimum speedup).
TARGETS = [("lambdapo", "rouge_score_rs", "cpu", "rouge12", 10.0),
           ("lambdapo", "rouge_score_rs", "cpu", "rougeL", 2.0),
           ("lambdapo", "lambdapo_cpu", "cuda", "rouge12", 20.0),
           ("lambdapo", "lambdapo_cpu", "cuda", "rougeL", 20.0),
           ("lambdapo", "torch_reference", "cuda", "rouge12", 5.0),
           ("lambdapo", "torch_reference", "cuda", "rougeL", 5.0)]

_INPUTS = harness.InputSlot()


def cases(options: harness.BenchOptions, device: str) -> list[harness.Case]:
    out = []
    for layout, refs, per_ref, tokens in options.sizes(SIZES, device):
        for metric in METRICS:
            size = f"{layout} {refs}x{per_ref} L={tokens} {metric}"
            spec = (layout, refs, per_ref, tokens, metric)
            for impl in IMPLS:
                if impl == "lambdapo_cpu" and device == "cpu":
                    continue  # the same as "lambdapo" there
                kwargs: dict = {}
                if impl == "lambdapo_cpu":
                    kwargs = {"runs_on": "cpu"}
                elif impl == "torch_reference" and metric == "rougeL":
                    kwargs = {"rounds": 1}   # the DP reference takes ~35 s at full size
                elif impl == "rouge_score":
                    pairs = refs * per_ref
                    sample = min(ROUGE_L_SAMPLE, pairs) if metric == "rougeL" else pairs
                    kwargs = {"rounds": 1, "warmup": 0, "peak_memory": False,
                              "time_scale": pairs / sample}
                out.append(harness.Case(OP, impl, size, device, spec=spec, kernels=KERNELS,
                                        **kwargs))
    return out


def make_batch(refs: int, per_ref: int, tokens: int, device: str):
    """((ids, lengths) of the candidates, of the references, ref_index) on ``device``, and
    the same as lists."""
    gen = torch.Generator().manual_seed(0)
    zipf = 1.0 / torch.arange(1, VOCAB + 1, dtype=torch.float64) ** 1.1
    draw = lambda count: torch.multinomial(zipf, count * tokens, True, generator=gen)  # noqa: E731
    ref_ids = draw(refs).view(refs, tokens)
    cand_ids = draw(refs * per_ref).view(refs * per_ref, tokens)
    ref_index = torch.arange(refs).repeat_interleave(per_ref)
    lengths = lambda n: torch.full((n,), tokens, dtype=torch.int64)  # noqa: E731
    cand = (cand_ids.to(device), lengths(len(cand_ids)).to(device))
    ref = (ref_ids.to(device), lengths(refs).to(device))
    return cand, ref, ref_index.to(device), cand_ids.tolist(), ref_ids.tolist(), ref_index.tolist()


def _texts(cand_lists, ref_lists, ref_index) -> tuple[list[str], list[str]]:
    """Candidates and their references as text, the ids written as words."""
    return ([" ".join(map(str, c)) for c in cand_lists],
            [" ".join(map(str, ref_lists[i])) for i in ref_index])


def rouge_score_fn(metric: str, cands: list[str], refs: list[str], count: int) -> Callable:
    """Google's rouge-score on the first ``count`` pairs (whitespace tokens)."""
    from rouge_score import rouge_scorer

    class Tokenizer:
        def tokenize(self, text):
            return text.split()

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2"] if metric == "rouge12" else ["rougeL"],
                                      tokenizer=Tokenizer())

    def fn():
        for c, r in zip(cands[:count], refs[:count]):
            scorer.score(r, c)
    return fn


def rouge_score_rs_fn(metric: str, cands: list[str], refs: list[str]) -> tuple[Callable, float]:
    """rouge-score-rs's batch scorer, and the time in ms its tokenizer takes alone."""
    import rouge_score_rs
    from rouge_score_rs.tokenizers import DefaultTokenizer

    scorer = rouge_score_rs.RougeScorer(["rouge1", "rouge2"] if metric == "rouge12"
                                        else ["rougeL"])
    tokenizer = DefaultTokenizer()
    start = time.perf_counter()
    for text in cands + refs:
        tokenizer.tokenize(text)
    return (lambda: scorer.score_batch(refs, cands)), (time.perf_counter() - start) * 1e3


def build(case: harness.Case) -> tuple[Callable[[], object], dict]:
    """The call to time and the extras it comes with."""
    layout, refs, per_ref, tokens, metric = case.spec
    if case.impl in ("rouge_score", "rouge_score_rs"):
        if case.device != "cpu":
            pytest.skip("CPU only")
        pytest.importorskip(case.impl, reason=f"{case.impl.replace('_', '-')} not installed")
    device = case.timing_device
    cand, ref, ref_index, cand_lists, ref_lists, index_list = _INPUTS.get(
        (layout, refs, per_ref, tokens, case.device),
        lambda: make_batch(refs, per_ref, tokens, case.device))
    if case.impl == "rouge_score":
        sample = round(len(cand_lists) / case.time_scale)
        fn = rouge_score_fn(metric, *_texts(cand_lists, ref_lists, index_list), sample)
        return fn, {"scaled_from_pairs": sample} if case.time_scale != 1 else {}
    if case.impl == "rouge_score_rs":
        fn, tokenize_ms = rouge_score_rs_fn(metric, *_texts(cand_lists, ref_lists, index_list))
        return fn, {"tokenize_ms": round(tokenize_ms, 1)}
    if device != case.device:
        cand, ref = tuple(t.to(device) for t in cand), tuple(t.to(device) for t in ref)
        ref_index = ref_index.to(device)
    if case.impl == "torch_reference":
        if metric == "rouge12":
            return lambda: reference.ngram_overlap(cand, ref, max_n=2, ref_index=ref_index), {}
        return lambda: reference.lcs_length(cand, ref, ref_index=ref_index), {}
    if metric == "rouge12":
        return lambda: lambdapo_ext.rouge_n(cand, ref, max_n=2, ref_index=ref_index), {}
    return lambda: lambdapo_ext.rouge_l(cand, ref, ref_index=ref_index), {}


def test_semantic_density(case: harness.Case, measure) -> None:
    fn, extra = build(case)
    measure(fn).extra.update(extra)


def targets(rows: list[harness.Result], device: str) -> list[harness.Target]:
    """The issue-18 targets for this device."""
    index = harness.by_impl_size(rows)
    out = []
    for impl, other, target_device, metric, minimum in TARGETS:
        if target_device != device:
            continue
        for size in dict.fromkeys(r.size for r in rows if r.size.endswith(metric)):
            out.append(harness.Target(size, f"{impl} vs {other}",
                                      harness.ratio(index, size, other, impl), minimum,
                                      impl=impl))
    return out


if __name__ == "__main__":
    sys.exit(harness.main(__file__, __doc__))
