"""The two ceilings of the GPU at hand, measured rather than taken from a datasheet: device
memory bandwidth (a large device-to-device copy, bytes read plus bytes written) and the
bf16 matrix rate (an 8192^3 product on random data). Printed as one JSON line."""

from __future__ import annotations

import json

import torch


def _median_ms(fn, repeats: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    src = torch.randn(2**30, device="cuda")          # 4 GiB, far beyond L2
    dst = torch.empty_like(src)
    copy_ms = _median_ms(lambda: dst.copy_(src))
    del src, dst
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = _median_ms(lambda: a @ b)
    print(json.dumps({
        "device": torch.cuda.get_device_name(),
        "copy_TB_per_s": round(2 * 4 * 2**30 / (copy_ms / 1e3) / 1e12, 3),
        "bf16_matmul_TFLOP_per_s": round(2 * 8192**3 / (mm_ms / 1e3) / 1e12, 1),
    }))


if __name__ == "__main__":
    main()
