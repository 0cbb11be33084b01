"""Peak memory of linear_token_logprobs forward+backward on the CPU (issue 16's shape:
N=4096, H=1024, V=32000, fp32), measured in a fresh process as the growth of its peak
resident set (VmHWM) over the inputs: at most the gradients it returns + 128 MiB, for a
trained and for a frozen lm-head weight."""

import pytest

from peak_memory import peak_extra_mib

ROWS, WIDTH, VOCAB = 4096, 1024, 32000
MIB = 2**20
HIDDEN_GRAD_MIB = ROWS * WIDTH * 4 / MIB
WEIGHT_GRAD_MIB = VOCAB * WIDTH * 4 / MIB
WORKING_MIB = 128

MEASURE = """
train_weight = sys.argv[1] == "trained"
torch.manual_seed(0)
hidden = torch.randn(ROWS, WIDTH, requires_grad=True)
weight = (torch.randn(VOCAB, WIDTH) / WIDTH ** 0.5).requires_grad_(train_weight)
targets = torch.randint(0, VOCAB, (ROWS,))
grad = torch.randn(ROWS)
# Warm-up (lazy init, BLAS buffers) on a few rows, then drop its gradients.
lambdapo_ext.linear_token_logprobs(hidden[:8], weight, targets[:8]).backward(grad[:8])
hidden.grad = weight.grad = None
report(lambda: lambdapo_ext.linear_token_logprobs(hidden, weight, targets).backward(grad))
assert hidden.grad is not None and (weight.grad is not None) == train_weight
""".replace("ROWS", str(ROWS)).replace("WIDTH", str(WIDTH)).replace("VOCAB", str(VOCAB))


@pytest.mark.slow
def test_trained_weight_peak_is_gradients_plus_working_set():
    peak = peak_extra_mib(MEASURE, "trained")
    grads = HIDDEN_GRAD_MIB + WEIGHT_GRAD_MIB
    print(f"trained weight: peak extra {peak:.0f} MiB, gradients {grads:.0f} MiB")
    assert peak <= grads + WORKING_MIB


@pytest.mark.slow
def test_frozen_weight_peak_is_hidden_gradient_plus_working_set():
    peak = peak_extra_mib(MEASURE, "frozen")
    print(f"frozen weight: peak extra {peak:.0f} MiB, hidden gradient {HIDDEN_GRAD_MIB:.0f} MiB")
    # No weight gradient, and no [V, H] buffer of any kind.
    assert peak <= HIDDEN_GRAD_MIB + WORKING_MIB
