"""Process-wide settings of a training run, made by the command line (or by a script that
runs :class:`~lambdapo.trainer.Trainer` itself) before the trainer is built: torch's thread
count, the seeds of Python's and torch's global generators, and on a CPU glibc's malloc
settings. Building a Trainer changes none of these."""

from __future__ import annotations

import ctypes
import ctypes.util
import random

import torch

from .config import TrainConfig


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
