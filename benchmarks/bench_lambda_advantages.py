"""lambda_advantages vs the torch eager reference (which forms [P, G, G]) and
torch.compile of it.

    python benchmarks/bench_lambda_advantages.py --device cpu   # or cuda, all

Prints a table (speedup and memory ratio against torch eager) and appends the rows to
benchmarks/results/lambda_advantages.jsonl.
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
QUICK_SIZES = [(64, 16), (128, 256), (16, 1024)]
# Live [P, G, G] float32 tensors at the eager reference's peak (dr, ds, weight, product).
REFERENCE_PAIR_TENSORS = 4


IMPLS = ("lambdapo", "torch_eager", "torch_compile")


def run(device: str, sizes, repeats: int) -> list[harness.Result]:
    results = []
    compiled = torch.compile(reference.lambda_advantages, dynamic=False)
    for p, g in sizes:
        size = f"P={p},G={g}"
        gen = torch.Generator().manual_seed(0)
        rewards = torch.randint(0, 2, (p, g), generator=gen).float().to(device)
        scores = (-torch.rand(p, g, generator=gen)).to(device)
        need = REFERENCE_PAIR_TENSORS * p * g * g * 4
        for impl in IMPLS:
            if impl == "lambdapo":
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
    return results


if __name__ == "__main__":
    harness.main(OP, __doc__.splitlines()[0], run, cpu_sizes=SIZES, cuda_sizes=SIZES,
                 quick_sizes=QUICK_SIZES)
