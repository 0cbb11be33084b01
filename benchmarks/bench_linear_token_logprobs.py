"""linear_token_logprobs (log-probs from hidden states and the lm-head weight, chunked)
vs torch eager (full logits matmul, then fp32 log_softmax + gather), torch.compile of it,
the bare matmuls the op must do (fwd: h W^T; fwd+bwd: also dlogits W and dlogits^T h),
and on CUDA cut-cross-entropy and Liger-Kernel's fused linear cross-entropy.

    python benchmarks/bench_linear_token_logprobs.py --device cpu   # or cuda, all; --quick

On CUDA the extra column gives the achieved matmul TFLOP/s of the op (counting only the
matmuls it must do: 2NHV forward, 6NHV forward+backward).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import peers  # noqa: E402

import lambdapo_ext  # noqa: E402
from lambdapo_ext import reference  # noqa: E402

OP = "linear_token_logprobs"
CPU_SIZES = [(2048, 512, 32000, torch.float32), (2048, 512, 32000, torch.bfloat16)]
CUDA_SIZES = [(4096, 2048, 32000, torch.bfloat16), (16384, 4096, 151936, torch.bfloat16)]
QUICK_SIZES = [(256, 128, 8000, torch.float32)]


def _pair(out):
    return out if isinstance(out, tuple) else (out, None)


def implementations(device: str):
    """name -> fn(hidden, weight, targets, entropy) -> (logprobs, entropy or None)."""
    compiled = torch.compile(reference.linear_token_logprobs, dynamic=False)
    impls = {
        "lambdapo": lambda h, w, t, ent: _pair(
            lambdapo_ext.linear_token_logprobs(h, w, t, return_entropy=ent)),
        "torch_eager": lambda h, w, t, ent: _pair(
            reference.linear_token_logprobs(h, w, t, return_entropy=ent)),
        "torch_compile": lambda h, w, t, ent: _pair(compiled(h, w, t, return_entropy=ent)),
    }
    impls.update(peers.linear_peers(device))
    return impls


def run(device: str, sizes, repeats: int) -> list[harness.Result]:
    results = []
    impls = implementations(device)
    for rows, hidden_size, vocab, dtype in sizes:
        gen = torch.Generator().manual_seed(0)
        hidden = torch.randn(rows, hidden_size, generator=gen).to(device=device, dtype=dtype)
        weight = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size ** 0.5).to(
            device=device, dtype=dtype)
        targets = torch.randint(0, vocab, (rows,), generator=gen).to(device)
        grad = torch.randn(rows, generator=gen).to(device)
        for mode in ("fwd", "fwd+bwd"):
            size = f"N={rows},H={hidden_size},V={vocab},{str(dtype)[6:]},{mode}"
            flops = (2 if mode == "fwd" else 6) * rows * hidden_size * vocab
            bare = _bare_matmuls(hidden, weight, mode)
            r = harness.measure(OP, "bare_matmuls", size, device, bare, repeats=repeats)
            _add_tflops(r, flops, device)
            results.append(r)
            for name, impl in impls.items():
                if isinstance(impl, str):
                    results.append(harness.not_run(OP, name, size, device, impl))
                    continue
                fn = _case(impl, hidden, weight, targets, grad, mode)
                r = harness.measure(OP, name, size, device, fn, repeats=repeats)
                _add_tflops(r, flops, device)
                results.append(r)
                print(f"  {size} {name}: {r.median_ms} ms {r.peak_mib} MiB {r.status}",
                      file=sys.stderr)
    return results


def _bare_matmuls(hidden, weight, mode):
    def fn():
        logits = hidden @ weight.t()
        if mode != "fwd":
            logits @ weight
            logits.t() @ hidden
    return fn


def _add_tflops(result: harness.Result, flops: int, device: str) -> None:
    if device == "cuda" and result.median_ms:
        result.extra["TFLOP/s"] = round(flops / (result.median_ms / 1e3) / 1e12, 1)


def _case(impl, hidden, weight, targets, grad, mode):
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                impl(hidden, weight, targets, False)
        return fwd

    def fwd_bwd():
        h = hidden.detach().requires_grad_(True)
        w = weight.detach().requires_grad_(True)
        lp, _ = impl(h, w, targets, False)
        (lp * grad).sum().backward()
    return fwd_bwd


if __name__ == "__main__":
    harness.main(OP, __doc__.splitlines()[0], run, cpu_sizes=CPU_SIZES, cuda_sizes=CUDA_SIZES,
                 quick_sizes=QUICK_SIZES)
