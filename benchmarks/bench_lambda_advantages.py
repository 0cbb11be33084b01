"""lambda_advantages vs the torch eager reference (which forms [P, G, G]) and
torch.compile of it.

    python benchmarks/bench_lambda_advantages.py --device cpu   # or cuda, all

Prints a table (speedup and memory ratio against torch eager) and appends the rows to
benchmarks/results/lambda_advantages.jsonl.
"""

from __future__ import annotations

import argparse
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


def run(device: str, sizes, impls, repeats: int) -> list[harness.Result]:
    results = []
    compiled = torch.compile(reference.lambda_advantages, dynamic=False)
    for p, g in sizes:
        size = f"P={p},G={g}"
        gen = torch.Generator().manual_seed(0)
        rewards = torch.randint(0, 2, (p, g), generator=gen).float().to(device)
        scores = (-torch.rand(p, g, generator=gen)).to(device)
        need = REFERENCE_PAIR_TENSORS * p * g * g * 4
        for impl in impls:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    parser.add_argument("--impls", default="lambdapo,torch_eager,torch_compile")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-save", action="store_true", help="do not append to results/")
    args = parser.parse_args()
    impls = args.impls.split(",")
    for device in harness.devices_from_arg(args.device):
        env = harness.environment(device)
        results = run(device, QUICK_SIZES if args.quick else SIZES, impls, args.repeats)
        harness.print_table(results, baseline="torch_eager", env=env)
        if not args.no_save:
            print(f"appended to {harness.append_results(OP, results, env)}")


if __name__ == "__main__":
    main()
