"""linear_policy_loss (the PPO-clip loss fused with the lm-head, gradient made in the
forward) vs torch eager (materialized logits, fp32 log_softmax + gather, the loss in torch),
lambdapo's unfused path (linear_token_logprobs + the loss in torch), Liger-Kernel's chunked
LigerFusedLinearGRPOLoss, on CUDA Liger's fused linear cross-entropy + the loss in torch,
and the bare matmuls any implementation must do.

    pytest benchmarks/bench_policy_loss.py --benchmark-only [--bench-size full]
    python benchmarks/bench_policy_loss.py --device cpu   # or cuda, all; --quick
    python benchmarks/bench_policy_loss.py --interleaved [--rounds 5] [--quick] [--device cpu]
        the implementations of the fwd+bwd mode alternated round by round (for a machine
        shared with other work: every round of every implementation sees the same load),
        printing median and best times and peak extra memory; nothing saved

The loss is issue 40's: token-mean PPO-clip over N tokens in sequences of T = 512 (or N),
old log-probs within about 0.3 of the current ones (ratios on both sides of the clip
range), no KL or entropy term. Modes: "fwd+bwd" (hidden and weight trained; baseline three
bare matmuls: h W^T, dlogits W, dlogits^T h) and "frozen" (the weight does not require
grad, as with LoRA; baseline two). Peak memory is what one call needs beyond its inputs
(gradients included). The issue-40 targets are checked last.

Liger's loss runs where liger-kernel is importable (on the CPU its torch path: a venv with
torch and liger-kernel, e.g. ``/tmp/liger-venv/bin/python benchmarks/bench_policy_loss.py``
with this tree on PYTHONPATH); elsewhere its rows say why not.
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import lambdapo_ext  # noqa: E402
from lambdapo_ext import reference  # noqa: E402

OP = "linear_policy_loss"
RATIOS = {"cpu": ("lambdapo_unfused", "torch_eager", "liger_grpo", "bare_matmuls"),
          "cuda": ("bare_matmuls", "lambdapo_unfused", "torch_eager", "liger_grpo",
                   "liger_flce")}
KERNELS = ("linear_policy_loss_forward",)
SIZES = {
    "small": {"cpu": [(256, 128, 8000, torch.float32)], "cuda": [(256, 128, 8000, torch.float32)]},
    "full": {"cpu": [(4096, 1024, 32000, torch.float32)],
             "cuda": [(4096, 2048, 32000, torch.bfloat16), (16384, 4096, 151936, torch.bfloat16)]},
}
MODES = ("fwd+bwd", "frozen")
BARE_MATMULS = {"fwd+bwd": 3, "frozen": 2}
SEQUENCE_LENGTH = 512
IMPLS = ("bare_matmuls", "lambdapo", "lambdapo_unfused", "torch_eager", "liger_grpo",
         "liger_flce")
CLIP = 0.2

_INPUTS = harness.InputSlot()


def cases(options: harness.BenchOptions, device: str) -> list[harness.Case]:
    out = []
    for rows, hidden_size, vocab, dtype in options.sizes(SIZES, device):
        for mode in MODES:
            size = f"N={rows},H={hidden_size},V={vocab},{harness.dtype_name(dtype)},{mode}"
            flops = 2 * BARE_MATMULS[mode] * rows * hidden_size * vocab
            for impl in IMPLS:
                out.append(harness.Case(OP, impl, size, device,
                                        spec=(rows, hidden_size, vocab, dtype, mode),
                                        kernels=KERNELS, flops=flops))
    return out


# ------------------------------------------------------------------ the implementations
# Each: fn(hidden, weight, targets, advantages [N], token_weights [N], old [N], mask [B, T],
# seq_advantages [B]) -> loss.
def _lambdapo(h, w, t, adv, tw, old, mask, seq_adv, chunk_size=None):
    return lambdapo_ext.linear_policy_loss(h, w, t, adv, tw, old_logprobs=old, clip_low=CLIP,
                                           clip_high=CLIP, validate=False,
                                           chunk_size=chunk_size)[0]


def _torch_loss(lp, t, adv, tw, old):
    return reference.policy_loss(lp, torch.zeros_like(lp), t, adv, tw, old_logprobs=old,
                                 clip_low=CLIP, clip_high=CLIP)


def _lambdapo_unfused(h, w, t, adv, tw, old, mask, seq_adv):
    lp = lambdapo_ext.linear_token_logprobs(h, w, t, validate=False)
    return _torch_loss(lp, t, adv, tw, old)


def _eager(h, w, t, adv, tw, old, mask, seq_adv):
    logits = h @ w.t()
    lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, t.unsqueeze(-1)).squeeze(-1)
    return _torch_loss(lp, t, adv, tw, old)


def _bare(mode: str):
    def bare(h, w, t, adv, tw, old, mask, seq_adv):
        logits = h.detach() @ w.detach().t()
        logits @ w.detach()
        if mode == "fwd+bwd":
            logits.t() @ h.detach()
    return bare


@functools.cache
def _liger(device: str) -> Callable | str:
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError as exc:
        return f"liger-kernel not importable ({exc.name})"
    # Token-mean ("dapo": normalised by the batch's tokens), no KL, no reference model. The
    # chunks are liger's default (one sequence); its loss math is torch.compile'd on CUDA
    # only (inductor on the CPU adds nothing at [T]-sized tensors).
    loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo",
                                       epsilon_low=CLIP, epsilon_high=CLIP,
                                       compiled=device == "cuda")

    def liger(h, w, t, adv, tw, old, mask, seq_adv):
        b, length = mask.shape
        loss, _ = loss_fn(h.view(b, length, -1), w, t.view(b, length), mask, seq_adv,
                          old_per_token_logps=old.view(b, length))
        return loss
    return liger


@functools.cache
def _liger_flce(device: str) -> Callable | str:
    if device != "cuda":
        return "CUDA only (Triton)"
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError as exc:
        return f"liger-kernel not importable ({exc.name})"

    def flce(h, w, t, adv, tw, old, mask, seq_adv):
        lp = -liger_fused_linear_cross_entropy(h, w, t, reduction="none")
        return _torch_loss(lp, t, adv, tw, old)
    return flce


def implementation(impl: str, mode: str, device: str) -> Callable | str:
    """The function of ``impl``, or why it does not run; "lambdapo@R" is lambdapo with
    chunks of R rows (--interleaved)."""
    if impl.startswith("lambdapo@"):
        return functools.partial(_lambdapo, chunk_size=int(impl.split("@")[1]))
    return {"lambdapo": _lambdapo, "lambdapo_unfused": _lambdapo_unfused,
            "torch_eager": _eager, "bare_matmuls": _bare(mode)}.get(impl) or (
        _liger(device) if impl == "liger_grpo" else _liger_flce(device))


def _inputs(device: str, rows: int, hidden_size: int, vocab: int, dtype: torch.dtype):
    def make():
        gen = torch.Generator().manual_seed(0)
        hidden = torch.randn(rows, hidden_size, generator=gen).to(device=device, dtype=dtype)
        weight = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size ** 0.5).to(
            device=device, dtype=dtype)
        targets = torch.randint(0, vocab, (rows,), generator=gen).to(device)
        length = min(SEQUENCE_LENGTH, rows)
        seqs = rows // length
        seq_adv = torch.randn(seqs, generator=gen).to(device)
        adv = seq_adv.repeat_interleave(length)
        mask = torch.ones(seqs, length, dtype=torch.long, device=device)
        tw = torch.full((rows,), 1.0 / rows, device=device)
        with torch.no_grad():
            lp = lambdapo_ext.linear_token_logprobs(hidden, weight, targets)
        old = (lp + 0.3 * torch.randn(rows, generator=gen).to(device)).float()
        return hidden, weight, targets, adv, tw, old, mask, seq_adv
    return _INPUTS.get((device, rows, hidden_size, vocab, dtype), make)


def build(case: harness.Case) -> Callable[[], object]:
    rows, hidden_size, vocab, dtype, mode = case.spec
    impl = implementation(case.impl, mode, case.device)
    if isinstance(impl, str):
        pytest.skip(impl)
    return step(impl, mode, _inputs(case.device, rows, hidden_size, vocab, dtype),
                bare=case.impl == "bare_matmuls")


def step(impl: Callable, mode: str, inputs: tuple, bare: bool = False) -> Callable[[], object]:
    hidden, weight, rest = inputs[0], inputs[1], inputs[2:]
    if bare:
        return lambda: impl(hidden, weight, *rest)

    def fwd_bwd():
        h = hidden.detach().requires_grad_(True)
        w = weight.detach().requires_grad_(mode == "fwd+bwd")
        impl(h, w, *rest).backward()
    return fwd_bwd


def _gradients_mib(case: harness.Case) -> float:
    rows, hidden_size, vocab, dtype, mode = case.spec
    elem = torch.finfo(dtype).bits // 8
    trained = rows + (vocab if mode == "fwd+bwd" else 0)
    return trained * hidden_size * elem / harness.MIB


def test_linear_policy_loss(case: harness.Case, measure) -> None:
    result = measure(build(case))
    if case.impl != "bare_matmuls" and result.peak_mib is not None:
        result.extra["over_grads_MiB"] = round(result.peak_mib - _gradients_mib(case), 1)


def targets(rows: list[harness.Result], device: str) -> list[harness.Target]:
    """The issue-40 targets for every size measured."""
    index = harness.by_impl_size(rows)
    out = []

    def time_ratio(size: str, base: str, label: str, bound: float | None) -> None:
        out.append(harness.Target(size, label, harness.ratio(index, size, "lambdapo", base),
                                  bound, at_least=False))

    def memory(size: str, label: str, key: str, bound: float | None) -> None:
        row = index.get(("lambdapo", size))
        value = None if row is None else (row.peak_mib if key == "peak" else
                                          row.extra.get("over_grads_MiB"))
        out.append(harness.Target(size, label, value, bound, at_least=False, unit=" MiB"))

    for size in dict.fromkeys(r.size for r in rows if r.size.endswith("fwd+bwd")):
        if device == "cuda":
            time_ratio(size, "bare_matmuls", "time / three bare matmuls'", 1.15)
            time_ratio(size, "liger_grpo", "time / liger_grpo's (< 1)", 1.0)
            time_ratio(size, "liger_flce", "time / liger_flce + loss's (< 1)", 1.0)
            memory(size, "peak extra - gradients", "over_grads", 512)
        else:
            unfused = index.get(("lambdapo_unfused", size))
            time_ratio(size, "lambdapo_unfused", "time / lambdapo_unfused's", 0.85)
            time_ratio(size, "torch_eager", "time / torch_eager's", 1.05)
            time_ratio(size, "liger_grpo", "time / liger_grpo's", 0.70)
            time_ratio(size, "bare_matmuls", "time / three bare matmuls'", None)
            memory(size, "peak extra (bound: lambdapo_unfused's)", "peak",
                   unfused.peak_mib if unfused is not None else None)
    return out


# ------------------------------------------------------------------ interleaved runs
def interleaved(device: str, quick: bool, rounds: int, impls: tuple[str, ...]) -> None:
    """fwd+bwd of ``impls`` alternated round by round (each warmed up once first, then its
    peak extra memory measured once); prints median and best of ``rounds``."""
    env = harness.environment(device)
    print(f"# {env['device_name']} | torch {env['torch']} | commit {env['commit']} | "
          f"{env['date']} | interleaved, {rounds} rounds")
    presets = SIZES["small" if quick else "full"][device]
    for rows, hidden_size, vocab, dtype in presets:
        inputs = _inputs(device, rows, hidden_size, vocab, dtype)
        steps, peaks, times, cpu_times = {}, {}, {}, {}
        for name in impls:
            impl = implementation(name, "fwd+bwd", device)
            if isinstance(impl, str):
                print(f"{name}: not run ({impl})")
                continue
            steps[name] = step(impl, "fwd+bwd", inputs, bare=name == "bare_matmuls")
            steps[name]()
            peaks[name] = harness.peak_mib(steps[name], device)
            times[name], cpu_times[name] = [], []
        for _ in range(rounds):
            for name, fn in steps.items():
                if device == "cuda":
                    torch.cuda.synchronize()
                start, cpu_start = time.perf_counter(), time.process_time()
                fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu_start)
        size = f"N={rows},H={hidden_size},V={vocab},{harness.dtype_name(dtype)},fwd+bwd"
        # CPU time (all threads) is the work done: far steadier than wall time on a machine
        # shared with other work.
        print(f"{size}\n{'impl':<18} {'median s':>9} {'best s':>8} {'spread':>7} "
              f"{'cpu s':>7} {'peak MiB':>9}  rounds (wall s)")
        for name, ts in times.items():
            spread = (max(ts) - min(ts)) / min(ts)
            print(f"{name:<18} {statistics.median(ts):9.3f} {min(ts):8.3f} {spread:6.0%} "
                  f"{statistics.median(cpu_times[name]):7.2f} {peaks[name]:9.1f}  "
                  f"{' '.join(f'{t:.2f}' for t in ts)}")
        if "lambdapo" in times:
            ours, ours_cpu = times["lambdapo"], cpu_times["lambdapo"]
            for base in ("lambdapo_unfused", "torch_eager", "liger_grpo", "bare_matmuls"):
                if base in times:
                    median = statistics.median(ours) / statistics.median(times[base])
                    cpu = statistics.median(ours_cpu) / statistics.median(cpu_times[base])
                    print(f"lambdapo / {base}: median {median:.3f}x, best "
                          f"{min(ours) / min(times[base]):.3f}x, cpu time {cpu:.3f}x, memory "
                          f"{peaks['lambdapo'] / max(peaks[base], 1e-9):.2f}x")
        _INPUTS.clear()


if __name__ == "__main__":
    if "--interleaved" in sys.argv:
        import argparse

        parser = argparse.ArgumentParser(description="interleaved fwd+bwd timings")
        parser.add_argument("--interleaved", action="store_true")
        parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
        parser.add_argument("--quick", action="store_true")
        parser.add_argument("--rounds", type=int, default=5)
        parser.add_argument("--impls", help="comma-separated; lambdapo@R: chunks of R rows",
                            default=",".join(
            ("lambdapo", "lambdapo_unfused", "torch_eager", "liger_grpo", "bare_matmuls")))
        args = parser.parse_args()
        interleaved(args.device, args.quick, args.rounds, tuple(args.impls.split(",")))
        sys.exit(0)
    sys.exit(harness.main(__file__, __doc__))
