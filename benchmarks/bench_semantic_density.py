"""Semantic-density ops (ROUGE-1/2 via ngram_overlap, ROUGE-L via the bit-parallel
lcs_length) vs Google's pure-Python rouge-score (CPU) and vs the vectorized torch
references in lambdapo_ext.reference (torch.unique n-gram counting, TensorBLEU-style;
cummax LCS dynamic programme), on CPU and CUDA.

    python benchmarks/bench_semantic_density.py --device cpu   # or cuda, all; --quick

Layouts: 1024 candidate/reference pairs of 1024 tokens, and 64 references x 16 candidates
(candidates mapped by ref_index, references not copied). Tokens follow a Zipf law over a
32000-token vocabulary, so overlaps are realistic. rouge-score's ROUGE-L is an O(n m)
Python loop: it is timed on the first 16 pairs and scaled to the whole batch (marked).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import lambdapo_ext  # noqa: E402
from lambdapo_ext import reference  # noqa: E402

OP = "semantic_density"
SIZES = [("pairs", 1024, 1, 1024), ("groups", 64, 16, 1024)]   # layout, refs, cands/ref, tokens
QUICK_SIZES = [("pairs", 64, 1, 256), ("groups", 8, 8, 256)]
ROUGE_L_SAMPLE = 16
VOCAB = 32000


def make_batch(layout: str, refs: int, per_ref: int, tokens: int, device: str):
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


def rouge_score_fn(metric: str, cand_lists, ref_lists, ref_index):
    from rouge_score import rouge_scorer

    class Tokenizer:
        def tokenize(self, text):
            return text.split()

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2"] if metric == "rouge12" else ["rougeL"],
                                      tokenizer=Tokenizer())
    cands = [" ".join(map(str, c)) for c in cand_lists]
    refs = [" ".join(map(str, ref_lists[i])) for i in ref_index]

    def fn(count=len(cands)):
        for c, r in zip(cands[:count], refs[:count]):
            scorer.score(r, c)
    return fn


def run(device: str, sizes, repeats: int) -> list[harness.Result]:
    results = []
    try:
        import rouge_score  # noqa: F401
        have_rouge_score = True
    except ImportError:
        have_rouge_score = False
    for layout, refs, per_ref, tokens in sizes:
        cand, ref, ref_index, cand_lists, ref_lists, index_list = make_batch(
            layout, refs, per_ref, tokens, device)
        for metric in ("rouge12", "rougeL"):
            size = f"{layout} {refs}x{per_ref} L={tokens} {metric}"
            if metric == "rouge12":
                ours = lambda: lambdapo_ext.rouge_n(cand, ref, max_n=2, ref_index=ref_index)  # noqa: E731
                torch_ref = lambda: reference.ngram_overlap(cand, ref, max_n=2, ref_index=ref_index)  # noqa: E731
            else:
                ours = lambda: lambdapo_ext.rouge_l(cand, ref, ref_index=ref_index)  # noqa: E731
                torch_ref = lambda: reference.lcs_length(cand, ref, ref_index=ref_index)  # noqa: E731
            results.append(harness.measure(OP, "lambdapo", size, device, ours, repeats=repeats))
            results.append(harness.measure(OP, "torch_reference", size, device, torch_ref,
                                           repeats=1 if metric == "rougeL" else repeats,
                                           warmup=1))
            if device != "cpu":
                results.append(harness.not_run(OP, "rouge_score", size, device, "CPU only"))
            elif not have_rouge_score:
                results.append(harness.not_run(OP, "rouge_score", size, device,
                                               "rouge-score not installed"))
            else:
                fn = rouge_score_fn(metric, cand_lists, ref_lists, index_list)
                results.append(_time_rouge_score(size, fn, len(cand_lists), metric))
            for r in results[-3:]:
                print(f"  {size} {r.impl}: {r.median_ms} ms {r.status}", file=sys.stderr)
    return results


def _time_rouge_score(size: str, fn, batch: int, metric: str) -> harness.Result:
    sample = ROUGE_L_SAMPLE if metric == "rougeL" else batch
    start = time.perf_counter()
    fn(sample)
    elapsed_ms = (time.perf_counter() - start) * 1e3 * batch / sample
    result = harness.Result(op=OP, impl="rouge_score", size=size, device="cpu",
                            median_ms=round(elapsed_ms, 3))
    if sample != batch:
        result.extra["scaled_from_pairs"] = sample
    return result


if __name__ == "__main__":
    harness.main(OP, __doc__.splitlines()[0], run, cpu_sizes=SIZES, cuda_sizes=SIZES,
                 quick_sizes=QUICK_SIZES, baseline={"cpu": "rouge_score",
                                                     "cuda": "torch_reference"})
