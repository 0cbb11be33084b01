"""linear_token_logprobs (log-probs from hidden states and the lm-head weight, in tiles)
vs torch eager (full logits matmul, then fp32 log_softmax + gather), torch.compile of it,
the bare matmuls any implementation must do, and on CUDA cut-cross-entropy and
Liger-Kernel's fused linear cross-entropy (when importable).

    python benchmarks/bench_linear_token_logprobs.py --device cpu   # or cuda, all; --quick

Modes: "fwd" (no grad; baseline one bare matmul h W^T), "fwd+bwd" (hidden and weight
trained, a random upstream gradient; baseline three bare matmuls: h W^T, dlogits W,
dlogits^T h) and "frozen" (fwd+bwd with a weight that does not require grad, as with LoRA or
a kept-fixed tied embedding; baseline two bare matmuls). Each row records x_bare (time over
the mode's bare matmuls), over_grads_MiB (peak extra memory minus the gradients the call
returns) and, on CUDA, TFLOP/s of the matmuls the mode must do. The issue-16 targets are
checked last and printed as "target" lines.
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
CPU_SIZES = [(4096, 1024, 32000, torch.float32)]
CUDA_SIZES = [(4096, 2048, 32000, torch.bfloat16), (16384, 4096, 151936, torch.bfloat16)]
QUICK_SIZES = [(256, 128, 8000, torch.float32)]
MODES = ("fwd", "fwd+bwd", "frozen")
BARE_MATMULS = {"fwd": 1, "fwd+bwd": 3, "frozen": 2}
MIB = 2**20


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
        elem = hidden.element_size()
        grads_mib = {"fwd": 0.0, "fwd+bwd": (rows + vocab) * hidden_size * elem / MIB,
                     "frozen": rows * hidden_size * elem / MIB}
        for mode in MODES:
            size = f"N={rows},H={hidden_size},V={vocab},{str(dtype)[6:]},{mode}"
            flops = 2 * BARE_MATMULS[mode] * rows * hidden_size * vocab
            bare = harness.measure(OP, "bare_matmuls", size, device,
                                   _bare_matmuls(hidden, weight, mode), repeats=repeats)
            mode_results = [bare]
            for name, impl in impls.items():
                if name == "torch_compile" and mode == "frozen":
                    continue  # in no target; its recompilation would cost the GPU run minutes
                if isinstance(impl, str):
                    results.append(harness.not_run(OP, name, size, device, impl))
                    continue
                fn = _case(impl, hidden, weight, targets, grad, mode)
                r = harness.measure(OP, name, size, device, fn, repeats=repeats)
                mode_results.append(r)
                print(f"  {size} {name}: {r.median_ms} ms {r.peak_mib} MiB {r.status}",
                      file=sys.stderr)
            for r in mode_results:
                _annotate(r, bare, flops, grads_mib[mode], device)
            results.extend(mode_results)
    for line in target_lines(results, device):
        print(line)
    return results


def _bare_matmuls(hidden, weight, mode):
    def fn():
        logits = hidden @ weight.t()
        if mode != "fwd":
            logits @ weight
        if mode == "fwd+bwd":
            logits.t() @ hidden
    return fn


def _annotate(r: harness.Result, bare: harness.Result, flops: int, grads_mib: float,
              device: str) -> None:
    if r.median_ms and bare.median_ms and r is not bare:
        r.extra["x_bare"] = round(r.median_ms / bare.median_ms, 3)
    if r.peak_mib is not None and r is not bare:
        r.extra["over_grads_MiB"] = round(r.peak_mib - grads_mib, 1)
    if device == "cuda" and r.median_ms:
        r.extra["TFLOP/s"] = round(flops / (r.median_ms / 1e3) / 1e12, 1)


def _case(impl, hidden, weight, targets, grad, mode):
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                impl(hidden, weight, targets, False)
        return fwd

    def fwd_bwd():
        h = hidden.detach().requires_grad_(True)
        w = weight.detach().requires_grad_(mode == "fwd+bwd")
        lp, _ = impl(h, w, targets, False)
        (lp * grad).sum().backward()
    return fwd_bwd


def target_lines(results: list[harness.Result], device: str) -> list[str]:
    """The issue-16 targets for every size measured, each "met" or "MISSED"."""
    by = {(r.size, r.impl): r for r in results}
    sizes = dict.fromkeys(r.size.rsplit(",", 1)[0] for r in results)
    lines = []

    def check(label: str, value, bound, unit: str = "x") -> None:
        if value is None:
            lines.append(f"target {label}: not measured")
            return
        verdict = "met" if value <= bound else "MISSED"
        lines.append(f"target {label}: {value:.3f}{unit} (bound {bound}{unit}) {verdict}")

    def ratio(size, mode, impl, base):
        a, b = by.get((f"{size},{mode}", impl)), by.get((f"{size},{mode}", base))
        if a is None or b is None or not a.median_ms or not b.median_ms:
            return None
        return a.median_ms / b.median_ms

    def over(size, mode):
        r = by.get((f"{size},{mode}", "lambdapo"))
        return r.extra.get("over_grads_MiB") if r is not None else None

    for size in sizes:
        if device == "cuda":
            check(f"{size} fwd <= 1.05x one bare matmul", ratio(size, "fwd", "lambdapo",
                                                                "bare_matmuls"), 1.05)
            check(f"{size} fwd+bwd <= 1.40x three bare matmuls",
                  ratio(size, "fwd+bwd", "lambdapo", "bare_matmuls"), 1.40)
            for peer in ("liger_fused_linear", "torch_eager", "cut_cross_entropy"):
                check(f"{size} fwd+bwd time / {peer}'s < 1",
                      ratio(size, "fwd+bwd", "lambdapo", peer), 1.0)
            check(f"{size} frozen time / torch_eager's < 1",
                  ratio(size, "frozen", "lambdapo", "torch_eager"), 1.0)
            check(f"{size} fwd+bwd peak extra - gradients <= 512 MiB",
                  over(size, "fwd+bwd"), 512, " MiB")
            check(f"{size} frozen peak extra - hidden gradient <= 512 MiB",
                  over(size, "frozen"), 512, " MiB")
        else:
            check(f"{size} fwd+bwd <= 1.35x torch_eager",
                  ratio(size, "fwd+bwd", "lambdapo", "torch_eager"), 1.35)
            check(f"{size} frozen <= 1.6x torch_eager frozen",
                  ratio(size, "frozen", "lambdapo", "torch_eager"), 1.6)
            check(f"{size} fwd+bwd peak extra - gradients <= 128 MiB",
                  over(size, "fwd+bwd"), 128, " MiB")
            check(f"{size} frozen peak extra - hidden gradient <= 128 MiB",
                  over(size, "frozen"), 128, " MiB")
    return lines


if __name__ == "__main__":
    harness.main(OP, __doc__.splitlines()[0], run, cpu_sizes=CPU_SIZES, cuda_sizes=CUDA_SIZES,
                 quick_sizes=QUICK_SIZES)
