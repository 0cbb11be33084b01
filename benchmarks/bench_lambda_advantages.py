"""lambda_advantages vs the torch eager reference (which forms [P, G, G]) and
torch.compile of it.

    pytest benchmarks/bench_lambda_advantages.py --benchmark-only [--bench-size full]
    python benchmarks/bench_lambda_advantages.py --device cpu   # or cuda, all; --quick

"lambdapo" runs with validate=False (no host sync, as the training loop calls it);
"lambdapo_validated" (CUDA) with the finiteness check; "lambdapo_1_thread" (CPU, at
P=512, G=64) at one torch thread. The issue-17 targets: the ratio against torch.compile at
every size (>= 1.5x on CUDA, >= 1x on the CPU), P=512, G=4096 in ms (<= 4 ms on H100/H200)
and, on the CPU, the speed-up from 1 thread to all at P=512, G=64 (>= 1.6x on 2 cores).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import lambdapo_ext  # noqa: E402
from lambdapo_ext import reference  # noqa: E402

OP = "lambda_advantages"
RATIOS = ("torch_eager", "torch_compile")
KERNELS = ("lambda_advantages",)
FULL_CPU = [(1024, 4), (1024, 16), (64, 16), (512, 64), (128, 256), (64, 1000), (16, 4096),
            (512, 4096)]
# GRPO-style runs use G = 4 to 64 with P up to ~1024.
FULL_CUDA = [(1024, 4), (1024, 16), (64, 16), (1024, 64), (512, 64), (128, 256), (64, 1000),
             (16, 4096), (512, 4096)]
SMALL = [(64, 16), (128, 256), (16, 1024)]
SIZES = {"small": {"cpu": SMALL, "cuda": SMALL}, "full": {"cpu": FULL_CPU, "cuda": FULL_CUDA}}
IMPLS = ("lambdapo", "lambdapo_validated", "torch_eager", "torch_compile")
SCALING_SIZE = (512, 64)
# Live [P, G, G] float32 tensors at the eager reference's peak (dr, ds, weight, product).
REFERENCE_PAIR_TENSORS = 4

_INPUTS = harness.InputSlot()


def cases(options: harness.BenchOptions, device: str) -> list[harness.Case]:
    out = []
    for p, g in options.sizes(SIZES, device):
        size = f"P={p},G={g}"
        for impl in IMPLS:
            if impl == "lambdapo_validated" and device != "cuda":
                continue  # on the CPU the check is part of the kernel's one pass
            out.append(harness.Case(OP, impl, size, device, spec=(p, g), kernels=KERNELS))
        if device == "cpu" and (p, g) == SCALING_SIZE:
            out.append(harness.Case(OP, "lambdapo_1_thread", size, device, spec=(p, g),
                                    threads=1, min_rounds=11, warmup=2))
    return out


@functools.cache
def _compiled() -> Callable:
    # dynamic=False: one graph per size, as a trainer with fixed P, G gets.
    return torch.compile(reference.lambda_advantages, dynamic=False)


def build(case: harness.Case) -> Callable[[], object]:
    p, g = case.spec
    device = case.device

    def make():
        gen = torch.Generator().manual_seed(0)
        rewards = torch.randint(0, 2, (p, g), generator=gen).float().to(device)
        return rewards, (-torch.rand(p, g, generator=gen)).to(device)
    rewards, scores = _INPUTS.get((device, p, g), make)
    if case.impl in ("lambdapo", "lambdapo_1_thread"):
        return lambda: lambdapo_ext.lambda_advantages(rewards, scores, beta=1.0, validate=False)
    if case.impl == "lambdapo_validated":
        return lambda: lambdapo_ext.lambda_advantages(rewards, scores, beta=1.0)
    if case.impl == "torch_compile":  # inductor fuses the pair loop: no [P, G, G]
        compiled = _compiled()
        return lambda: compiled(rewards, scores, beta=1.0)
    need, free = REFERENCE_PAIR_TENSORS * p * g * g * 4, harness.available_bytes(device)
    if need > 0.5 * free:
        pytest.skip(f"cannot allocate [P, G, G]: needs ~{need / 2**30:.0f} GiB, "
                    f"{free / 2**30:.0f} GiB free")
    return lambda: reference.lambda_advantages(rewards, scores, beta=1.0)


def test_lambda_advantages(case: harness.Case, measure) -> None:
    measure(build(case))


def targets(rows: list[harness.Result], device: str) -> list[harness.Target]:
    """The issue-17 targets of this run."""
    index = harness.by_impl_size(rows)
    need = 1.5 if device == "cuda" else 1.0
    out = []
    for size in dict.fromkeys(r.size for r in rows if r.impl == "lambdapo"):
        out.append(harness.Target(size, "lambdapo vs torch.compile",
                                  harness.ratio(index, size, "torch_compile", "lambdapo"), need))
        ours = index[("lambdapo", size)].median_ms
        if size == "P=512,G=4096" and device == "cuda":
            out.append(harness.Target(size, "lambdapo time", ours, 4.0, at_least=False,
                                      unit=" ms"))
        if ("lambdapo_1_thread", size) in index:
            out.append(harness.Target(
                size, "1 thread -> all threads speed-up (on 2 cores)",
                harness.ratio(index, size, "lambdapo_1_thread", "lambdapo"), 1.6))
    return out


if __name__ == "__main__":
    sys.exit(harness.main(__file__, __doc__))
