"""The fast training step: pi_old from the training forward (no separate forward) gives the
update of the separate-forward path; the decode loop that drops finished rows samples what
row-by-row decoding samples; math-verify scores each distinct completion once."""

import pytest
import torch

from lambdapo import trainer as trainer_lib
from lambdapo.batch import MicroBatch
from lambdapo.behaviour import SeparateForward, UpdateForward
from lambdapo.config import load_config
from lambdapo.hf_compat import select_cache_rows
from lambdapo.logprobs import masked_rows, response_logprobs
from lambdapo.models import load_policy
from lambdapo.process import configure_process
from lambdapo.rewards import MathVerifyReward, RewardError
from lambdapo.rollout.base import SamplingParams
from lambdapo.rollout.transformers_engine import TransformersEngine
from lambdapo.tasks import arithmetic
from lambdapo.trainer import Trainer


def builtin_overrides(run_dir, **extra):
    base = {"prompts_per_step": 4, "rollout.group_size": 4, "rollout.max_new_tokens": 40,
            "micro_batch_size": 5, "output_dir": run_dir, "device": "cpu", "threads": 1,
            "data.num_train": 64, "data.num_eval": 4, "optim.lr": 1e-3}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def builtin():
    model, tok = load_policy(load_config(None, []).model, torch.device("cpu"))
    return model, tok


def one_step(tmp_path, name, fused: bool, monkeypatch, **extra):
    extra = {"optim.lr": 0.0, **extra}
    monkeypatch.setattr(trainer_lib, "update_can_be_behaviour",
                        lambda **conditions: (fused, "chosen by the test"))
    trainer = Trainer(load_config(None, builtin_overrides(tmp_path / name, **extra)),
                      progress=False)
    metrics = trainer.train_step()
    # lr 0 keeps the weights; the gradient of the step is left in .grad.
    return metrics, torch.cat([p.grad.flatten() for p in trainer.model.parameters()])


@pytest.mark.parametrize("extra", [{}, {"algorithm.adv_estimator": "grpo"},
                                   {"algorithm.rollout_is": "sequence"},
                                   {"algorithm.kl_coef": 0.1}])
def test_fused_behaviour_logprobs_equal_a_separate_forward(tmp_path, monkeypatch, extra):
    fused, fused_grads = one_step(tmp_path, "fused", True, monkeypatch, **extra)
    separate, separate_grads = one_step(tmp_path, "separate", False, monkeypatch, **extra)
    assert fused["response_length"] == separate["response_length"]   # same samples
    for key in ("reward", "loss", "grad_norm", "entropy", "score/mean", "advantage/std",
                "ratio", "clip_frac", "mismatch/abs_mean", "mismatch/abs_max"):
        assert fused[key] == pytest.approx(separate[key], rel=1e-4, abs=1e-5), key
    assert fused["mismatch/abs_max"] < 1e-4     # the engine's log-probs are the trainer's
    if "kl" in separate:
        assert fused["kl"] == pytest.approx(separate["kl"], abs=1e-6)
    torch.testing.assert_close(fused_grads, separate_grads, rtol=1e-4, atol=1e-7)


def test_behaviour_forward_is_skipped_only_when_its_numbers_are_known(tmp_path):
    def decide(**extra):
        trainer = Trainer(load_config(None, builtin_overrides(tmp_path / "decide", **extra)),
                          progress=False)
        try:
            return isinstance(trainer.behaviour, UpdateForward)
        finally:
            trainer.close()

    assert decide()
    assert not decide(**{"algorithm.ppo_epochs": 2})
    assert not decide(**{"algorithm.mini_batches": 2})
    assert not decide(**{"rollout.top_k": 5})        # scores need the unprocessed log-probs
    assert not decide(**{"model.dtype": "bfloat16"})
    assert decide(**{"rollout.top_k": 5, "algorithm.adv_estimator": "grpo"})  # no scores


def test_separate_forward_is_not_run_on_the_fast_path(tmp_path, monkeypatch):
    def forbidden(self, *args):
        raise AssertionError("the behaviour forward ran")
    monkeypatch.setattr(SeparateForward, "prepare", forbidden)
    trainer = Trainer(load_config(None, builtin_overrides(tmp_path / "fast")), progress=False)
    metrics = trainer.train_step()
    assert metrics["middle_time"] >= 0 and metrics["ratio"] == pytest.approx(1.0)


def test_row_selections_equal_indexing_forward_and_backward():
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 3, generator=gen, requires_grad=True)
    mask = torch.rand(4, 5, generator=gen) < 0.6
    grad = torch.randn(int(mask.sum()), 3, generator=gen)
    assert torch.equal(masked_rows(x, mask), x[mask])
    assert type(masked_rows(x, mask).grad_fn).__name__ == "IndexSelectBackward0"
    assert torch.equal(torch.autograd.grad(masked_rows(x, mask), x, grad)[0],
                       torch.autograd.grad(x[mask], x, grad)[0])

    keys = torch.randn(3, 2, 4, 8, generator=gen, requires_grad=True)
    rows = torch.tensor([2, 0, 0, 1, 2, 2])
    def run(select):
        """(keys and values after select, the gradient they pass back, their backward ops)"""
        cache = DynamicCache()
        for layer in range(2):
            cache.update(keys * (layer + 1), -keys * (layer + 1), layer)
        select(cache, rows)
        backward_ops = {type(layer.keys.grad_fn).__name__ for layer in cache.layers}
        out = torch.stack([t for layer in cache.layers for t in (layer.keys, layer.values)])
        weights = torch.ones_like(out) + out.detach()
        return out, torch.autograd.grad(out, keys, weights)[0], backward_ops

    ours, our_grad, our_ops = run(select_cache_rows)
    theirs, their_grad, _ = run(lambda cache, r: cache.batch_select_indices(r))
    assert our_ops == {"IndexSelectBackward0"}   # not an accumulating index_put_
    assert ours.shape[1] == len(rows) and torch.equal(ours, theirs)
    torch.testing.assert_close(our_grad, their_grad)


@pytest.mark.parametrize("static_decode", ["on", "off"])
def test_decode_loop_that_drops_finished_rows_equals_row_by_row(builtin, static_decode):
    model, tok = builtin
    rows = arithmetic.generate("train", 6, seed=3)
    prompts = [tok(r["prompt"])["input_ids"] for r in rows]
    engine = TransformersEngine(model, tok.eos_token_id, tok.pad_token_id,
                                static_decode=static_decode)
    params = SamplingParams(n=1, temperature=0, max_new_tokens=40)
    together = engine.generate(prompts, params)
    alone = [engine.generate([p], params) for p in prompts]
    assert together.completion_ids == [a.completion_ids[0] for a in alone]
    lengths = {len(c) for c in together.completion_ids}
    assert len(lengths) > 1 and any(together.finished)   # rows did end at different steps
    for ids, done in zip(together.completion_ids, together.finished):
        assert done == (ids[-1] == tok.eos_token_id)
    for a, b in zip(together.logprobs, alone):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b.logprobs[0]), atol=1e-5,
                                   rtol=1e-5)


@pytest.mark.parametrize("static_decode", ["on", "off"])
def test_sampled_logprobs_of_dropped_rows_are_the_trainers(builtin, static_decode):
    model, tok = builtin
    rows = arithmetic.generate("train", 4, seed=5)
    prompts = [tok(r["prompt"])["input_ids"] for r in rows]
    engine = TransformersEngine(model, tok.eos_token_id, tok.pad_token_id, seed=2,
                                static_decode=static_decode)
    rollout = engine.generate(prompts, SamplingParams(n=4, temperature=1.0, max_new_tokens=48))
    assert any(rollout.finished) and len({len(c) for c in rollout.completion_ids}) > 1
    seq_prompts = [p for p in prompts for _ in range(4)]
    batch = MicroBatch.from_sequences(seq_prompts, rollout.completion_ids, tok.pad_token_id,
                        torch.device("cpu"))
    with torch.no_grad():
        lp, _ = response_logprobs(model, batch, temperature=1.0)
    for i, sampled in enumerate(rollout.logprobs):
        torch.testing.assert_close(lp[i, :len(sampled)], torch.tensor(sampled), rtol=1e-5,
                                   atol=1e-5)


def test_math_verify_scores_each_distinct_completion_once(monkeypatch):
    reward = MathVerifyReward()
    calls = []
    score = reward._score
    monkeypatch.setattr(reward, "_score", lambda text, answer: calls.append(text) or
                        score(text, answer))
    completions = ["1+1=2\\boxed{2}", "1+1=2\\boxed{2}", "\\boxed{3}", "no answer",
                   "1+1=2\\boxed{2}"]
    answers = ["2", "2", "2", "2", "3"]
    assert reward(None, completions, None, answer=answers) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert calls == ["1+1=2\\boxed{2}", "\\boxed{3}", "1+1=2\\boxed{2}"]


def test_rewards_verify_in_a_worker_while_the_first_forward_runs(tmp_path, monkeypatch):
    # The step waits for the rewards after the first micro-batch's forward, with torch's
    # threads lowered by the workers' cores meanwhile and restored afterwards, also when
    # scoring fails; the step's numbers are those of in-process scoring.
    seen = []
    forward = trainer_lib.Trainer._logprobs
    monkeypatch.setattr(trainer_lib.Trainer, "_logprobs", lambda self, model, micro: (
        seen.append(torch.get_num_threads()), forward(self, model, micro))[1])
    steps = {}
    for workers in (0, 1):
        config = load_config(None, builtin_overrides(
            tmp_path / f"w{workers}", **{"threads": 2, "reward.workers": workers,
                                         "optim.lr": 0.0}))
        configure_process(config)
        trainer = Trainer(config, progress=False)
        try:
            seen.clear()
            steps[workers] = trainer.train_step()
            assert seen[0] == (1 if workers else 2) and set(seen[1:]) <= {2}
            assert torch.get_num_threads() == 2
            if workers:
                trainer.rewards.functions["math_verify"].start = lambda *a, **k: (
                    lambda: 1 / 0)
                with pytest.raises(RewardError, match="ZeroDivisionError"):
                    trainer.train_step()
                assert torch.get_num_threads() == 2
        finally:
            trainer.close()
    for key in ("reward", "loss", "grad_norm", "advantage/std"):
        assert steps[1][key] == pytest.approx(steps[0][key], rel=1e-6), key
    assert steps[1]["middle_time"] < steps[1]["step_time"]
