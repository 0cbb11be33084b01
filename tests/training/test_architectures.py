"""Every causal-LM architecture trains: two steps on random-init small models of the Llama
(with biases), Qwen2, Qwen3, Phi-3 and Gemma-2 architectures, in float32 and bfloat16,
with the attention implementation transformers would choose (Gemma-2 has no SDPA path)."""

import json
import logging
import math

import pytest
import torch

from lambdapo.config import load_config
from lambdapo.trainer import Trainer
from tiny_model import ARCHITECTURES, make_tiny_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sums.jsonl"
    with open(path, "w") as f:
        for a in range(8):
            f.write(json.dumps({"prompt": f"{a}+{a + 1}=", "answer": str(2 * a + 1),
                                "solution": f"{a}+{a + 1}={2 * a + 1}"}) + "\n")
    return path


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("architecture", [a for a in ARCHITECTURES if a != "llama"])
def test_two_steps_train_every_architecture(tmp_path, data, architecture, dtype, caplog):
    model = make_tiny_model(tmp_path / "model", architecture=architecture)
    overrides = {"model.path": model, "model.dtype": dtype, "data.dataset": data,
                 "data.eval_dataset": data, "data.num_eval": 2, "steps": 2,
                 "prompts_per_step": 2, "rollout.group_size": 3, "rollout.max_new_tokens": 6,
                 "eval_samples": 1, "output_dir": tmp_path / "run", "optim.lr": 1e-3,
                 "device": "cpu", "reward.workers": 0}
    config = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    with caplog.at_level(logging.INFO, logger="lambdapo"):
        with Trainer(config, progress=False) as trainer:
            before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
            metrics = [trainer.train_step() for _ in range(2)]
            after = trainer.model.state_dict()
    for m in metrics:
        assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]), m
        assert math.isfinite(m["entropy"]) and m["entropy"] > 0
    assert any(not torch.equal(before[k], after[k]) for k in before)
    expected_attention = "eager" if architecture == "gemma2" else "sdpa"
    assert f"attention {expected_attention} (auto)" in caplog.text
    assert "generation:" in caplog.text and "training forward:" in caplog.text
