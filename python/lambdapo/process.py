"""The process a training run lives in: its settings, made by the command line (or by a
script that runs :class:`~lambdapo.trainer.Trainer` itself) before the trainer is built
(torch's thread count, the seeds of Python's and torch's global generators, and on a CPU
glibc's malloc settings; building a Trainer changes none of these), and the watch for other
processes competing for its cores (:class:`CpuContention`)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import random
import time
from pathlib import Path

import torch

from .config import TrainConfig

log = logging.getLogger(__name__)


def configure_process(config: TrainConfig) -> None:
    """Sets torch's threads (``threads``, 0: torch's default), seeds Python's and torch's
    global generators from ``seed``, and on a CPU run keeps freed memory for reuse
    (:func:`keep_freed_memory`)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        keep_freed_memory()


def keep_freed_memory() -> None:
    """Asks glibc's malloc to keep freed memory for reuse instead of returning it to the
    system: a CPU step allocates activations of the same sizes again and again, and each
    one returned (every block of 128 KiB or more by default) is page-faulted and zeroed anew
    on its next use (~8k faults a step on the built-in model, ~5% of a step at 2 threads).
    The process keeps its peak memory until it exits. Nothing happens off glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        libc = None
    if libc is None or not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)       # glibc's largest: blocks below come from the heap
    libc.mallopt(m_trim_threshold, (1 << 31) - 1)  # and stay there once freed (an int)
    libc.mallopt(m_top_pad, 256 << 20)             # grown 256 MiB at a time


class CpuContention:
    """Notices, once, that other processes keep this machine's cores busy while the run's
    torch threads need them: torch's threads wait on each other at every op, so a step can
    take several times longer than with fewer threads (measured on 2 cores: 0.37 s idle,
    1.31 s beside one busy process, 0.55 s there with ``threads=1``). Linux only (reads
    ``/proc``); :meth:`after_step` is called after each training step and samples every
    ``every`` steps."""

    THRESHOLD_CORES = 0.5   # others' average use that makes the warning worth giving

    def __init__(self, threads: int, *, active: bool = True, every: int = 5):
        self.threads = threads
        self.every = every
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
        self.active = active and self.cores > 0 and Path("/proc/stat").exists()
        self.warned = False
        self._steps = 0
        self._last = _cpu_sample() if self.active else None

    def after_step(self) -> str | None:
        """The warning (also logged) when it is due, else None."""
        if not self.active or self.warned:
            return None
        self._steps += 1
        if self._steps % self.every:
            return None
        now = _cpu_sample()
        others = _others_busy_cores(self._last, now)
        self._last = now
        if others is None or others < self.THRESHOLD_CORES or \
                self.threads + others <= self.cores + 0.25:
            return None
        self.warned = True
        message = (f"other processes kept about {others:.1f} of this machine's {self.cores} "
                   f"cores busy during the last {self.every} steps while torch runs "
                   f"{self.threads} threads: its threads then wait on each other and steps "
                   f"take several times longer. Set threads="
                   f"{max(1, int(self.cores - others))} (or stop the other work) for a "
                   f"faster run")
        log.warning(message)
        return message


def _cpu_sample() -> tuple[float, float, float] | None:
    """(wall seconds, busy seconds of all CPUs, CPU seconds of this process and its live
    children), or None when /proc cannot be read."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        ticks = [int(v) for v in fields]
        hz = os.sysconf("SC_CLK_TCK")
        busy = (sum(ticks[:8]) - ticks[3] - ticks[4]) / hz   # all but idle and iowait
        own = _process_ticks(os.getpid())
        for child in _children(os.getpid()):
            own += _process_ticks(child)
        return time.monotonic(), busy, own / hz
    except (OSError, ValueError, IndexError):
        return None


def _others_busy_cores(before, after) -> float | None:
    if before is None or after is None or after[0] <= before[0]:
        return None
    wall = after[0] - before[0]
    return max(0.0, (after[1] - before[1]) - (after[2] - before[2])) / wall


def _process_ticks(pid: int) -> int:
    """utime + stime of ``pid`` (clock ticks); 0 when it has gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (the reward workers, for instance)."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return children
