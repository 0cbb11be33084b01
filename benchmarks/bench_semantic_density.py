"""Semantic-density ops (ROUGE-1/2 via ngram_overlap, ROUGE-L via the bit-parallel
lcs_length) vs Google's pure-Python rouge-score and the Rust rouge-score-rs (CPU), and vs
the vectorized torch references in lambdapo_ext.reference (torch.unique n-gram counting,
TensorBLEU-style; cummax LCS dynamic programme), on CPU and CUDA.

    python benchmarks/bench_semantic_density.py --device cpu   # or cuda, all; --quick

Layouts: 1024 candidate/reference pairs of 1024 tokens, and 64 references x 16 candidates
(candidates mapped by ref_index, references not copied). Tokens follow a Zipf law over a
32000-token vocabulary, so overlaps are realistic. rouge-score's ROUGE-L is an O(n m)
Python loop: it is timed on the first 16 pairs and scaled to the whole batch (marked).

rouge-score-rs (when importable) is called as a user would: text in (the ids written as
words), `RougeScorer.score_batch` on all cores, its own tokenization included; the time its
DefaultTokenizer takes alone on the same texts is given as tokenize_ms. On CUDA the CPU op
(lambdapo_cpu, all cores) runs on the same inputs. The script ends with the targets of
issue 18 and the measured ratios.
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
# Issue 18: (impl, the impl it is compared with, device, metric, minimum speedup).
TARGETS = [("lambdapo", "rouge_score_rs", "cpu", "rouge12", 10.0),
           ("lambdapo", "rouge_score_rs", "cpu", "rougeL", 2.0),
           ("lambdapo", "lambdapo_cpu", "cuda", "rouge12", 20.0),
           ("lambdapo", "lambdapo_cpu", "cuda", "rougeL", 20.0),
           ("lambdapo", "torch_reference", "cuda", "rouge12", 5.0),
           ("lambdapo", "torch_reference", "cuda", "rougeL", 5.0)]


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


def rouge_score_rs_fn(metric: str, cand_lists, ref_lists, ref_index):
    """rouge-score-rs on the ids written as text, and its tokenization time alone (ms)."""
    import rouge_score_rs
    from rouge_score_rs.tokenizers import DefaultTokenizer

    scorer = rouge_score_rs.RougeScorer(["rouge1", "rouge2"] if metric == "rouge12"
                                        else ["rougeL"])
    cands = [" ".join(map(str, c)) for c in cand_lists]
    refs = [" ".join(map(str, ref_lists[i])) for i in ref_index]
    tokenizer = DefaultTokenizer()
    start = time.perf_counter()
    for text in cands + refs:
        tokenizer.tokenize(text)
    tokenize_ms = (time.perf_counter() - start) * 1e3
    return (lambda: scorer.score_batch(refs, cands)), tokenize_ms


def _importable(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


def run(device: str, sizes, repeats: int) -> list[harness.Result]:
    results = []
    have_rouge_score = _importable("rouge_score")
    have_rouge_score_rs = _importable("rouge_score_rs")
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
            row = len(results) - 1
            if device != "cpu":
                cpu_cand, cpu_ref, cpu_index = (tuple(t.cpu() for t in cand),
                                                tuple(t.cpu() for t in ref), ref_index.cpu())
                ours_cpu = ((lambda: lambdapo_ext.rouge_n(cpu_cand, cpu_ref, max_n=2,  # noqa: E731
                                                          ref_index=cpu_index))
                            if metric == "rouge12" else
                            (lambda: lambdapo_ext.rouge_l(cpu_cand, cpu_ref,  # noqa: E731
                                                          ref_index=cpu_index)))
                results.append(harness.measure(OP, "lambdapo_cpu", size, "cpu", ours_cpu,
                                               repeats=repeats))
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
            if device != "cpu":
                results.append(harness.not_run(OP, "rouge_score_rs", size, device, "CPU only"))
            elif not have_rouge_score_rs:
                results.append(harness.not_run(OP, "rouge_score_rs", size, device,
                                               "rouge-score-rs not installed"))
            else:
                fn, tokenize_ms = rouge_score_rs_fn(metric, cand_lists, ref_lists, index_list)
                results.append(harness.measure(OP, "rouge_score_rs", size, device, fn,
                                               repeats=repeats))
                results[-1].extra["tokenize_ms"] = round(tokenize_ms, 1)
            for r in results[row:]:
                print(f"  {size} {r.impl}: {r.median_ms} ms {r.status}", file=sys.stderr)
    print_targets(results, device)
    return results


def print_targets(results: list[harness.Result], device: str) -> None:
    """The issue-18 targets for this device with the measured ratio, met or not."""
    times = {(r.size, r.impl): r.median_ms for r in results if r.median_ms}
    print(f"targets on {device} (issue 18):")
    for impl, other, target_device, metric, minimum in TARGETS:
        if target_device != device:
            continue
        for size in sorted({r.size for r in results if r.size.endswith(metric)}):
            ours, theirs = times.get((size, impl)), times.get((size, other))
            if ours and theirs:
                ratio = theirs / ours
                verdict = f"{ratio:.1f}x, {'met' if ratio >= minimum else 'NOT met'}"
            else:
                verdict = "not measured"
            print(f"  {size}: {impl} >= {minimum:g}x {other}: {verdict}")


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
