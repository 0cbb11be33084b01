"""TRL's GRPO loss through linear_policy_loss (lambdapo.integrations.trl_fused_loss) equals
TRL's own formula (GRPOTrainer._compute_loss, TRL 1.16, restated here in float64 on
materialized logits) in loss and gradients, for each supported loss_type, with pi_old, the
KL term and vLLM's importance-sampling weights. Needs no TRL."""

from types import SimpleNamespace

import pytest
import torch

from lambdapo.integrations.trl_fused_loss import (fused_grpo_loss, grpo_token_weights,
                                                  unsupported_settings)

B, T, H, V = 3, 5, 16, 50
MAX_COMPLETION = 8
ACCUMULATION = 2
DAPO_NORMALIZER = 7.0


def trl_loss(hidden, weight, ids, mask, adv, old, ref, is_ratio, *, loss_type, beta, eps_low,
             eps_high, temperature):
    """TRL's _compute_loss on materialized float64 logits (token-level ratio)."""
    logits = (hidden.double() @ weight.double().t()) / temperature
    logps = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    old = logps.detach() if old is None else old.double()
    coef_1 = torch.exp(logps - old)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    a = adv.double().unsqueeze(1)
    per_token_loss = -torch.min(coef_1 * a, coef_2 * a)
    if is_ratio is not None:
        per_token_loss = per_token_loss * is_ratio.double()
    if beta != 0.0:
        d = ref.double() - logps
        per_token_loss = per_token_loss + beta * (torch.exp(d) - d - 1)
    m = mask.double()
    if loss_type == "grpo":
        return ((per_token_loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean() / ACCUMULATION
    if loss_type == "bnpo":
        return (per_token_loss * m).sum() / m.sum().clamp(min=1.0) / ACCUMULATION
    if loss_type == "dr_grpo":
        return (per_token_loss * m).sum() / (B * MAX_COMPLETION) / ACCUMULATION
    return (per_token_loss * m).sum() / DAPO_NORMALIZER


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("off_policy", [False, True])
def test_fused_loss_equals_trls(loss_type, off_policy):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * 0.3
    ids = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    adv = torch.randn(B, generator=gen)
    with torch.no_grad():
        logps = torch.log_softmax(hidden @ weight.t() / 0.9, -1).gather(
            -1, ids.unsqueeze(-1)).squeeze(-1)
    # Ratios on both sides of the clip range; weights of vLLM's correction around 1.
    old = logps + 0.4 * torch.randn(B, T, generator=gen) if off_policy else None
    ref = logps + 0.2 * torch.randn(B, T, generator=gen)
    is_ratio = 0.5 + torch.rand(B, T, generator=gen) if off_policy else None
    settings = dict(beta=0.05, temperature=0.9)

    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    expected = trl_loss(h64, w64, ids, mask, adv, old, ref, is_ratio, loss_type=loss_type,
                        eps_low=0.2, eps_high=0.28, **settings)
    expected.backward()

    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    weights = grpo_token_weights(mask, loss_type, accumulation=ACCUMULATION,
                                 max_completion_length=MAX_COMPLETION, normalizer=DAPO_NORMALIZER)
    loss, lp, entropy = fused_grpo_loss(h, w, ids, mask, adv, weights, old_logprobs=old,
                                        ref_logprobs=ref, is_ratio=is_ratio, epsilon_low=0.2,
                                        epsilon_high=0.28, **settings)
    loss.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(lp, (logps * mask).float(), rtol=1e-5, atol=1e-5)
    assert (entropy[mask == 0] == 0).all() and (entropy[mask == 1] > 0).all()


def test_unsupported_settings_are_named():
    args = SimpleNamespace(loss_type="dapo", importance_sampling_level="token", delta=None,
                           off_policy_mask_threshold=None, top_entropy_quantile=1.0,
                           entropy_coef=0.0, use_adaptive_entropy=False,
                           use_bias_correction_kl=True, beta=0.0)
    assert unsupported_settings(args) == []   # the KL correction matters only with beta
    args.beta = 0.04
    assert unsupported_settings(args) == ["use_bias_correction_kl=True with beta != 0"]
    args.beta = 0.0
    args.loss_type, args.importance_sampling_level, args.entropy_coef = "cispo", "sequence", 0.01
    assert unsupported_settings(args) == ["loss_type='cispo'",
                                          "importance_sampling_level='sequence'",
                                          "entropy_coef=0.01"]
    with pytest.raises(ValueError, match="loss_type 'sapo'"):
        grpo_token_weights(torch.ones(2, 3), "sapo")
