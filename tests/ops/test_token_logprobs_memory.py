"""Peak memory of token_logprobs forward+backward on the CPU, measured in a fresh process
as the growth of its peak resident set (VmHWM) over the inputs."""

import pytest

from peak_memory import peak_extra_mib

ROWS, VOCAB = 4096, 32000
LOGITS_MIB = ROWS * VOCAB * 4 / 2**20

MEASURE = """
from lambdapo_ext import reference

impl = sys.argv[1]
fn = lambdapo_ext.token_logprobs if impl == "lambdapo" else reference.token_logprobs
torch.manual_seed(0)
logits = torch.randn(ROWS, VOCAB, requires_grad=True)
targets = torch.randint(0, VOCAB, (ROWS,))
grad = torch.randn(ROWS)
small = torch.randn(8, VOCAB, requires_grad=True)   # warm-up: lazy init outside the measurement
fn(small, targets[:8]).backward(grad[:8])
report(lambda: fn(logits, targets).backward(grad))
assert logits.grad is not None
""".replace("ROWS", str(ROWS)).replace("VOCAB", str(VOCAB))


@pytest.mark.slow
def test_forward_backward_peak_memory_stays_near_logits_plus_grad():
    ours = peak_extra_mib(MEASURE, "lambdapo")
    eager = peak_extra_mib(MEASURE, "reference")
    print(f"logits {LOGITS_MIB:.0f} MiB; peak extra: lambdapo {ours:.0f} MiB, "
          f"torch eager {eager:.0f} MiB")
    # The op's only big allocation is dlogits (one logits-sized buffer).
    assert ours <= 1.1 * LOGITS_MIB + 64
    assert eager >= 2 * LOGITS_MIB
    assert ours <= 0.5 * eager
