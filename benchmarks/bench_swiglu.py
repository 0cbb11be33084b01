"""swiglu (fused silu(gate) * up) vs transformers' gated-MLP arithmetic in torch eager,
torch.compile of it, and on CUDA Liger-Kernel's Triton SiLU-mul where installed.

    pytest benchmarks/bench_swiglu.py --benchmark-only [--bench-size full]
    python benchmarks/bench_swiglu.py --device cpu   # or cuda, all; --quick

Each implementation takes its natural layout: lambdapo the [N, 2I] output of one
concatenated gate-and-up projection, the others separate contiguous gate and up [N, I]
(two projections, as transformers and Liger run them). Modes: fwd (no grad) and fwd+bwd
(random upstream gradient, gate and up requiring grad). On CUDA each row records GB/s and
the fraction of the HBM roofline for the least traffic the mode needs (fwd: read gate and
up, write y; fwd+bwd: that plus read gate, up and the upstream gradient, write both
gradients), and "copy" is a device-to-device copy of gate_up, the bandwidth ceiling. The
sizes are the intermediate widths of the built-in model (384: a training micro-batch and a
decode step), Qwen2.5-0.5B (4864) and Llama-3-8B (14336).

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

OP = "swiglu"
RATIOS = ("torch_eager", "torch_compile")
KERNELS = ("swiglu_forward", "swiglu_backward")
SIZES = {
    "small": {"cpu": [(256, 384, torch.float32), (512, 896, torch.bfloat16)],
              "cuda": [(256, 384, torch.float32), (2048, 896, torch.bfloat16)]},
    "full": {"cpu": [(128, 384, torch.float32), (2944, 384, torch.float32),
                     (2048, 4864, torch.float32), (2048, 4864, torch.bfloat16)],
             "cuda": [(2944, 384, torch.float32), (16384, 4864, torch.bfloat16),
                      (32768, 14336, torch.bfloat16)]},
}
IMPLS = ("lambdapo", "torch_eager", "torch_compile", *peers.SWIGLU_PEERS)
MODES = ("fwd", "fwd+bwd")

_INPUTS = harness.InputSlot()


def cases(options: harness.BenchOptions, device: str) -> list[harness.Case]:
    out = []
    for rows, width, dtype in options.sizes(SIZES, device):
        lead = f"N={rows},I={width},{harness.dtype_name(dtype)}"
        elem = torch.finfo(dtype).bits // 8
        for mode in MODES:
            passes = 3 if mode == "fwd" else 8   # in units of N * I elements
            for impl in IMPLS:
                out.append(harness.Case(OP, impl, f"{lead},{mode}", device,
                                        spec=(rows, width, dtype, mode), kernels=KERNELS,
                                        bytes_moved=passes * rows * width * elem))
        if device == "cuda":
            out.append(harness.Case(OP, "copy", lead, device, spec=(rows, width, dtype),
                                    rounds=20, kernels=KERNELS,
                                    bytes_moved=4 * rows * width * elem))
    return out


def torch_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """transformers' LlamaMLP activation: act_fn(gate_proj(x)) * up_proj(x)."""
    return F.silu(gate) * up


@functools.cache
def implementations(device: str) -> dict[str, Callable | str]:
    """name -> fn(gate_up, gate, up) -> y (each uses its own layout), or why it does not run
    here."""
    compiled = torch.compile(torch_swiglu, dynamic=False)
    impls = {
        "lambdapo": lambda gate_up, gate, up: lambdapo_ext.swiglu(gate_up),
        "torch_eager": lambda gate_up, gate, up: torch_swiglu(gate, up),
        "torch_compile": lambda gate_up, gate, up: compiled(gate, up),
    }
    for name, peer in peers.swiglu_peers(device).items():
        impls[name] = peer if isinstance(peer, str) else (
            lambda gate_up, gate, up, peer=peer: peer(gate, up))
    return impls


def _inputs(device: str, rows: int, width: int, dtype: torch.dtype):
    def make():
        gen = torch.Generator().manual_seed(0)
        gate_up = (2 * torch.randn(rows, 2 * width, generator=gen)).to(device=device, dtype=dtype)
        gate, up = (half.contiguous() for half in gate_up.chunk(2, -1))
        grad = torch.randn(rows, width, generator=gen).to(device=device, dtype=dtype)
        return gate_up, gate, up, grad
    return _INPUTS.get((device, rows, width, dtype), make)


def build(case: harness.Case) -> Callable[[], object]:
    rows, width, dtype = case.spec[:3]
    gate_up, gate, up, grad = _inputs(case.device, rows, width, dtype)
    if case.impl == "copy":
        out = torch.empty_like(gate_up)
        return lambda: out.copy_(gate_up)
    impl = implementations(case.device)[case.impl]
    if isinstance(impl, str):
        pytest.skip(impl)
    if case.spec[3] == "fwd":
        def fwd():
            with torch.no_grad():
                impl(gate_up, gate, up)
        return fwd

    def fwd_bwd():
        packed = gate_up.detach().requires_grad_(True)
        g, u = gate.detach().requires_grad_(True), up.detach().requires_grad_(True)
        impl(packed, g, u).backward(grad)
    return fwd_bwd


def test_swiglu(case: harness.Case, measure) -> None:
    measure(build(case))


def targets(rows: list[harness.Result], device: str) -> list[harness.Target]:
    """This run's targets: lambdapo against the fastest peer that ran, and on CUDA fwd+bwd
    against the copy rate."""
    peer_names = ("torch_compile", *peers.SWIGLU_PEERS) if device == "cuda" else ("torch_compile",)
    # fwd+bwd moves at least 8 passes over N x I elements, the copy 4.
    return harness.fastest_peer_and_copy_targets(rows, device, peer_names, copy_passes=2)


if __name__ == "__main__":
    sys.exit(harness.main(__file__, __doc__))
