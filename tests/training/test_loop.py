"""The training loop on a small random model the tests create: log-prob paths, sampling,
a short run's outputs, resume equivalence, atomic checkpoints, the command line."""

import json
import math
import random

import pytest
import torch

from lambdapo import checkpoint as ckpt
from lambdapo import cli, logprobs, prompt_sharing
from lambdapo.batch import MicroBatch
from lambdapo.config import load_config
from lambdapo.logprobs import plain_prediction_states, response_logprobs
from lambdapo.models import load_policy
from lambdapo.prompt_sharing import shared_prompt_states
from lambdapo.rollout.base import SamplingParams
from lambdapo.rollout.transformers_engine import TransformersEngine, process_logits
from lambdapo.trainer import Trainer
from tiny_model import make_tiny_model

TIMING = {"tokens_per_s", "gen_time", "middle_time", "train_time", "step_time"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("lambdapo")
    model = make_tiny_model(root / "model")
    rng = random.Random(0)
    with open(root / "data.jsonl", "w") as f:
        for _ in range(64):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            f.write(json.dumps({"question": f"{a}+{b}=", "answer": str(a + b),
                                "solution": f"{a}+{b}={a + b} \\boxed{{{a + b}}}"}) + "\n")
    return root, model


def overrides(root, model, run, **extra):
    base = {"model.path": model, "data.dataset": root / "data.jsonl",
            "data.eval_dataset": root / "data.jsonl", "data.prompt_field": "question",
            "data.num_eval": 8, "steps": 4, "prompts_per_step": 4, "rollout.group_size": 4,
            "rollout.max_new_tokens": 10, "eval_samples": 2, "micro_batch_size": 8,
            "output_dir": root / run, "optim.lr": 0.01}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.mark.parametrize("share_prompts", [True, False])
def test_fused_logprobs_equal_the_models_logits(workspace, share_prompts):
    """Each row against the model's logits on its own unpadded sequence: prompts of two
    lengths (left padding), one shared by two rows, responses of 1, 2 and 11 tokens."""
    root, model_dir = workspace
    model, tok = load_policy(load_config(None, [f"model.path={model_dir}"]).model,
                             torch.device("cpu"))
    short, long = tok("1+2=")["input_ids"], tok("33+44=")["input_ids"]
    prompts = [short, long, short, long]
    responses = [tok("3 \\boxed{3}", add_special_tokens=False)["input_ids"], [5, 6], [7],
                 [9, 10, 11]]
    micro = MicroBatch.from_sequences(prompts, responses, tok.pad_token_id, torch.device("cpu"))
    assert micro.prompt_ids.shape[0] == 2 and len(responses[0]) > 3
    states = shared_prompt_states if share_prompts else plain_prediction_states
    lp, h = response_logprobs(model, micro, temperature=0.7, states=states)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        logits = model(input_ids=torch.tensor([p + r])).logits[0]
        rows = torch.log_softmax(logits.float() / 0.7, -1)[len(p) - 1:len(p) + len(r) - 1]
        expected = rows.gather(-1, torch.tensor(r).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(lp[i, :len(r)], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h[i, :len(r)], -(rows.exp() * rows).sum(-1), rtol=1e-5,
                                   atol=1e-5)
        assert float(lp[i, len(r):].detach().abs().sum()) == 0


def test_shared_prompt_gradients_equal_the_plain_forwards(workspace):
    root, model_dir = workspace
    model, tok = load_policy(load_config(None, [f"model.path={model_dir}"]).model,
                             torch.device("cpu"))
    prompts = [tok("1+2=")["input_ids"]] * 3 + [tok("33+44=")["input_ids"]] * 2
    responses = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [4, 4], [6, 5, 4, 3]]
    micro = MicroBatch.from_sequences(prompts, responses, tok.pad_token_id, torch.device("cpu"))
    upstream = torch.randn(micro.response_ids.shape, generator=torch.Generator().manual_seed(0))
    grads = []
    for states in (shared_prompt_states, plain_prediction_states):
        lp, h = response_logprobs(model, micro, temperature=1.3, states=states)
        grads.append(torch.autograd.grad((lp * upstream).sum() + (h * upstream).sum(),
                                         list(model.parameters())))
    for shared, plain in zip(*grads):
        torch.testing.assert_close(shared, plain, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_prompt_sharing_check_accepts_rounding_and_refuses_wrong_states(workspace, monkeypatch,
                                                                        autocast):
    root, model_dir = workspace
    model, tok = load_policy(load_config(None, [f"model.path={model_dir}"]).model,
                             torch.device("cpu"))
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(4, 30, (int(n),), generator=gen).tolist() for n in (5, 9, 7)]
    responses = [torch.randint(4, 30, (int(n),), generator=gen).tolist()
                 for n in torch.randint(3, 40, (24,), generator=gen)]
    micro = MicroBatch.from_sequences([prompts[i % 3] for i in range(24)], responses,
                                      tok.pad_token_id, torch.device("cpu"))
    assert prompt_sharing.prompt_sharing_agrees(model, micro, 1.0, autocast=autocast)

    def off_by_one(network, micro, read):   # a cache read at wrong positions
        return shared_prompt_states(network, micro, read).roll(1, dims=1)
    monkeypatch.setattr(prompt_sharing, "shared_prompt_states", off_by_one)
    assert not prompt_sharing.prompt_sharing_agrees(model, micro, 1.0, autocast=autocast)


def test_prompt_sharing_check_falls_back_for_a_cache_that_cannot_be_shared(workspace,
                                                                          monkeypatch):
    from transformers import DynamicCache

    root, model_dir = workspace
    model, tok = load_policy(load_config(None, [f"model.path={model_dir}"]).model,
                             torch.device("cpu"))
    micro = MicroBatch.from_sequences([[1, 5, 6]] * 2, [[7, 8], [9]], tok.pad_token_id,
                                      torch.device("cpu"))
    assert prompt_sharing.prompt_sharing_agrees(model, micro, 1.0)

    def unsupported(self, indices):
        raise NotImplementedError("this cache cannot select rows")
    monkeypatch.setattr(DynamicCache, "batch_select_indices", unsupported)
    assert not prompt_sharing.prompt_sharing_agrees(model, micro, 1.0)


def test_process_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda params: torch.isfinite(process_logits(logits, params))[0].tolist()  # noqa
    assert kept(SamplingParams(top_k=2)) == [True, True, False, False]
    assert kept(SamplingParams(top_p=0.8)) == [True, True, False, False]
    assert kept(SamplingParams(top_p=0.81)) == [True, True, True, False]
    assert kept(SamplingParams(top_p=0.3)) == [True, False, False, False]
    lp = process_logits(logits, SamplingParams(temperature=2.0))
    torch.testing.assert_close(lp, torch.log_softmax(logits / 2.0, -1))


@pytest.mark.parametrize("static_decode", ["on", "off"])
def test_engine_logprobs_agree_with_the_trainers(workspace, static_decode):
    root, model_dir = workspace
    model, tok = load_policy(load_config(None, [f"model.path={model_dir}"]).model,
                             torch.device("cpu"))
    engine = TransformersEngine(model, tok.eos_token_id, tok.pad_token_id, seed=1,
                                static_decode=static_decode)
    prompts = [tok("1+2=")["input_ids"], tok("33+44=")["input_ids"]]
    rollout = engine.generate(prompts, SamplingParams(n=3, temperature=0.8, max_new_tokens=12))
    assert len(rollout.completion_ids) == 6
    seq_prompts = [p for p in prompts for _ in range(3)]
    batch = MicroBatch.from_sequences(seq_prompts, rollout.completion_ids, tok.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        lp, _ = response_logprobs(model, batch, temperature=0.8)
    for i, sampled in enumerate(rollout.logprobs):
        torch.testing.assert_close(lp[i, :len(sampled)], torch.tensor(sampled), rtol=1e-4,
                                   atol=1e-4)
    # The same seed draws the same samples.
    again = TransformersEngine(model, tok.eos_token_id, tok.pad_token_id, seed=1,
                               static_decode=static_decode).generate(
        prompts, SamplingParams(n=3, temperature=0.8, max_new_tokens=12))
    assert again.completion_ids == rollout.completion_ids


@pytest.mark.slow
def test_short_run_writes_every_output_and_changes_the_weights(workspace):
    root, model_dir = workspace
    config = load_config(None, overrides(root, model_dir, "run", **{"algorithm.kl_coef": 0.05}))
    trainer = Trainer(config, progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    summary = trainer.train()
    run = root / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for key in ("reward", "reward/math_verify", "reward/semantic_density", "accuracy",
                "advantage/std", "kl", "entropy", "clip_frac", "grad_norm", "tokens_per_s"):
        assert all(key in m for m in metrics), key
    assert len({m["reward"] for m in metrics}) > 1
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed
    for name in ("config.yaml", "curves.png", "samples.jsonl", "summary.json"):
        assert (run / name).exists(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-4"
    assert 0 <= summary["accuracy_before"] <= 1 and summary["steps"] == 4
    # The checkpoint loads in plain transformers.
    from transformers import AutoModelForCausalLM
    reloaded = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "step-4")
    torch.testing.assert_close(reloaded.state_dict()["lm_head.weight"],
                               trainer.model.state_dict()["lm_head.weight"])


@pytest.mark.slow
def test_resume_continues_exactly(workspace):
    root, model_dir = workspace
    extra = {"optim.schedule": "cosine", "algorithm.ppo_epochs": 2, "algorithm.mini_batches": 2,
             "micro_batch_size": 4}
    full = Trainer(load_config(None, overrides(root, model_dir, "full", save_every=2, **extra)),
                   progress=False)
    full.train()
    resumed = Trainer(load_config(None, overrides(root, model_dir, "resumed", **extra)),
                      resume=str(root / "full" / "checkpoints" / "step-2"), progress=False)
    assert resumed.step == 2
    resumed.train()
    a = [json.loads(x) for x in (root / "full" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (root / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in b] == [3, 4]
    for ma, mb in zip(a[2:], b):
        assert {k: v for k, v in ma.items() if k not in TIMING} == \
               {k: v for k, v in mb.items() if k not in TIMING}


def test_a_save_killed_midway_keeps_the_latest_checkpoint(workspace, monkeypatch):
    root, model_dir = workspace
    trainer = Trainer(load_config(None, overrides(root, model_dir, "atomic")), progress=False)
    first = trainer.save()
    trainer.step = 1

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while saving")
    monkeypatch.setattr(ckpt, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    assert ckpt.find_checkpoint(root / "atomic") == first
    assert (root / "atomic" / "checkpoints" / ".tmp-step-1").exists()
    monkeypatch.undo()
    assert trainer.save().name == "step-1"
    assert not list((root / "atomic" / "checkpoints").glob(".tmp-*"))


def test_cli_help_lists_fields_and_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "rollout.group_size = 8" in out and "algorithm.adv_estimator = lambdapo" in out
    assert cli.main(["train", "rollout.group_size=zero"]) == 2
    assert "rollout.group_size" in capsys.readouterr().err


def test_cli_eval_reports_pass_at_1_and_mean_at_k(workspace, capsys, tmp_path, monkeypatch):
    root, model_dir = workspace
    monkeypatch.chdir(tmp_path)
    code = cli.main(["eval", "--model", str(model_dir), "--dataset", str(root / "data.jsonl"),
                     "data.prompt_field=question", "data.num_eval=4", "eval_samples=2",
                     "rollout.max_new_tokens=6"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompts"] == 4 and 0 <= result["pass@1_greedy"] <= 1 and "mean@2" in result
    assert not list(tmp_path.iterdir())   # eval writes no run folder (runs/lambdapo)


def test_builtin_default_model_and_task_train(tmp_path):
    """The built-in model and task through the real entry point (a few steps)."""
    code = cli.main(["train", "--quiet", "steps=2", "data.num_eval=8", "data.num_train=64",
                     f"output_dir={tmp_path}"])
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2 and 0 <= summary["accuracy_before"] <= 1
    config = (tmp_path / "config.yaml").read_text()
    assert "builtin:tiny-arithmetic" in config and "dataset: arithmetic" in config


def test_logits_fallback_equals_the_fused_path(workspace, monkeypatch):
    """Models whose head is not a plain linear layer go through token_logprobs on logits."""
    root, model_dir = workspace
    model, tok = load_policy(load_config(None, [f"model.path={model_dir}"]).model,
                             torch.device("cpu"))
    batch = MicroBatch.from_sequences([tok("12+3=")["input_ids"]] * 2, [[5, 6, 7], [8]], tok.pad_token_id,
                        torch.device("cpu"))
    fused = response_logprobs(model, batch, temperature=0.9)
    monkeypatch.setattr(logprobs, "plain_linear_head", lambda m: None)
    fallback = response_logprobs(model, batch, temperature=0.9)
    for a, b in zip(fused, fallback):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_run(workspace):
    root, model_dir = workspace
    trainer = Trainer(load_config(None, overrides(root, model_dir, "bf16", steps=1,
                                                  **{"model.dtype": "bfloat16"})),
                      progress=False)
    metrics = trainer.train_step()
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
    assert next(trainer.model.parameters()).dtype == torch.float32   # fp32 master weights


def test_chat_template_is_applied_when_the_tokenizer_has_one(workspace, tmp_path):
    import shutil

    root, model_dir = workspace
    chat_dir = tmp_path / "chat"
    shutil.copytree(model_dir, chat_dir)
    cfg_path = chat_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = "{% for m in messages %}Q:{{ m['content'] }}{% endfor %}A:"
    cfg_path.write_text(json.dumps(cfg))
    trainer = Trainer(load_config(None, overrides(root, chat_dir, "chat")), progress=False)
    ids = trainer.encoder.prompt_ids({"prompt": "1+2="})
    assert trainer.tokenizer.decode(ids, skip_special_tokens=True) == "Q:1+2=A:"
    off = Trainer(load_config(None, overrides(root, chat_dir, "chat-off",
                                              **{"data.chat_template": "off"})), progress=False)
    assert off.tokenizer.decode(off.encoder.prompt_ids({"prompt": "1+2="}),
                                skip_special_tokens=True) == "1+2="


@pytest.mark.parametrize("level,cap,scale", [("token", 2.0, math.exp(0.3)),
                                             ("sequence", 2.0, math.exp(0.3)),
                                             ("token", 1.2, 1.2)])
def test_rollout_correction_weights_the_update(workspace, level, cap, scale):
    """An engine whose log-probs sit 0.3 below the trainer's: every token gets weight
    min(e^0.3, cap), so the first update's gradient is that many times the uncorrected one."""
    root, model_dir = workspace

    def first_step(rollout_is: str) -> dict:
        extra = {"algorithm.rollout_is": rollout_is, "algorithm.rollout_is_cap": cap,
                 "optim.max_grad_norm": 0, "steps": 1}
        with Trainer(load_config(None, overrides(root, model_dir, f"is-{rollout_is}", **extra)),
                     progress=False) as trainer:
            generate = trainer.engine.generate

            def shifted(prompts, params):
                rollout = generate(prompts, params)
                rollout.logprobs = [[lp - 0.3 for lp in row] for row in rollout.logprobs]
                return rollout
            trainer.engine.generate = shifted
            return trainer.train_step()

    plain, corrected = first_step("none"), first_step(level)
    for m in (plain, corrected):
        assert m["mismatch/abs_mean"] == pytest.approx(0.3, abs=1e-4)
        assert m["mismatch/abs_max"] == pytest.approx(0.3, abs=1e-4)
    assert "mismatch/is_mean" not in plain
    assert corrected["mismatch/is_mean"] == pytest.approx(scale, rel=1e-4)
    assert corrected["mismatch/is_clipped"] == (1.0 if scale == cap else 0.0)
    assert corrected["grad_norm"] == pytest.approx(scale * plain["grad_norm"], rel=1e-3)
