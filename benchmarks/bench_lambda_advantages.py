"""lambda_advantages vs the torch eager reference (which forms [P, G, G]) and
torch.compile of it.

    python benchmarks/bench_lambda_advantages.py --device cpu   # or cuda, all

Prints a table (speedup and memory ratio against torch eager) and appends the rows to
benchmarks/results/lambda_advantages.jsonl. "lambdapo" runs with validate=False (no host
sync, as the training loop calls it); "lambdapo_validated" (CUDA) with the finiteness
check. Then the issue-17 targets: the ratio against torch.compile at every size (>= 1.5x
on CUDA, >= 1x on the CPU), P=512, G=4096 in ms (<= 4 ms on H100/H200) and, on the CPU,
the speed-up from 1 thread to all at P=512, G=64 (>= 1.6x on 2 cores).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import lambdapo_ext  # noqa: E402
from lambdapo_ext import reference  # noqa: E402

OP = "lambda_advantages"
SIZES = [(64, 16), (512, 64), (128, 256), (64, 1000), (16, 4096), (512, 4096)]
# GRPO-style runs use G = 4 to 64 with P up to ~1024.
CUDA_SIZES = [(1024, 4), (1024, 16), (64, 16), (1024, 64), (512, 64), (128, 256), (64, 1000),
              (16, 4096), (512, 4096)]
QUICK_SIZES = [(64, 16), (128, 256), (16, 1024)]
# Live [P, G, G] float32 tensors at the eager reference's peak (dr, ds, weight, product).
REFERENCE_PAIR_TENSORS = 4


IMPLS = ("lambdapo", "lambdapo_validated", "torch_eager", "torch_compile")
SCALING_SIZE = (512, 64)


def run(device: str, sizes, repeats: int) -> list[harness.Result]:
    results = []
    # dynamic=False: one graph per size, as a trainer with fixed P, G gets.
    compiled = torch.compile(reference.lambda_advantages, dynamic=False)
    for p, g in sizes:
        size = f"P={p},G={g}"
        gen = torch.Generator().manual_seed(0)
        rewards = torch.randint(0, 2, (p, g), generator=gen).float().to(device)
        scores = (-torch.rand(p, g, generator=gen)).to(device)
        need = REFERENCE_PAIR_TENSORS * p * g * g * 4
        for impl in IMPLS:
            if impl == "lambdapo_validated" and device != "cuda":
                continue  # on the CPU the check is part of the kernel's one pass
            if impl == "lambdapo":
                fn = lambda: lambdapo_ext.lambda_advantages(  # noqa: E731
                    rewards, scores, beta=1.0, validate=False)
            elif impl == "lambdapo_validated":
                fn = lambda: lambdapo_ext.lambda_advantages(rewards, scores, beta=1.0)  # noqa: E731
            elif impl == "torch_compile":  # inductor fuses the pair loop: no [P, G, G]
                fn = lambda: compiled(rewards, scores, beta=1.0)  # noqa: E731
            elif need > 0.5 * harness.available_bytes(device):
                results.append(harness.not_run(
                    OP, impl, size, device,
                    f"cannot allocate [P, G, G]: needs ~{need / 2**30:.0f} GiB, "
                    f"{harness.available_bytes(device) / 2**30:.0f} GiB free"))
                continue
            else:
                fn = lambda: reference.lambda_advantages(rewards, scores, beta=1.0)  # noqa: E731
            results.append(harness.measure(OP, impl, size, device, fn, repeats=repeats))
            print(f"  {size} {impl}: {results[-1].median_ms} ms, {results[-1].peak_mib} MiB "
                  f"{results[-1].status}", file=sys.stderr)
        if device == "cpu" and (p, g) == SCALING_SIZE:
            results.append(_thread_scaling(rewards, scores, repeats))
    print_targets(results, device)
    return results


def _thread_scaling(rewards, scores, repeats) -> harness.Result:
    """lambdapo at 1 thread and at torch's thread count."""
    p, g = rewards.shape
    fn = lambda: lambdapo_ext.lambda_advantages(  # noqa: E731
        rewards, scores, beta=1.0, validate=False)
    threads = torch.get_num_threads()
    times = {}
    try:
        for n in (1, threads):
            torch.set_num_threads(n)
            times[n] = harness.time_ms(fn, "cpu", warmup=2, repeats=max(repeats, 11))
    finally:
        torch.set_num_threads(threads)
    r = harness.Result(OP, "lambdapo_1_thread", f"P={p},G={g}", "cpu",
                       median_ms=round(times[1], 4))
    r.extra = {"threads": threads, f"ms_at_{threads}": round(times[threads], 4),
               "thread_speedup": round(times[1] / times[threads], 3)}
    return r


def print_targets(results: list[harness.Result], device: str) -> None:
    """The issue-17 target ratios of this run."""
    by = {(r.impl, r.size): r.median_ms for r in results if r.median_ms}
    need = 1.5 if device == "cuda" else 1.0
    print(f"# lambda_advantages targets ({device})")
    for size in dict.fromkeys(r.size for r in results if r.impl == "lambdapo"):
        ours, compiled = by.get(("lambdapo", size)), by.get(("torch_compile", size))
        line = f"  {size:<16} {ours} ms"
        if ours and compiled:
            line += f"  vs torch.compile {compiled / ours:.2f}x (target >= {need}x)"
        checked = by.get(("lambdapo_validated", size))
        if checked:
            line += f"  validated {checked} ms"
        if size == "P=512,G=4096" and device == "cuda" and ours:
            line += f"  ({'meets' if ours <= 4.0 else 'misses'} <= 4 ms)"
        print(line)
    for r in results:
        if r.impl == "lambdapo_1_thread":
            print(f"  {r.size:<16} 1 -> {r.extra['threads']} threads: "
                  f"{r.extra['thread_speedup']:.2f}x (target >= 1.6x on 2 cores)")


if __name__ == "__main__":
    harness.main(OP, __doc__.splitlines()[0], run, cpu_sizes=SIZES, cuda_sizes=CUDA_SIZES,
                 quick_sizes=QUICK_SIZES)
