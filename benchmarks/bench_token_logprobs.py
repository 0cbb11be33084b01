"""token_logprobs (fused log-prob + entropy from logits) vs torch eager
(fp32 log_softmax + gather), torch.compile of it, and on CUDA the fused cross-entropy
kernels of flash-attention (Triton), Liger-Kernel and cut-cross-entropy where installed.

    python benchmarks/bench_token_logprobs.py --device cpu   # or cuda, all; --quick

Modes: fwd (no grad) and fwd+bwd (random upstream gradient), each with and without entropy.
"lambdapo" runs with validate=False (no host sync, as the training loop calls it);
"lambdapo_validated" (CUDA) with the default target check. On CUDA the table's extra column
is the fraction of the HBM roofline (bytes of logits read/written: 1 pass forward, 3
passes forward+backward).

After the table, the issue-17 targets are printed: on CUDA the ratio against
flash-attention's Triton cross-entropy (>= 1.05x), fwd+bwd as a fraction of the measured
device-to-device copy rate (>= 88%) and the entropy overhead (<= 3%); on the CPU the ratio
against torch.compile (>= 1x) and the speed-up of fwd+bwd from 1 thread to all (>= 1.6x on
2 cores).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import peers  # noqa: E402

import lambdapo_ext  # noqa: E402
from lambdapo_ext import reference  # noqa: E402

OP = "token_logprobs"
CPU_SIZES = [(4096, 32000, torch.float32), (4096, 32000, torch.bfloat16), (1024, 151936, torch.bfloat16)]
CUDA_SIZES = [(4096, 32000, torch.bfloat16), (16384, 151936, torch.bfloat16)]
QUICK_SIZES = [(512, 8000, torch.float32), (512, 8000, torch.bfloat16)]


def implementations(device: str):
    """name -> fn(logits, targets, entropy) -> (logprobs, entropy or None), or a reason."""
    compiled = torch.compile(reference.token_logprobs, dynamic=False)
    impls = {
        "lambdapo": lambda x, t, ent: _pair(lambdapo_ext.token_logprobs(
            x, t, return_entropy=ent, validate=False)),
        "torch_eager": lambda x, t, ent: _pair(reference.token_logprobs(x, t, return_entropy=ent)),
        "torch_compile": lambda x, t, ent: _pair(compiled(x, t, return_entropy=ent)),
    }
    if device == "cuda":
        impls["lambdapo_validated"] = lambda x, t, ent: _pair(
            lambdapo_ext.token_logprobs(x, t, return_entropy=ent))
    impls.update(peers.logits_peers(device))
    return impls


def _pair(out):
    return out if isinstance(out, tuple) else (out, None)


def run(device: str, sizes, repeats: int) -> list[harness.Result]:
    results = []
    impls = implementations(device)
    for rows, vocab, dtype in sizes:
        gen = torch.Generator().manual_seed(0)
        logits = torch.randn(rows, vocab, generator=gen).to(device=device, dtype=dtype)
        targets = torch.randint(0, vocab, (rows,), generator=gen).to(device)
        grad = torch.randn(rows, generator=gen).to(device)
        elem = logits.element_size()
        for entropy in (False, True):
            for mode in ("fwd", "fwd+bwd"):
                size = f"N={rows},V={vocab},{str(dtype)[6:]},{mode}{',H' if entropy else ''}"
                for name, impl in impls.items():
                    if isinstance(impl, str):
                        results.append(harness.not_run(OP, name, size, device, impl))
                        continue
                    if entropy and name in peers.NO_ENTROPY:
                        results.append(harness.not_run(OP, name, size, device, "no entropy output"))
                        continue
                    fn = _case(impl, logits, targets, grad, entropy, mode)
                    r = harness.measure(OP, name, size, device, fn, repeats=repeats)
                    passes = 1 if mode == "fwd" else 3
                    harness.add_bandwidth(r, passes * rows * vocab * elem, device)
                    results.append(r)
                    print(f"  {size} {name}: {r.median_ms} ms {r.peak_mib} MiB {r.status}",
                          file=sys.stderr)
        if device == "cuda":
            results.append(_copy_rate(logits))
        else:
            results.append(_thread_scaling(impls["lambdapo"], logits, targets, grad, repeats))
    print_targets(results, device)
    return results


def _copy_rate(logits) -> harness.Result:
    """Device-to-device copy of the logits (read + write), the bandwidth ceiling."""
    rows, vocab = logits.shape
    size = f"N={rows},V={vocab},{str(logits.dtype)[6:]}"
    out = torch.empty_like(logits)
    r = harness.measure(OP, "copy", size, "cuda", lambda: out.copy_(logits), repeats=20)
    harness.add_bandwidth(r, 2 * logits.numel() * logits.element_size(), "cuda")
    return r


def _thread_scaling(impl, logits, targets, grad, repeats) -> harness.Result:
    """lambdapo fwd+bwd (no entropy) at 1 thread and at torch's thread count."""
    rows, vocab = logits.shape
    size = f"N={rows},V={vocab},{str(logits.dtype)[6:]},fwd+bwd"
    fn = _case(impl, logits, targets, grad, False, "fwd+bwd")
    threads = torch.get_num_threads()
    times = {}
    try:
        for n in (1, threads):
            torch.set_num_threads(n)
            times[n] = harness.time_ms(fn, "cpu", warmup=1, repeats=repeats)
    finally:
        torch.set_num_threads(threads)
    r = harness.Result(OP, "lambdapo_1_thread", size, "cpu", median_ms=round(times[1], 4))
    r.extra = {"threads": threads, f"ms_at_{threads}": round(times[threads], 4),
               "thread_speedup": round(times[1] / times[threads], 3)}
    return r


def print_targets(results: list[harness.Result], device: str) -> None:
    """The issue-17 target ratios of this run."""
    by = {(r.impl, r.size): r.median_ms for r in results if r.median_ms}
    print(f"# token_logprobs targets ({device})")
    sizes = sorted({r.size for r in results if r.impl == "lambdapo"},
                   key=lambda s: [r.size for r in results].index(s))
    for size in sizes:
        ours = by.get(("lambdapo", size))
        if device == "cuda":
            flash = by.get(("flash_attn_triton", size))
            line = f"  {size:<34} {ours} ms"
            if flash and ours:
                line += f"  vs flash {flash / ours:.2f}x (target >= 1.05x)"
            base = size.split(",H")[0]
            plain = by.get(("lambdapo", base))
            if size.endswith(",H") and plain and ours:
                line += f"  entropy overhead {100 * (ours / plain - 1):+.1f}% (target <= 3%)"
            lead = ",".join(size.split(",")[:3])
            copy = next((r for r in results if r.impl == "copy" and r.size == lead), None)
            if "fwd+bwd" in size and copy and ours and copy.median_ms:
                rows, vocab = (int(x.split("=")[1]) for x in lead.split(",")[:2])
                elem = 2 if ("bfloat16" in lead or "float16" in lead) else 4
                copy_rate = 2 * rows * vocab * elem / copy.median_ms
                rate = 3 * rows * vocab * elem / ours
                line += (f"  {100 * rate / copy_rate:.0f}% of copy rate "
                         f"({copy_rate / 1e9:.2f} TB/s; target >= 88%)")
        else:
            compiled = by.get(("torch_compile", size))
            line = f"  {size:<34} {ours} ms"
            if compiled and ours:
                line += f"  vs torch.compile {compiled / ours:.2f}x (target >= 1x)"
        print(line)
    for r in results:
        if r.impl == "lambdapo_1_thread":
            print(f"  {r.size:<34} 1 -> {r.extra['threads']} threads: "
                  f"{r.extra['thread_speedup']:.2f}x (target >= 1.6x on 2 cores)")
    ratios = [by[("torch_compile", s)] / by[("lambdapo", s)] for s in sizes
              if ("torch_compile", s) in by and ("lambdapo", s) in by]
    if ratios:
        print(f"  vs torch.compile: min {min(ratios):.2f}x, median "
              f"{statistics.median(ratios):.2f}x")


def _case(impl, logits, targets, grad, entropy, mode):
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                impl(logits, targets, entropy)
        return fwd

    def fwd_bwd():
        x = logits.detach().requires_grad_(True)
        lp, h = impl(x, targets, entropy)
        loss = (lp * grad).sum() + (h.sum() if h is not None else 0)
        loss.backward()
    return fwd_bwd


if __name__ == "__main__":
    harness.main(OP, __doc__.splitlines()[0], run, cpu_sizes=CPU_SIZES, cuda_sizes=CUDA_SIZES,
                 quick_sizes=QUICK_SIZES)
