"""Peak memory of code run in a fresh process, as the growth of its peak resident set
(VmHWM) over what it held before (the memory tests of the log-prob ops share this)."""

import json
import subprocess
import sys

# Script prelude: big buffers go back to the system when freed, and report(run) prints the
# growth of the peak resident set while run() executes.
PRELUDE = """
import ctypes, json, re, sys
from pathlib import Path
import torch
import lambdapo_ext

libc = ctypes.CDLL(None)
libc.mallopt(-3, 128 * 1024)   # M_MMAP_THRESHOLD: big buffers go back to the system
libc.mallopt(-1, 128 * 1024)   # M_TRIM_THRESHOLD

def status_kib(key):
    return int(re.search(rf"{key}:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))

def report(run):
    Path("/proc/self/clear_refs").write_text("5")
    before = status_kib("VmRSS")
    run()
    print(json.dumps({"peak_extra_mib": (status_kib("VmHWM") - before) / 1024}))
"""


def peak_extra_mib(body: str, arg: str) -> float:
    """Runs PRELUDE + ``body`` (which calls ``report``) with ``arg`` as sys.argv[1] in a new
    Python process; returns the MiB it reported."""
    result = subprocess.run([sys.executable, "-c", PRELUDE + body, arg], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_extra_mib"]
