"""LambdaPOTrainer: a real TRL run of a few steps on the CPU with a small model and dataset
the test makes. Skipped without TRL unless LAMBDAPO_REQUIRE_TRL=1 (CI), where that fails."""

import copy
import os

import pytest
import torch

if os.environ.get("LAMBDAPO_REQUIRE_TRL") != "1":
    pytest.importorskip("trl")

import lambdapo_ext  # noqa: E402
from lambdapo.integrations.trl import (LambdaPOConfig, LambdaPOTrainer,  # noqa: E402
                                       SemanticDensityTextReward)
from tiny_model import make_tiny_model  # noqa: E402

pytestmark = pytest.mark.slow
GROUP = 4


def digit_reward(completions, **kwargs) -> list[float]:
    """A deterministic reward with spread inside every group: the share of digits."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def dataset():
    from datasets import Dataset
    rows = [{"prompt": f"{a}+{b}=", "solution": f"{a}+{b}={a + b}"} for a in range(4)
            for b in range(4)]
    return Dataset.from_list(rows)


def config(tmp_path, **extra) -> LambdaPOConfig:
    values = dict(output_dir=str(tmp_path / "out"), num_generations=GROUP,
                  per_device_train_batch_size=2 * GROUP, max_completion_length=12, max_steps=3,
                  learning_rate=0.05, logging_steps=1, report_to="none", use_cpu=True,
                  save_strategy="no", seed=0, lambda_beta=2.0, semantic_density_weight=0.5)
    values.update(extra)
    return LambdaPOConfig(**values)


@torch.no_grad()
def sampled_token_logps(model, batch, temperature: float) -> torch.Tensor:
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    width = batch["completion_ids"].shape[1]
    logits = model(input_ids=ids, attention_mask=attention).logits[:, -width - 1:-1].float()
    logp = torch.log_softmax(logits / temperature, -1)
    return logp.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)


def test_lambdapo_trainer_uses_lambda_advantages_and_trains(tmp_path):
    model_dir = make_tiny_model(tmp_path / "model")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = LambdaPOTrainer(model=model, reward_funcs=[digit_reward], args=config(tmp_path),
                              train_dataset=dataset(), processing_class=tokenizer)
    assert trainer.reward_func_names == ["digit_reward", "semantic_density"]
    torch.testing.assert_close(trainer.reward_weights, torch.tensor([1.0, 0.5]))

    checks = []
    original = trainer._generate_and_score_completions

    def recorded(inputs):
        # The policy as it generated (no update happens inside this call).
        policy = copy.deepcopy(trainer.model).eval()
        out = original(inputs)
        completions = tokenizer.batch_decode(out["completion_ids"] * out["completion_mask"],
                                             skip_special_tokens=True)
        ids = [row[m.bool()].tolist() for row, m in zip(out["completion_ids"],
                                                         out["completion_mask"])]
        solutions = [x["solution"] for x in inputs]
        rewards = torch.tensor(digit_reward(completions)) + 0.5 * torch.tensor(
            SemanticDensityTextReward(tokenizer)([x["prompt"] for x in inputs], completions, ids,
                                             solution=solutions))
        logps = sampled_token_logps(policy, out, trainer.temperature)
        mask = out["completion_mask"].float()
        scores = (logps * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        expected = lambdapo_ext.lambda_advantages(rewards.view(-1, GROUP),
                                                  scores.view(-1, GROUP), beta=2.0).view(-1)
        grpo = rewards.view(-1, GROUP) - rewards.view(-1, GROUP).mean(-1, keepdim=True)
        checks.append((out["advantages"], expected, grpo.view(-1),
                       list(trainer._logs["advantages"])[-len(expected):]))
        return out

    trainer._generate_and_score_completions = recorded
    trainer.train()

    assert len(checks) == 3
    for used, expected, grpo_centered, logged in checks:
        torch.testing.assert_close(used, expected, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(used, grpo_centered / grpo_centered.std().clamp(min=1e-4))
        assert logged == pytest.approx(used.tolist(), rel=1e-4, abs=1e-6)
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, initial[k])]
    assert len(changed) == len(initial)
    logged_metrics = [h for h in trainer.state.log_history if "lambdapo/advantage_abs_mean" in h]
    assert len(logged_metrics) == 3


def test_a_plain_grpo_config_and_bad_settings(tmp_path):
    from trl import GRPOConfig
    model_dir = make_tiny_model(tmp_path / "model")
    args = GRPOConfig(output_dir=str(tmp_path / "out"), num_generations=GROUP,
                      per_device_train_batch_size=GROUP, max_completion_length=8,
                      report_to="none", use_cpu=True)
    trainer = LambdaPOTrainer(model=str(model_dir), reward_funcs=digit_reward, args=args,
                              train_dataset=dataset())
    assert trainer.reward_func_names == ["digit_reward"]
    with pytest.raises(ValueError, match="lambda_normalize"):
        config(tmp_path, lambda_normalize="median")
    with pytest.raises(ValueError, match="lambda_score"):
        config(tmp_path, lambda_score="max")
    args.multi_objective_aggregation = "normalize_then_sum"
    with pytest.raises(ValueError, match="multi_objective_aggregation"):
        LambdaPOTrainer(model=str(model_dir), reward_funcs=digit_reward, args=args,
                        train_dataset=dataset())


def test_semantic_density_reward_needs_its_column_and_tokenizer(tmp_path):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(make_tiny_model(tmp_path / "model"))
    reward = SemanticDensityTextReward(tokenizer, solution_column="reference")
    ids = tokenizer("1+1=2", add_special_tokens=False)["input_ids"]
    assert reward(["p"], ["1+1=2"], [ids], reference=["1+1=2"]) == [pytest.approx(1.0)]
    with pytest.raises(KeyError, match="reference"):
        reward(["p"], ["x"], [ids], solution=["1+1=2"])
    with pytest.raises(RuntimeError, match="tokenizer"):
        SemanticDensityTextReward()(["p"], ["x"], [ids], solution=["1"])


def test_groups_spanning_two_processes_are_gathered(tmp_path):
    """Two CPU processes (torch.distributed, gloo), each holding half of every group."""
    import subprocess
    import sys
    from pathlib import Path
    make_tiny_model(tmp_path / "model")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(root), str(root / "python"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         str(root / "tests" / "integrations" / "trl_two_processes.py"), str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in (0, 1):
        assert f"process {rank}: advantages match" in result.stdout


def test_the_gsm8k_example_runs(tmp_path):
    """examples/trl/train_gsm8k.py, two steps on the tiny model and two GSM8K-style rows."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    model_dir = make_tiny_model(tmp_path / "model")
    rows = [{"question": "1+2?", "answer": "1+2=<<1+2=3>>3\n#### 3"},
            {"question": "2+2?", "answer": "2+2=<<2+2=4>>4\n#### 4"}]
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, str(root / "examples" / "trl" / "train_gsm8k.py"), "--model",
         str(model_dir), "--data", str(data), "--output-dir", str(tmp_path / "out"),
         "--max-steps", "2", "--num-generations", "4", "--prompts-per-step", "1",
         "--max-completion-length", "8", "--learning-rate", "0.01", "--cpu"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "python")])})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert "rewards/accuracy/mean" in result.stdout + result.stderr


def test_the_example_runs_offline_from_a_clone_on_its_defaults(tmp_path):
    """No --model and no --data: the built-in model and task, nothing downloaded."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, str(root / "examples" / "trl" / "train_gsm8k.py"), "--output-dir",
         str(tmp_path / "out"), "--max-steps", "2", "--num-generations", "4",
         "--prompts-per-step", "1", "--limit", "16"], capture_output=True, text=True,
        timeout=600, cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
             "HF_DATASETS_OFFLINE": "1",
             "PYTHONPATH": os.pathsep.join([str(root), str(root / "python")])})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_scores_prefer_the_samplers_log_probs(tmp_path):
    """With TRL's vLLM the sampler's log-probs are the scores, else TRL's old log-probs."""
    model_dir = make_tiny_model(tmp_path / "model")
    trainer = LambdaPOTrainer(model=str(model_dir), reward_funcs=digit_reward,
                              args=config(tmp_path, semantic_density_weight=0.0),
                              train_dataset=dataset())
    sampling, old = torch.full((2, 3), -0.5), torch.full((2, 3), -0.25)
    assert trainer._sampled_logps({"sampling_per_token_logps": sampling,
                                   "old_per_token_logps": old}) is sampling
    assert trainer._sampled_logps({"old_per_token_logps": old}) is old


def test_fused_loss_refuses_what_it_does_not_implement(tmp_path):
    model_dir = make_tiny_model(tmp_path / "model")
    args = config(tmp_path, lambdapo_fused_loss=True, loss_type="cispo")
    with pytest.raises(ValueError, match="lambdapo_fused_loss=True does not support "
                                         "loss_type='cispo'"):
        LambdaPOTrainer(model=str(model_dir), reward_funcs=digit_reward, args=args,
                        train_dataset=dataset())


def one_sgd_step(tmp_path, model_dir, monkeypatch, dtype=torch.float32, **extra):
    """The weights' change of one TRL step, the rollouts it trained on and how many fused-loss
    calls made it. Float32 (GRPOConfig's default bf16=True runs TRL's lm-head in bfloat16
    under autocast), SGD at lr 1 without clipping: the update is minus the gradient. The eos
    token is favoured while sampling so that completions end at different lengths, and a
    reference model is made unlike the policy so that the KL term has a gradient."""
    from transformers import AutoModelForCausalLM
    calls = []
    fused_op = lambdapo_ext.linear_policy_loss
    monkeypatch.setattr(lambdapo_ext, "linear_policy_loss",
                        lambda *a, **k: calls.append(1) or fused_op(*a, **k))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    eos = model.config.eos_token_id
    args = config(tmp_path, max_steps=1, optim="sgd", learning_rate=1.0, max_grad_norm=0.0,
                  bf16=False, semantic_density_weight=0.0, per_device_train_batch_size=GROUP,
                  gradient_accumulation_steps=2,
                  generation_kwargs={"sequence_bias": [[[eos], 2.0]]}, **extra)
    trainer = LambdaPOTrainer(model=model, reward_funcs=[digit_reward], args=args,
                              train_dataset=dataset())
    if trainer.ref_model is not None:
        with torch.no_grad():
            trainer.ref_model.get_output_embeddings().weight.mul_(0.5)
    rollouts = []
    original = trainer._generate_and_score_completions

    def recorded(inputs):
        out = original(inputs)
        rollouts.append({k: out[k] for k in ("completion_ids", "completion_mask", "advantages")})
        return out

    trainer._generate_and_score_completions = recorded
    trainer.train()
    update = {k: v - before[k] for k, v in trainer.model.state_dict().items()}
    return update, before, rollouts, len(calls)


@pytest.fixture
def one_thread():
    """Tiny matmuls: a thread pool only contends on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("loss_type,beta", [("grpo", 0.0), ("dapo", 0.0), ("bnpo", 0.0),
                                            ("dr_grpo", 0.0), ("dapo", 0.1)])
def test_fused_loss_updates_the_weights_like_trl(tmp_path, monkeypatch, one_thread, loss_type,
                                                 beta):
    """One real TRL step (two accumulated micro-batches) with lambdapo_fused_loss and one
    without, from the same weights and seed, move every weight by the same amount to float32
    rounding."""
    model_dir = make_tiny_model(tmp_path / "model")
    extra = dict(loss_type=loss_type, beta=beta)
    if beta:
        extra["use_bias_correction_kl"] = False
    trl_update, before, trl_rollouts, trl_calls = one_sgd_step(
        tmp_path, model_dir, monkeypatch, **extra)
    fused_update, _, fused_rollouts, fused_calls = one_sgd_step(
        tmp_path, model_dir, monkeypatch, lambdapo_fused_loss=True, **extra)

    assert (trl_calls, fused_calls) == (0, 2)
    assert_same_rollouts(fused_rollouts, trl_rollouts)
    lengths = trl_rollouts[0]["completion_mask"].sum(1)
    assert lengths.min() < lengths.max()   # the loss types aggregate differently
    for name in trl_update:
        assert_same_update(fused_update[name], trl_update[name], before[name], name)


def test_fused_loss_keeps_the_float32_head_of_a_bfloat16_model(tmp_path, monkeypatch,
                                                                one_thread):
    """cast_lm_head_to_fp32 on a bfloat16 model: TRL's head runs in float32 on the bfloat16
    states, and so does the fused loss's (it ran in bfloat16: 3e-3 of the update off)."""
    model_dir = make_tiny_model(tmp_path / "model")
    extra = dict(dtype=torch.bfloat16, cast_lm_head_to_fp32=True, loss_type="dapo")
    trl_update, before, trl_rollouts, _ = one_sgd_step(tmp_path, model_dir, monkeypatch, **extra)
    fused_update, _, fused_rollouts, fused_calls = one_sgd_step(
        tmp_path, model_dir, monkeypatch, lambdapo_fused_loss=True, **extra)
    assert fused_calls == 2
    assert_same_rollouts(fused_rollouts, trl_rollouts)
    name = "lm_head.weight"
    assert trl_update[name].dtype == torch.float32
    assert_same_update(fused_update[name], trl_update[name], before[name], name)


def assert_same_rollouts(rollouts, expected) -> None:
    for batch, expected_batch in zip(rollouts, expected, strict=True):
        for key, value in expected_batch.items():
            torch.testing.assert_close(batch[key], value, rtol=0, atol=0)


def assert_same_update(update, expected, before, name: str) -> None:
    """Within 1e-4 of the update, plus the rounding of weight + update to float32."""
    scale = expected.abs().max()
    assert scale > 0, name
    tolerance = 1e-4 * scale + 2 * torch.finfo(torch.float32).eps * before.abs().max()
    assert (update - expected).abs().max() <= tolerance, name
