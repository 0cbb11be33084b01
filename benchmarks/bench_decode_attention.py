"""decode_attention (one decode step's attention over key-value buffers) vs the same in torch
eager (score matmul, softmax, value matmul), the baddbmm form the decode loop ran before,
torch's scaled_dot_product_attention, torch.compile of the eager form, and on CUDA
flash-attention's flash_attn_with_kvcache where installed.

    pytest benchmarks/bench_decode_attention.py --benchmark-only [--bench-size full]
    python benchmarks/bench_decode_attention.py --device cpu   # or cuda, all; --quick

Inputs: q [B, kv_heads, G, D], buffers [B, kv_heads, W, D] of which ``seen`` columns are
attended, an additive mask [B, W] with -inf on a few padding columns of every other row. The
sizes are the built-in model's decode step (128 rows = 16 prompts x 8 samples, 2 heads of 64,
W = 57), Qwen2.5-0.5B's attention (2 key-value heads, 7 query heads each) at a few hundred
and a few thousand columns, and a Llama-3-8B-like step on CUDA. Each row records the bytes
the buffers' attended part takes (keys and values read once), hence GB/s on CUDA.

Targets: the ratio against the fastest peer of each size (torch.compile on the CPU; the
fastest of torch.compile, SDPA and flash-attention on CUDA) >= 1x.
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import lambdapo_ext  # noqa: E402
from lambdapo_ext import reference  # noqa: E402

OP = "decode_attention"
RATIOS = ("torch_eager", "torch_compile")
KERNELS = ("decode_attention",)
# rows, kv heads, query heads per kv head, buffer width, head_dim, seen, dtype
SIZES = {
    "small": {"cpu": [(32, 2, 1, 57, 64, 32, torch.float32)],
              "cuda": [(32, 2, 1, 57, 64, 32, torch.float32)]},
    "full": {"cpu": [(128, 2, 1, 57, 64, 32, torch.float32),
                     (64, 2, 7, 320, 64, 256, torch.float32),
                     (64, 2, 7, 320, 64, 256, torch.bfloat16)],
             "cuda": [(128, 2, 1, 57, 64, 32, torch.float32),
                      (256, 2, 7, 2048, 64, 1536, torch.bfloat16),
                      (64, 8, 4, 4096, 128, 4096, torch.bfloat16)]},
}
IMPLS = ("lambdapo", "torch_eager", "torch_baddbmm", "torch_sdpa", "torch_compile", "flash_attn")
PEERS = {"cpu": ("torch_compile",), "cuda": ("torch_compile", "torch_sdpa", "flash_attn")}

_INPUTS = harness.InputSlot()


def cases(options: harness.BenchOptions, device: str) -> list[harness.Case]:
    out = []
    for spec in options.sizes(SIZES, device):
        rows, kv_heads, groups, width, dim, seen, dtype = spec
        size = f"B={rows},Hkv={kv_heads},G={groups},D={dim},seen={seen},{harness.dtype_name(dtype)}"
        elem = torch.finfo(dtype).bits // 8
        for impl in IMPLS:
            out.append(harness.Case(OP, impl, size, device, spec=spec, kernels=KERNELS,
                                    bytes_moved=2 * rows * kv_heads * seen * dim * elem))
    return out


def _sdpa(q, keys, values, seen, scale, mask):
    """torch's SDPA on [B, heads, 1, D] queries, key-value heads repeated for their groups."""
    rows, kv_heads, groups, dim = q.shape
    k = keys[:, :, :seen].repeat_interleave(groups, 1)
    v = values[:, :, :seen].repeat_interleave(groups, 1)
    out = F.scaled_dot_product_attention(q.reshape(rows, kv_heads * groups, 1, dim), k, v,
                                         attn_mask=mask[:, None, None, :seen], scale=scale)
    return out.view(q.shape)


def _flash_attn(device: str) -> Callable | str:
    if device != "cuda":
        return "CUDA only"
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError as exc:
        return f"flash-attn not importable ({exc.name})"

    def run(q, keys, values, seen, scale, mask):
        # flash-attn's layout: q [B, 1, heads, D], cache [B, W, kv_heads, D], lengths [B];
        # no additive mask (its rows attend columns 0 .. cache_seqlens - 1).
        rows, kv_heads, groups, dim = q.shape
        return flash_attn_with_kvcache(
            q.reshape(rows, 1, kv_heads * groups, dim), keys.transpose(1, 2), values.transpose(1, 2),
            cache_seqlens=torch.full((rows,), seen, dtype=torch.int32, device=q.device),
            softmax_scale=scale)
    return run


@functools.cache
def implementations(device: str) -> dict[str, Callable | str]:
    """name -> fn(q, keys, values, seen, scale, mask), or why it does not run here."""
    from lambdapo.rollout.static_decode import _attend

    compiled = torch.compile(reference.decode_attention, dynamic=False)
    return {
        "lambdapo": lambda q, k, v, seen, scale, mask: lambdapo_ext.decode_attention(
            q, k, v, seen, scale=scale, mask=mask),
        "torch_eager": lambda q, k, v, seen, scale, mask: reference.decode_attention(
            q, k, v, seen, scale=scale, mask=mask),
        "torch_baddbmm": lambda q, k, v, seen, scale, mask: _attend(
            q, k, v, seen, scale=scale, mask=mask),
        "torch_sdpa": _sdpa,
        "torch_compile": lambda q, k, v, seen, scale, mask: compiled(
            q, k, v, seen, scale=scale, mask=mask),
        "flash_attn": _flash_attn(device),
    }


def _inputs(device: str, spec):
    rows, kv_heads, groups, width, dim, seen, dtype = spec

    def make():
        gen = torch.Generator().manual_seed(0)
        q, keys, values = (torch.randn(rows, kv_heads, n, dim, generator=gen).to(device, dtype)
                           for n in (groups, width, width))
        mask = torch.zeros(rows, width)
        mask[1::2, :3] = -math.inf
        return q, keys, values, mask.to(device, dtype)
    return _INPUTS.get((device, spec), make)


def build(case: harness.Case) -> Callable[[], object]:
    impl = implementations(case.device)[case.impl]
    if isinstance(impl, str):
        pytest.skip(impl)
    q, keys, values, mask = _inputs(case.device, case.spec)
    seen, scale = case.spec[5], case.spec[4] ** -0.5

    def step():
        with torch.no_grad():
            impl(q, keys, values, seen, scale, mask)
    return step


def test_decode_attention(case: harness.Case, measure) -> None:
    measure(build(case))


def targets(rows: list[harness.Result], device: str) -> list[harness.Target]:
    """This run's targets: lambdapo against the fastest peer that ran."""
    return harness.fastest_peer_and_copy_targets(rows, device, PEERS[device])


if __name__ == "__main__":
    sys.exit(harness.main(__file__, __doc__))
