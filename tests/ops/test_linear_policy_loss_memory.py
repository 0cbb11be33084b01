"""Peak memory of linear_policy_loss forward+backward on the CPU (issue 40's setting: N=4096,
H=1024, V=32000, fp32, token-mean PPO-clip), measured in a fresh process as the growth of its
peak resident set (VmHWM) over the inputs: at most lambdapo's unfused path
(linear_token_logprobs + the loss in torch) for a trained weight, and the hidden gradient plus
one chunk of logits for a frozen one (no [V, H] buffer of any kind)."""

import pytest

from peak_memory import peak_extra_mib

ROWS, WIDTH, VOCAB = 4096, 1024, 32000
MIB = 2**20
HIDDEN_GRAD_MIB = ROWS * WIDTH * 4 / MIB
CHUNK_MIB = 32          # the CPU chunk budget (policy_loss.CPU_CHUNK_BYTES)
SLACK_MIB = 16          # per-token vectors, allocator

MEASURE = """
from lambdapo_ext import reference
path, weight_mode = sys.argv[1].split(",")
train_weight = weight_mode == "trained"
torch.manual_seed(0)
hidden = torch.randn(ROWS, WIDTH, requires_grad=True)
weight = (torch.randn(VOCAB, WIDTH) / WIDTH ** 0.5).requires_grad_(train_weight)
targets = torch.randint(0, VOCAB, (ROWS,))
adv = torch.randn(ROWS)
tw = torch.full((ROWS,), 1.0 / ROWS)
old = -10.4 + 0.3 * torch.randn(ROWS)

def loss_of(rows):
    h, t = hidden[:rows], targets[:rows]
    if path == "fused":
        return lambdapo_ext.linear_policy_loss(h, weight, t, adv[:rows], tw[:rows],
                                               old_logprobs=old[:rows])[0]
    lp = lambdapo_ext.linear_token_logprobs(h, weight, t)
    return reference.policy_loss(lp, lp, t, adv[:rows], tw[:rows], old_logprobs=old[:rows])

# Warm-up (lazy init, BLAS buffers) on a few rows, then drop its gradients.
loss_of(8).backward()
hidden.grad = weight.grad = None
report(lambda: loss_of(ROWS).backward())
assert hidden.grad is not None and (weight.grad is not None) == train_weight
""".replace("ROWS", str(ROWS)).replace("WIDTH", str(WIDTH)).replace("VOCAB", str(VOCAB))


@pytest.mark.slow
def test_trained_weight_peak_is_at_most_the_unfused_paths():
    fused = peak_extra_mib(MEASURE, "fused,trained")
    unfused = peak_extra_mib(MEASURE, "unfused,trained")
    print(f"trained weight: peak extra {fused:.0f} MiB fused, {unfused:.0f} MiB unfused")
    assert fused <= unfused


@pytest.mark.slow
def test_frozen_weight_peak_is_hidden_gradient_plus_one_chunk():
    peak = peak_extra_mib(MEASURE, "fused,frozen")
    print(f"frozen weight: peak extra {peak:.0f} MiB, hidden gradient {HIDDEN_GRAD_MIB:.0f} MiB")
    assert peak <= HIDDEN_GRAD_MIB + CHUNK_MIB + SLACK_MIB
