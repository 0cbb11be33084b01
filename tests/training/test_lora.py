"""LoRA through peft and gradient checkpointing, as a user turns them on: only the adapter
trains, the KL reference is the base with the adapter off (no second copy), checkpoints
hold the adapter and resume exactly, the run ends with a merged transformers folder that
eval and plain transformers load; gradient checkpointing gives the same loss and gradients
as without it."""

import json
import logging

import pytest
import torch

from lambdapo import cli
from lambdapo.batch import MicroBatch
from lambdapo.config import load_config
from lambdapo.logprobs import response_logprobs
from lambdapo.lora import apply_lora, served_parameters, target_modules
from lambdapo.loss import BatchTotals, policy_loss
from lambdapo.models import load_policy
from lambdapo.trainer import Trainer
from test_loop import TIMING, overrides, workspace  # noqa: F401 (fixture)

LORA = {"model.lora_rank": 4, "model.lora_alpha": 16, "optim.lr": 0.02}


def test_target_modules_accepts_verls_forms():
    assert target_modules(["all-linear"]) == "all-linear"
    assert target_modules("q_proj, v_proj") == ["q_proj", "v_proj"]
    assert target_modules(["q_proj", "k_proj,v_proj"]) == ["q_proj", "k_proj", "v_proj"]
    with pytest.raises(ValueError, match="target_modules"):
        target_modules([])


def test_served_weights_are_the_base_names_with_the_adapter_merged(workspace):
    root, model_dir = workspace
    model, _ = load_policy(load_config(None, [f"model.path={model_dir}"]).model,
                           torch.device("cpu"))
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    peft_model = apply_lora(model, 4, 8.0, ["q_proj", "v_proj"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    served = dict(served_parameters(model))
    assert sorted(served) == sorted(base)   # the names vLLM and transformers know
    layer = model.model.layers[0].self_attn.q_proj
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * (8.0 / 4)
    torch.testing.assert_close(served["model.layers.0.self_attn.q_proj.weight"],
                               base["model.layers.0.self_attn.q_proj.weight"] + delta)
    assert torch.equal(served["model.layers.0.self_attn.k_proj.weight"],
                       base["model.layers.0.self_attn.k_proj.weight"])
    with peft_model.disable_adapter():
        assert all(torch.equal(t, base[n]) for n, t in served_parameters(model))
    # The merged view leaves the model's own base weights untouched.
    assert torch.equal(layer.base_layer.weight, base["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.slow
def test_lora_run_trains_the_adapter_only_resumes_exactly_and_exports(workspace, caplog):
    root, model_dir = workspace
    extra = {**LORA, "algorithm.kl_coef": 0.1, "algorithm.ppo_epochs": 2,
             "algorithm.mini_batches": 2, "micro_batch_size": 4}
    config = load_config(None, overrides(root, model_dir, "lora", save_every=2, **extra))
    with caplog.at_level(logging.INFO, logger="lambdapo"):
        with Trainer(config, progress=False) as trainer:
            assert trainer.ref_model is None   # the reference is the base, adapter off
            trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
            assert trainable and all("lora_" in n for n in trainable)
            frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters()
                      if not p.requires_grad}
            summary = trainer.train()
            assert all(torch.equal(p, frozen[n]) for n, p in trainer.model.named_parameters()
                       if n in frozen)
            assert any(m["kl"] > 0 for m in trainer.history)   # the adapter moved the policy
            micro = MicroBatch.from_sequences([[1, 5, 6]], [[7, 8, 9]],
                                              trainer.tokenizer.pad_token_id,
                                              torch.device("cpu"))
            with torch.no_grad():
                trained = trainer.model(input_ids=torch.tensor([[1, 5, 6, 7, 8, 9]])).logits
    assert "LoRA rank 4" in caplog.text
    step = root / "lora" / "checkpoints" / "step-4"
    assert (step / "adapter_model.safetensors").exists()
    assert not (step / "model.safetensors").exists()   # the adapter, not a model copy
    # The merged export is a plain transformers model with the trained weights.
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(summary["merged_model"])
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=torch.tensor([[1, 5, 6, 7, 8, 9]])).logits, trained,
            rtol=1e-5, atol=1e-5)
    del micro
    # Resumed from step 2 it repeats steps 3 and 4 exactly.
    resumed = load_config(None, overrides(root, model_dir, "lora-resumed", **extra))
    with Trainer(resumed, resume=str(root / "lora" / "checkpoints" / "step-2"),
                 progress=False) as trainer:
        assert trainer.step == 2
        trainer.train()
    rows = lambda run: [{k: v for k, v in json.loads(x).items() if k not in TIMING}  # noqa
                        for x in (root / run / "metrics.jsonl").read_text().splitlines()]
    assert rows("lora")[2:] == rows("lora-resumed")


@pytest.mark.slow
def test_eval_of_a_lora_run_and_of_its_checkpoint(workspace, capsys):
    root, model_dir = workspace
    config = load_config(None, overrides(root, model_dir, "lora-eval", steps=1, **LORA))
    with Trainer(config, progress=False) as trainer:
        trainer.train()
    for target in (root / "lora-eval", root / "lora-eval" / "checkpoints" / "step-1",
                   root / "lora-eval" / "merged"):
        assert cli.main(["eval", "--model", str(target), "eval_samples=1"]) == 0, target
        result = json.loads(capsys.readouterr().out)
        assert result["prompts"] == 8 and 0 <= result["pass@1_greedy"] <= 1


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(workspace, caplog):
    root, model_dir = workspace
    config = load_config(None, [f"model.path={model_dir}"])
    prompts = [[1, 5, 6, 7]] * 2 + [[1, 9, 8]] * 2
    responses = [[10, 11, 12], [13], [14, 15, 16, 17, 18], [19, 20]]
    results = []
    for checkpointing in (False, True):
        model, tok = load_policy(config.model, torch.device("cpu"))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
                "use_reentrant": False})
        model.train()
        micro = MicroBatch.from_sequences(prompts, responses, tok.pad_token_id,
                                          torch.device("cpu"))
        lp, _ = response_logprobs(model, micro, temperature=1.0)
        loss, _ = policy_loss(lp, lp.detach() - 0.05, torch.tensor([1.0, -0.5, 0.3, -1.0]),
                              micro.response_mask, clip_low=0.2, clip_high=0.2,
                              agg_mode="token-mean",
                              totals=BatchTotals(tokens=11, sequences=4, max_new_tokens=8))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for plain, checkpointed in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(plain, checkpointed, rtol=1e-5, atol=1e-7)
    # In a run, the prompt-shared forward is off with gradient checkpointing, and says so.
    with caplog.at_level(logging.INFO, logger="lambdapo"):
        run = load_config(None, overrides(root, model_dir, "ckpt", steps=1, **{
            "model.enable_gradient_checkpointing": True}))
        with Trainer(run, progress=False) as trainer:
            assert trainer.model.is_gradient_checkpointing
            metrics = trainer.train_step()
    assert metrics["loss"] == metrics["loss"]
    assert "training forward: plain (gradient checkpointing" in caplog.text
