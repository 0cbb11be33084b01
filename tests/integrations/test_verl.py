"""The verl adapter against the real verl (CPU): the estimator through verl's own
compute_advantage paths, registration through the plugin entry point, the rewards, the
example config. Skipped without verl unless LAMBDAPO_REQUIRE_VERL=1 (CI), where it fails."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

if os.environ.get("LAMBDAPO_REQUIRE_VERL") != "1":
    pytest.importorskip("verl")

import verl  # noqa: E402,F401  (loads the plugins, lambdapo's among them)
from omegaconf import OmegaConf  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402

import lambdapo_ext  # noqa: E402
from lambdapo.integrations import verl as adapter  # noqa: E402
from tiny_model import make_tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
GROUP, PROMPTS, WIDTH = 4, 3, 6


def batch(seed: int = 0, **log_probs: bool):
    """A verl batch of PROMPTS x GROUP responses, the groups interleaved (uid order a b c a
    b c ...), ragged response lengths, outcome rewards on the last token, and the requested
    per-token log-prob fields."""
    gen = torch.Generator().manual_seed(seed)
    n = GROUP * PROMPTS
    lengths = torch.randint(1, WIDTH + 1, (n,), generator=gen)
    mask = (torch.arange(WIDTH)[None] < lengths[:, None]).float()
    outcome = torch.randint(0, 3, (n,), generator=gen).float()
    rewards = torch.zeros(n, WIDTH)
    rewards[torch.arange(n), lengths - 1] = outcome
    tensors = {"token_level_rewards": rewards, "response_mask": mask}
    for key, wanted in log_probs.items():
        if wanted:
            tensors[key] = -torch.rand(n, WIDTH, generator=gen) * 2
    uid = np.array([chr(ord("a") + i % PROMPTS) for i in range(n)], dtype=object)
    return DataProto.from_dict(tensors=tensors, non_tensors={"uid": uid}), outcome, mask, uid


def expected(outcome, mask, uid, log_probs, *, beta, how, normalize):
    group_ids = torch.tensor([ord(u) - ord("a") for u in uid])
    if log_probs is None:
        scores = torch.zeros_like(outcome)
    else:
        total = (log_probs * mask).sum(-1)
        scores = total if how == "sum" else total / mask.sum(-1)
    adv = lambdapo_ext.lambda_advantages(outcome, scores, group_ids=group_ids, beta=beta,
                                         normalize=normalize)
    return adv.unsqueeze(-1) * mask


CONFIG = OmegaConf.create({"adv_estimator": "lambdapo", "lambda_beta": 0.7,
                           "lambda_score": "sum", "lambda_normalize": "std"})


def test_verls_compute_advantage_gives_the_op_on_the_rollout_log_probs():
    from verl.trainer.ppo.ray_trainer import compute_advantage
    data, outcome, mask, uid = batch(rollout_log_probs=True, old_log_probs=True)
    out = compute_advantage(data, adv_estimator="lambdapo", num_repeat=GROUP, config=CONFIG)
    want = expected(outcome, mask, uid, data.batch["rollout_log_probs"], beta=0.7, how="sum",
                    normalize="std")
    torch.testing.assert_close(out.batch["advantages"], want)
    torch.testing.assert_close(out.batch["returns"], want)
    # Without the engine's log-probs, the actor's recomputed ones are the scores.
    data, outcome, mask, uid = batch(seed=1, old_log_probs=True)
    out = compute_advantage(data, adv_estimator="lambdapo", config=CONFIG)
    torch.testing.assert_close(out.batch["advantages"], expected(
        outcome, mask, uid, data.batch["old_log_probs"], beta=0.7, how="sum", normalize="std"))


def test_verls_v1_trainer_path_is_wrapped_too():
    from verl.trainer.ppo import ray_trainer
    from verl.trainer.ppo.v1 import utils as v1
    assert v1.compute_advantage is ray_trainer.compute_advantage
    data, outcome, mask, uid = batch(seed=2, rollout_log_probs=True)
    defaults = OmegaConf.create({"adv_estimator": "lambdapo"})
    out = v1.compute_advantage_for_multi_trajectories(
        data, batch_keys=[f"{u}_0_{i}" for i, u in enumerate(uid)], adv_estimator="lambdapo",
        config=defaults)
    torch.testing.assert_close(out.batch["advantages"], expected(
        outcome, mask, uid, data.batch["rollout_log_probs"], beta=1.0, how="mean",
        normalize="mean"))


def test_without_log_probs_it_warns_and_is_verls_rloo():
    data, outcome, mask, uid = batch(seed=3)
    estimator = core_algos.get_adv_estimator_fn("lambdapo")
    with pytest.warns(RuntimeWarning, match="RLOO"):
        adv, _ = estimator(token_level_rewards=data.batch["token_level_rewards"],
                           response_mask=mask, index=uid, config=CONFIG)
    torch.testing.assert_close(adv, expected(outcome, mask, uid, None, beta=0.0, how="sum",
                                             normalize="std"))
    rloo = OmegaConf.create({"lambda_beta": 0.5})
    with pytest.warns(RuntimeWarning):
        ours, _ = estimator(token_level_rewards=data.batch["token_level_rewards"],
                            response_mask=mask, index=uid, config=rloo)
    verls, _ = core_algos.compute_rloo_outcome_advantage(
        data.batch["token_level_rewards"], mask, uid)
    torch.testing.assert_close(ours, verls, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        estimator(token_level_rewards=data.batch["token_level_rewards"], response_mask=mask,
                  index=uid, log_probs=torch.zeros(2, 2))


def test_the_entry_point_registers_it_when_verl_is_imported():
    from importlib.metadata import entry_points
    assert "lambdapo" in {ep.name for ep in entry_points(group="verl.plugins")}
    code = ("import verl\nfrom verl.trainer.ppo import core_algos\n"
            "print(core_algos.get_adv_estimator_fn('lambdapo').__module__)")
    run = lambda **env: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
        env={**os.environ, **env})
    plain = run()
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert plain.stdout.strip().splitlines()[-1] == "lambdapo.integrations.verl"
    excluded = run(VERL_USE_EXTERNAL_PLUGINS="none")
    assert excluded.returncode != 0 and "Unknown advantage estimator" in excluded.stderr


def test_semantic_density_rewards(tmp_path):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(make_tiny_model(tmp_path / "model"))
    solution = "2+3=5, 5*2=10\n#### 10"
    responses = ["2+3=5 so 10\n#### 10", "#### 7"]
    infos = [{"answer": solution}, {"answer": solution}]
    results = adapter.compute_score_batch(["openai/gsm8k"] * 2, responses, ["10", "10"], infos,
                                          tokenizer=tokenizer, lambda_sd=0.5)
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    density = lambdapo_ext.semantic_density([ids(r) for r in responses], [ids(solution)],
                                            ref_index=torch.tensor([0, 0])).tolist()
    assert [r["outcome"] for r in results] == [1.0, 0.0]   # verl's GSM8K score
    for result, sd in zip(results, density):
        assert result["semantic_density"] == pytest.approx(sd)
        assert result["score"] == pytest.approx(result["outcome"] + 0.5 * sd)
    single = adapter.compute_score("openai/gsm8k", responses[0], "10", infos[0],
                                   tokenizer=str(tmp_path / "model"), lambda_sd=0.5)
    assert single == pytest.approx(results[0])
    mv = adapter.compute_score("x", "so \\boxed{10}", "10", infos[0], tokenizer=tokenizer,
                               outcome="math_verify")
    assert mv["outcome"] == 1.0
    with pytest.raises(ValueError, match="extra_info\\['solution'\\]"):
        adapter.compute_score("openai/gsm8k", "#### 1", "1", infos[0], tokenizer=tokenizer,
                              solution_key="solution")
    with pytest.raises(ValueError, match="tokenizer"):
        adapter.compute_score("openai/gsm8k", "#### 1", "1", infos[0])


def test_the_example_config_composes_and_its_reward_loads(tmp_path):
    from hydra import compose, initialize_config_dir
    from verl.utils.import_utils import load_extern_object
    with initialize_config_dir(config_dir=str(ROOT / "examples" / "verl"), version_base=None):
        cfg = compose(config_name="lambdapo_gsm8k")
    assert cfg.algorithm.adv_estimator == "lambdapo" and cfg.algorithm.lambda_beta == 1.0
    assert cfg.actor_rollout_ref.rollout.calculate_log_probs
    assert cfg.actor_rollout_ref.actor.strategy == "fsdp"   # verl's defaults underneath
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    OmegaConf.resolve(cfg)
    validate_config(cfg, use_reference_policy=need_reference_policy(cfg),
                    use_critic=need_critic(cfg))   # what main_ppo checks before training
    reward = cfg.reward.custom_reward_function
    fn = load_extern_object(module_path=reward.path, object_name=reward.name)
    assert fn is adapter.compute_score and reward.reward_kwargs.solution_key == "answer"

    source = tmp_path / "gsm8k"
    source.mkdir()
    row = {"question": "Tom has 2 apples and buys 3. How many?",
           "answer": "2+3=<<2+3=5>>5\n#### 5"}
    for split in ("train", "test"):
        (source / f"{split}.jsonl").write_text(json.dumps(row) + "\n")
    subprocess.run([sys.executable, str(ROOT / "examples" / "verl" / "prepare_gsm8k.py"),
                    str(source), str(tmp_path / "out")], check=True, capture_output=True)
    import pyarrow.parquet as pq
    rows = pq.read_table(tmp_path / "out" / "train.parquet").to_pylist()
    assert rows[0]["reward_model"]["ground_truth"] == "5"
    assert rows[0]["extra_info"]["answer"] == row["answer"]
    assert rows[0]["prompt"][0]["content"].startswith(row["question"])
