"""Peak memory of token_logprobs forward+backward on the CPU, measured in a fresh process
as the growth of its peak resident set (VmHWM) over the inputs."""

import json
import subprocess
import sys

import pytest

ROWS, VOCAB = 4096, 32000
LOGITS_MIB = ROWS * VOCAB * 4 / 2**20

MEASURE = """
import ctypes, json, re, sys
from pathlib import Path
import torch
import lambdapo_ext
from lambdapo_ext import reference

libc = ctypes.CDLL(None)
libc.mallopt(-3, 128 * 1024)   # M_MMAP_THRESHOLD: big buffers go back to the system
libc.mallopt(-1, 128 * 1024)   # M_TRIM_THRESHOLD

def status_kib(key):
    return int(re.search(rf"{key}:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))

impl = sys.argv[1]
fn = lambdapo_ext.token_logprobs if impl == "lambdapo" else reference.token_logprobs
torch.manual_seed(0)
logits = torch.randn(ROWS, VOCAB, requires_grad=True)
targets = torch.randint(0, VOCAB, (ROWS,))
grad = torch.randn(ROWS)
small = torch.randn(8, VOCAB, requires_grad=True)   # warm-up: lazy init outside the measurement
fn(small, targets[:8]).backward(grad[:8])
Path("/proc/self/clear_refs").write_text("5")
before = status_kib("VmRSS")
fn(logits, targets).backward(grad)
assert logits.grad is not None
print(json.dumps({"peak_extra_mib": (status_kib("VmHWM") - before) / 1024}))
""".replace("ROWS", str(ROWS)).replace("VOCAB", str(VOCAB))


def peak_extra_mib(impl: str) -> float:
    result = subprocess.run([sys.executable, "-c", MEASURE, impl], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_extra_mib"]


@pytest.mark.slow
def test_forward_backward_peak_memory_stays_near_logits_plus_grad():
    ours = peak_extra_mib("lambdapo")
    eager = peak_extra_mib("reference")
    print(f"logits {LOGITS_MIB:.0f} MiB; peak extra: lambdapo {ours:.0f} MiB, "
          f"torch eager {eager:.0f} MiB")
    # The op's only big allocation is dlogits (one logits-sized buffer).
    assert ours <= 1.1 * LOGITS_MIB + 64
    assert eager >= 2 * LOGITS_MIB
    assert ours <= 0.5 * eager
