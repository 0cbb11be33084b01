"""Shared benchmark harness: median time after warm-up, peak extra memory, environment,
a printed table of ratios against a baseline, and results appended as JSON lines.

Peak memory is what a call allocates beyond its inputs: torch.cuda's peak allocation on
CUDA; on the CPU the process's peak resident set (VmHWM, reset before each call) over
the resident set before it, with glibc's mmap threshold pinned so freed buffers go back
to the system and every call starts from the same place.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Result:
    op: str
    impl: str
    size: str
    device: str
    median_ms: float | None = None
    peak_mib: float | None = None
    status: str = "ok"
    extra: dict = field(default_factory=dict)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or "cpu"
    try:
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        model = match.group(1).strip() if match else model
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def environment(device: str) -> dict:
    """Date, device, torch and commit of a run (LAMBDAPO_COMMIT names the commit where the
    tree is a copy without git, as on a lent GPU machine)."""
    commit = os.environ.get("LAMBDAPO_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "describe", "--always", "--dirty"],
                                    capture_output=True, text=True, cwd=Path(__file__).parent,
                                    timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit = "unknown"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "commit": commit or "unknown",
    }


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, *, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall time of ``fn`` in milliseconds after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _proc_status_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


_MALLOC_PINNED = False


def _pin_malloc_thresholds() -> None:
    global _MALLOC_PINNED
    if _MALLOC_PINNED:
        return
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 128 * 1024)
    libc.mallopt(m_trim_threshold, 128 * 1024)
    _MALLOC_PINNED = True


def peak_mib(fn: Callable[[], object], device: str) -> float:
    """Peak memory in MiB that one call of ``fn`` needs beyond what exists before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    _pin_malloc_thresholds()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _proc_status_kib("VmRSS")
    fn()
    return max(0, _proc_status_kib("VmHWM") - before) / 1024


def available_bytes(device: str) -> int:
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free
    return _meminfo_available()


def _meminfo_available() -> int:
    match = re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text())
    return int(match.group(1)) * 1024


def measure(op: str, impl: str, size: str, device: str, fn: Callable[[], object], *,
            repeats: int = 5, warmup: int = 2) -> Result:
    """Peak memory of the first call (after one warm-up), then the median time."""
    result = Result(op=op, impl=impl, size=size, device=device)
    try:
        fn()  # warm-up: compilation, lazy init
        result.peak_mib = round(peak_mib(fn, device), 2)
        result.median_ms = round(time_ms(fn, device, warmup=warmup - 1, repeats=repeats), 4)
    except (RuntimeError, torch.OutOfMemoryError) as exc:
        result.status = f"failed: {str(exc).splitlines()[0][:120]}"
    return result


# Peak HBM bandwidth by card name (bytes/s), for the roofline fraction.
HBM_BYTES_PER_S = {"H100 SXM": 3.35e12, "H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12,
                   "H200": 4.8e12, "A100-SXM4-80GB": 2.04e12, "A100-SXM4-40GB": 1.56e12}


def add_bandwidth(result: Result, bytes_moved: int, device: str) -> None:
    """Records achieved bandwidth and, for a known card, the fraction of its HBM peak."""
    if device != "cuda" or not result.median_ms:
        return
    achieved = bytes_moved / (result.median_ms / 1e3)
    result.extra["GB/s"] = round(achieved / 1e9, 1)
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in HBM_BYTES_PER_S.items() if k in name), None)
    if peak:
        result.extra["roofline"] = round(achieved / peak, 3)


def not_run(op: str, impl: str, size: str, device: str, reason: str) -> Result:
    return Result(op=op, impl=impl, size=size, device=device, status=f"not run: {reason}")


def print_table(results: list[Result], baseline: str, env: dict) -> None:
    """One row per (size, impl): time, peak memory, and the baseline's time and memory
    divided by this impl's (so > 1 means this impl is faster / leaner)."""
    print(f"# {env['device_name']} | torch {env['torch']} | commit {env['commit']} | {env['date']}")
    header = (f"{'size':<34} {'impl':<18} {'time ms':>11} {'peak MiB':>10} {'speedup':>9} "
              f"{'mem ratio':>9}  status / extra")
    print(header)
    print("-" * len(header))
    base = {(r.size, r.device): r for r in results if r.impl == baseline}
    for r in results:
        b = base.get((r.size, r.device))
        speed = mem = ""
        if b and b.median_ms and r.median_ms:
            speed = f"{b.median_ms / r.median_ms:.2f}x"
        if b and b.peak_mib and r.peak_mib is not None:
            # Under 0.1 MiB is at the resolution of the measurement: no meaningful ratio.
            mem = f"{b.peak_mib / r.peak_mib:.2f}x" if r.peak_mib >= 0.1 else "(~0 MiB)"
        t = f"{r.median_ms:.3f}" if r.median_ms is not None else "-"
        m = f"{r.peak_mib:.1f}" if r.peak_mib is not None else "-"
        extra = " ".join(f"{k}={v}" for k, v in r.extra.items())
        print(f"{r.size:<34} {r.impl:<18} {t:>11} {m:>10} {speed:>9} {mem:>9}  {r.status} {extra}")


def append_results(op: str, results: list[Result], env: dict) -> Path:
    """Appends one JSON line per result to benchmarks/results/<op>.jsonl."""
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{op}.jsonl"
    with path.open("a") as f:
        for r in results:
            f.write(json.dumps({**env, **asdict(r)}) + "\n")
    return path


def devices_from_arg(arg: str) -> list[str]:
    if arg == "all":
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if arg == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU is visible to torch")
    return [arg]


def main(op: str, description: str, run: Callable[[str, list, int], list[Result]], *,
         cpu_sizes: list, cuda_sizes: list, quick_sizes: list,
         baseline: str | dict[str, str] = "torch_eager") -> None:
    """The command line every bench_<op>.py shares: --device, --quick, --repeats, --no-save;
    runs ``run(device, sizes, repeats)``, prints the table (ratios against ``baseline``, or
    ``baseline[device]``) and appends the rows."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-save", action="store_true", help="do not append to results/")
    args = parser.parse_args()
    for device in devices_from_arg(args.device):
        env = environment(device)
        sizes = quick_sizes if args.quick else (cuda_sizes if device == "cuda" else cpu_sizes)
        results = run(device, sizes, args.repeats)
        base = baseline[device] if isinstance(baseline, dict) else baseline
        print_table(results, baseline=base, env=env)
        if not args.no_save:
            print(f"appended to {append_results(op, results, env)}")
