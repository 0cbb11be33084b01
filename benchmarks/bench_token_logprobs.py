"""token_logprobs (fused log-prob + entropy from logits) vs torch eager
(fp32 log_softmax + gather), torch.compile of it, and on CUDA the fused cross-entropy
kernels of flash-attention (Triton), Liger-Kernel and cut-cross-entropy where installed.

    python benchmarks/bench_token_logprobs.py --device cpu   # or cuda, all; --quick

Modes: fwd (no grad) and fwd+bwd (random upstream gradient), each with and without entropy.
On CUDA the table's extra column is the fraction of the HBM roofline (bytes of logits
read/written: 1 pass forward, 3 passes forward+backward).
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

OP = "token_logprobs"
CPU_SIZES = [(4096, 32000, torch.float32), (4096, 32000, torch.bfloat16), (1024, 151936, torch.bfloat16)]
CUDA_SIZES = [(4096, 32000, torch.bfloat16), (16384, 151936, torch.bfloat16)]
QUICK_SIZES = [(512, 8000, torch.float32), (512, 8000, torch.bfloat16)]


def implementations(device: str):
    """name -> fn(logits, targets, entropy) -> (logprobs, entropy or None), or a reason."""
    compiled = torch.compile(reference.token_logprobs, dynamic=False)
    impls = {
        "lambdapo": lambda x, t, ent: _pair(lambdapo_ext.token_logprobs(x, t, return_entropy=ent)),
        "torch_eager": lambda x, t, ent: _pair(reference.token_logprobs(x, t, return_entropy=ent)),
        "torch_compile": lambda x, t, ent: _pair(compiled(x, t, return_entropy=ent)),
    }
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
    return results


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
