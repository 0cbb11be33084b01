"""The update's policy loss fused with the lm-head (algorithm.fused_policy_loss): a training
step of the built-in model gives the loss, metrics and gradients of the unfused path, for
each aggregation, with the KL term, with pi_old from a separate forward and from the
update's own; where it cannot serve, auto falls back with one logged line and on refuses."""

import logging

import pytest
import torch

from lambdapo.behaviour import CorrectionSettings, SeparateForward, UpdateForward
from lambdapo.config import load_config
from lambdapo.micro_loss import fused_loss_blocker
from lambdapo.trainer import Trainer

from test_step import builtin, builtin_overrides  # noqa: F401  (builtin is a fixture)


def one_step(run_dir, fused: str, **extra):
    """(metrics, every parameter's gradient) of one step at lr 0 (the weights stay, the
    step's gradient stays in .grad)."""
    overrides = builtin_overrides(run_dir, **{"optim.lr": 0.0,
                                              "algorithm.fused_policy_loss": fused, **extra})
    with Trainer(load_config(None, overrides), progress=False) as trainer:
        assert trainer.micro_loss.fused == (fused == "on")
        metrics = trainer.train_step()
        grads = torch.cat([p.grad.flatten() for p in trainer.model.parameters()])
    return metrics, grads


# pi_old from the update's own forward needs rollout_is=none; mini_batches=2 takes it from a
# separate forward, with sequence-level correction weights.
@pytest.mark.parametrize("extra", [
    {"algorithm.rollout_is": "none"},
    {"algorithm.rollout_is": "none", "algorithm.loss_agg_mode": "seq-mean-token-mean",
     "algorithm.kl_coef": 0.1},
    {"algorithm.mini_batches": 2, "algorithm.rollout_is": "sequence",
     "algorithm.loss_agg_mode": "seq-mean-token-sum-norm", "algorithm.adv_estimator": "grpo"},
], ids=["token-mean", "seq-mean-token-mean+kl", "separate-forward+seq-is+dr-grpo"])
def test_fused_step_equals_the_unfused_one(tmp_path, extra):
    fused, fused_grads = one_step(tmp_path / "fused", "on", **extra)
    unfused, unfused_grads = one_step(tmp_path / "unfused", "off", **extra)
    assert fused["response_length"] == unfused["response_length"]   # same samples
    keys = ["loss", "grad_norm", "entropy", "ratio", "clip_frac", "mismatch/abs_mean"]
    for key in keys + (["kl"] if "kl" in unfused else []):
        assert fused[key] == pytest.approx(unfused[key], rel=1e-4, abs=1e-6), key
    scale = unfused_grads.abs().max()
    assert scale > 0
    torch.testing.assert_close(fused_grads, unfused_grads, rtol=1e-4, atol=1e-5 * scale)


def test_auto_falls_back_with_one_line_and_on_refuses(tmp_path, caplog):
    # The default run takes pi_old from the update's forward with token-level correction.
    with caplog.at_level(logging.INFO, logger="lambdapo"):
        with Trainer(load_config(None, builtin_overrides(tmp_path / "auto")),
                     progress=False) as trainer:
            assert not trainer.micro_loss.fused
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("policy loss:")]
    assert len(lines) == 1 and "rollout-correction weights" in lines[0], lines
    with pytest.raises(ValueError, match="fused_policy_loss=on.*rollout-correction"):
        Trainer(load_config(None, builtin_overrides(
            tmp_path / "on", **{"algorithm.fused_policy_loss": "on"})), progress=False)


def test_blockers(builtin):  # noqa: F811
    model, _ = builtin
    on_policy = UpdateForward(None, CorrectionSettings("none", 2.0))
    corrected = UpdateForward(None, CorrectionSettings("token", 2.0))
    separate = SeparateForward(model, None, None, None, CorrectionSettings("token", 2.0))
    assert fused_loss_blocker(model, on_policy) is None
    assert fused_loss_blocker(model, separate) is None
    assert "rollout-correction" in fused_loss_blocker(model, corrected)
    model.config.final_logit_softcapping = 30.0   # a transformed head
    try:
        assert "not a plain linear layer" in fused_loss_blocker(model, on_policy)
    finally:
        model.config.final_logit_softcapping = None
