"""linear_token_logprobs (log-probs from hidden states and the lm-head weight, in tiles)
vs torch eager (full logits matmul, then fp32 log_softmax + gather), torch.compile of it,
the bare matmuls any implementation must do, and on CUDA cut-cross-entropy and
Liger-Kernel's fused linear cross-entropy (when importable).

    pytest benchmarks/bench_linear_token_logprobs.py --benchmark-only [--bench-size full]
    python benchmarks/bench_linear_token_logprobs.py --device cpu   # or cuda, all; --quick

Modes: "fwd" (no grad; baseline one bare matmul h W^T), "fwd+bwd" (hidden and weight
trained, a random upstream gradient; baseline three bare matmuls: h W^T, dlogits W,
dlogits^T h) and "frozen" (fwd+bwd with a weight that does not require grad, as with LoRA or
a kept-fixed tied embedding; baseline two bare matmuls). Each row records
speedup_vs_bare_matmuls (the mode's bare matmuls' time over the row's), over_grads_MiB
(peak extra memory minus the gradients the call returns) and, on CUDA, TFLOP/s of the
matmuls the mode must do. The issue-16 targets are checked last.
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
import peers  # noqa: E402

import lambdapo_ext  # noqa: E402
from lambdapo_ext import reference  # noqa: E402

OP = "linear_token_logprobs"
RATIOS = ("torch_eager", "bare_matmuls")
KERNELS = ("linear_token_logprobs_forward", "linear_token_logprobs_backward")
SIZES = {
    "small": {"cpu": [(256, 128, 8000, torch.float32)], "cuda": [(256, 128, 8000, torch.float32)]},
    "full": {"cpu": [(4096, 1024, 32000, torch.float32)],
             "cuda": [(4096, 2048, 32000, torch.bfloat16), (16384, 4096, 151936, torch.bfloat16)]},
}
MODES = ("fwd", "fwd+bwd", "frozen")
BARE_MATMULS = {"fwd": 1, "fwd+bwd": 3, "frozen": 2}
IMPLS = ("bare_matmuls", "lambdapo", "torch_eager", "torch_compile", *peers.LINEAR_PEERS)

_INPUTS = harness.InputSlot()


def cases(options: harness.BenchOptions, device: str) -> list[harness.Case]:
    out = []
    for rows, hidden_size, vocab, dtype in options.sizes(SIZES, device):
        for mode in MODES:
            size = f"N={rows},H={hidden_size},V={vocab},{str(dtype).removeprefix('torch.')},{mode}"
            flops = 2 * BARE_MATMULS[mode] * rows * hidden_size * vocab
            for impl in IMPLS:
                out.append(harness.Case(OP, impl, size, device,
                                        spec=(rows, hidden_size, vocab, dtype, mode),
                                        kernels=KERNELS, flops=flops))
    return out


@functools.cache
def implementations(device: str) -> dict[str, Callable | str]:
    """name -> fn(hidden, weight, targets) -> log-probs, or why it does not run."""
    compiled = torch.compile(reference.linear_token_logprobs, dynamic=False)
    impls = {
        "lambdapo": lambda h, w, t: lambdapo_ext.linear_token_logprobs(h, w, t),
        "torch_eager": lambda h, w, t: reference.linear_token_logprobs(h, w, t),
        "torch_compile": lambda h, w, t: compiled(h, w, t),
    }
    for name, peer in peers.linear_peers(device).items():
        impls[name] = peer if isinstance(peer, str) else (
            lambda h, w, t, peer=peer: peer(h, w, t, False)[0])
    return impls


def _inputs(device: str, rows: int, hidden_size: int, vocab: int, dtype: torch.dtype):
    def make():
        gen = torch.Generator().manual_seed(0)
        hidden = torch.randn(rows, hidden_size, generator=gen).to(device=device, dtype=dtype)
        weight = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size ** 0.5).to(
            device=device, dtype=dtype)
        targets = torch.randint(0, vocab, (rows,), generator=gen).to(device)
        return hidden, weight, targets, torch.randn(rows, generator=gen).to(device)
    return _INPUTS.get((device, rows, hidden_size, vocab, dtype), make)


def build(case: harness.Case) -> Callable[[], object]:
    rows, hidden_size, vocab, dtype, mode = case.spec
    hidden, weight, targets, grad = _inputs(case.device, rows, hidden_size, vocab, dtype)
    if case.impl == "bare_matmuls":
        def bare():
            logits = hidden @ weight.t()
            if mode != "fwd":
                logits @ weight
            if mode == "fwd+bwd":
                logits.t() @ hidden
        return bare
    if case.impl == "torch_compile" and mode == "frozen":
        pytest.skip("in no target, and recompiling for a frozen weight costs a GPU run minutes")
    impl = implementations(case.device)[case.impl]
    if isinstance(impl, str):
        pytest.skip(impl)
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                impl(hidden, weight, targets)
        return fwd

    def fwd_bwd():
        h = hidden.detach().requires_grad_(True)
        w = weight.detach().requires_grad_(mode == "fwd+bwd")
        (impl(h, w, targets) * grad).sum().backward()
    return fwd_bwd


def _gradients_mib(case: harness.Case) -> float:
    """MiB of the gradients a call of ``case``'s mode returns (hidden's, and weight's when
    it is trained)."""
    rows, hidden_size, vocab, dtype, mode = case.spec
    elem = torch.finfo(dtype).bits // 8
    trained_rows = {"fwd": 0, "fwd+bwd": rows + vocab, "frozen": rows}[mode]
    return trained_rows * hidden_size * elem / harness.MIB


def test_linear_token_logprobs(case: harness.Case, measure) -> None:
    result = measure(build(case))
    if case.impl != "bare_matmuls" and result.peak_mib is not None:
        result.extra["over_grads_MiB"] = round(result.peak_mib - _gradients_mib(case), 1)


def targets(rows: list[harness.Result], device: str) -> list[harness.Target]:
    """The issue-16 targets for every size measured."""
    index = harness.by_impl_size(rows)
    out = []

    def time_ratio(size: str, mode: str, base: str, label: str, bound: float) -> None:
        out.append(harness.Target(f"{size},{mode}", label, harness.ratio(
            index, f"{size},{mode}", "lambdapo", base), bound, at_least=False))

    def over_grads(size: str, mode: str, label: str, bound: float) -> None:
        row = index.get(("lambdapo", f"{size},{mode}"))
        value = row.extra.get("over_grads_MiB") if row is not None else None
        out.append(harness.Target(f"{size},{mode}", label, value, bound, at_least=False,
                                  unit=" MiB"))

    for size in dict.fromkeys(r.size.rsplit(",", 1)[0] for r in rows):
        if device == "cuda":
            time_ratio(size, "fwd", "bare_matmuls", "time / one bare matmul's", 1.05)
            time_ratio(size, "fwd+bwd", "bare_matmuls", "time / three bare matmuls'", 1.40)
            for peer in ("liger_fused_linear", "torch_eager", "cut_cross_entropy"):
                time_ratio(size, "fwd+bwd", peer, f"time / {peer}'s (< 1)", 1.0)
            time_ratio(size, "frozen", "torch_eager", "time / torch_eager's (< 1)", 1.0)
            over_grads(size, "fwd+bwd", "peak extra - gradients", 512)
            over_grads(size, "frozen", "peak extra - hidden gradient", 512)
        else:
            time_ratio(size, "fwd+bwd", "torch_eager", "time / torch_eager's", 1.35)
            time_ratio(size, "frozen", "torch_eager", "time / torch_eager's", 1.6)
            over_grads(size, "fwd+bwd", "peak extra - gradients", 128)
            over_grads(size, "frozen", "peak extra - hidden gradient", 128)
    return out


if __name__ == "__main__":
    sys.exit(harness.main(__file__, __doc__))
