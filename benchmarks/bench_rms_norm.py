"""rms_norm (fused RMSNorm over the last dimension) vs transformers' LlamaRMSNorm arithmetic
in torch eager, torch.nn.functional.rms_norm, torch.compile of the eager form, and on CUDA
Liger-Kernel's Triton RMSNorm where installed.

    pytest benchmarks/bench_rms_norm.py --benchmark-only [--bench-size full]
    python benchmarks/bench_rms_norm.py --device cpu   # or cuda, all; --quick

Modes: fwd (no grad) and fwd+bwd (random upstream gradient; x and the weight both require
grad, as in training). On CUDA each row records GB/s and the fraction of the HBM roofline
for the least traffic the mode needs (fwd: read x, write y; fwd+bwd: that plus read x and
the upstream gradient, write dx), and "copy" is a device-to-device copy of x, the
bandwidth ceiling. The sizes are the hidden widths of the built-in model (64), Qwen2.5-0.5B
(896) and 7B-class models (4096).

Targets: the ratio against the fastest peer of each size (torch.compile on the CPU; the
faster of torch.compile and Liger on CUDA) >= 1x; on CUDA fwd+bwd at >= 80% of the
measured copy rate.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import peers  # noqa: E402

import lambdapo_ext  # noqa: E402
from lambdapo_ext import reference  # noqa: E402

OP = "rms_norm"
RATIOS = ("torch_eager", "torch_compile")
KERNELS = ("rms_norm_forward", "rms_norm_backward")
EPS = 1e-6
SIZES = {
    "small": {"cpu": [(2048, 64, torch.float32), (1024, 896, torch.bfloat16)],
              "cuda": [(2048, 64, torch.float32), (1024, 896, torch.bfloat16)]},
    "full": {"cpu": [(6144, 64, torch.float32), (4096, 896, torch.float32),
                     (4096, 896, torch.bfloat16), (4096, 4096, torch.bfloat16)],
             "cuda": [(6144, 64, torch.float32), (16384, 896, torch.bfloat16),
                      (16384, 4096, torch.bfloat16), (65536, 4096, torch.bfloat16)]},
}
IMPLS = ("lambdapo", "torch_eager", "torch_functional", "torch_compile", *peers.NORM_PEERS)
MODES = ("fwd", "fwd+bwd")

_INPUTS = harness.InputSlot()


def cases(options: harness.BenchOptions, device: str) -> list[harness.Case]:
    out = []
    for rows, dim, dtype in options.sizes(SIZES, device):
        lead = f"N={rows},D={dim},{harness.dtype_name(dtype)}"
        elem = torch.finfo(dtype).bits // 8
        for mode in MODES:
            passes = 2 if mode == "fwd" else 5
            for impl in IMPLS:
                out.append(harness.Case(OP, impl, f"{lead},{mode}", device,
                                        spec=(rows, dim, dtype, mode), kernels=KERNELS,
                                        bytes_moved=passes * rows * dim * elem))
        if device == "cuda":
            out.append(harness.Case(OP, "copy", lead, device, spec=(rows, dim, dtype),
                                    rounds=20, kernels=KERNELS,
                                    bytes_moved=2 * rows * dim * elem))
    return out


@functools.cache
def implementations(device: str) -> dict[str, Callable | str]:
    """name -> fn(x, weight, eps) -> y, or why it does not run here."""
    compiled = torch.compile(reference.rms_norm, dynamic=False)
    impls = {
        "lambdapo": lambda x, w, eps: lambdapo_ext.rms_norm(x, w, eps=eps),
        "torch_eager": lambda x, w, eps: reference.rms_norm(x, w, eps=eps),
        "torch_functional": lambda x, w, eps: F.rms_norm(x, (x.shape[-1],), w, eps),
        "torch_compile": lambda x, w, eps: compiled(x, w, eps=eps),
    }
    impls.update(peers.norm_peers(device))
    return impls


def _inputs(device: str, rows: int, dim: int, dtype: torch.dtype):
    def make():
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(rows, dim, generator=gen).to(device=device, dtype=dtype)
        weight = (torch.rand(dim, generator=gen) + 0.5).to(device=device, dtype=dtype)
        return x, weight, torch.randn(rows, dim, generator=gen).to(device=device, dtype=dtype)
    return _INPUTS.get((device, rows, dim, dtype), make)


def build(case: harness.Case) -> Callable[[], object]:
    rows, dim, dtype = case.spec[:3]
    x, weight, grad = _inputs(case.device, rows, dim, dtype)
    if case.impl == "copy":
        out = torch.empty_like(x)
        return lambda: out.copy_(x)
    impl = implementations(case.device)[case.impl]
    if isinstance(impl, str):
        pytest.skip(impl)
    if case.spec[3] == "fwd":
        def fwd():
            with torch.no_grad():
                impl(x, weight, EPS)
        return fwd

    def fwd_bwd():
        xg = x.detach().requires_grad_(True)
        wg = weight.detach().requires_grad_(True)
        impl(xg, wg, EPS).backward(grad)
    return fwd_bwd


def test_rms_norm(case: harness.Case, measure) -> None:
    measure(build(case))


def targets(rows: list[harness.Result], device: str) -> list[harness.Target]:
    """This run's targets: lambdapo against the fastest peer that ran, and on CUDA fwd+bwd
    against the copy rate."""
    peer_names = ("torch_compile", *peers.NORM_PEERS) if device == "cuda" else ("torch_compile",)
    # fwd+bwd moves at least 5 passes over x, the copy 2.
    return harness.fastest_peer_and_copy_targets(rows, device, peer_names, copy_passes=2.5)


if __name__ == "__main__":
    sys.exit(harness.main(__file__, __doc__))
