"""Config, data loading and reward functions of the training package."""

import json
import math
import sys
import time
import types

import pytest

import lambdapo_ext
from lambdapo import config as config_lib
from lambdapo.config import DataConfig, RewardConfig
from lambdapo.data import DataError, PromptSampler, load_split, normalize_rows
from lambdapo.rewards import (MathVerifyReward, RewardError, RewardManager,
                              SemanticDensityReward, time_limit)


# ----------------------------------------------------------------------------- config
def test_config_yaml_overrides_and_round_trip(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("rollout:\n  group_size: 16\nreward:\n  functions: [math_verify]\nsteps: 7\n")
    config = config_lib.load_config(path, ["rollout.temperature=0.7", "algorithm.kl_coef=0.01",
                                           "reward.weights={math_verify: 2}"])
    assert config.rollout.group_size == 16 and config.steps == 7
    assert config.rollout.temperature == 0.7 and config.algorithm.kl_coef == 0.01
    assert config.reward.functions == ["math_verify"]
    assert config.reward.weights == {"math_verify": 2}
    config_lib.save_config(config, tmp_path / "saved.yaml")
    assert config_lib.load_config(tmp_path / "saved.yaml") == config


@pytest.mark.parametrize("override,message", [
    ("rollout.group_sizes=3", "unknown key 'rollout.group_sizes'"),
    ("rollout.group_size=abc", "rollout.group_size"),
    ("rollout.group_size=1", "rollout.group_size"),
    ("algorithm.adv_estimator=ppo", "algorithm.adv_estimator"),
    ("algorithm.loss_agg_mode=sum", "algorithm.loss_agg_mode"),
    ("rollout.top_p=1.5", "rollout.top_p"),
    ("steps=2.5", "steps"),
    ("model.trust_remote_code=maybe", "model.trust_remote_code"),
    ("steps", "section.field=value"),
    ("rollout.engine=sglang", "rollout.engine"),
    ("rollout.sleep_level=3", "rollout.sleep_level"),
    ("rollout.gpu_memory_utilization=0", "rollout.gpu_memory_utilization"),
    ("rollout.weight_bucket_mb=0", "rollout.weight_bucket_mb"),
    ("algorithm.rollout_is=geometric", "algorithm.rollout_is"),
    ("algorithm.rollout_is_cap=0.5", "algorithm.rollout_is_cap"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        config_lib.load_config(None, [override])


def test_help_lists_every_field_with_its_default():
    text = "\n".join(config_lib.help_lines())
    for key in ("rollout.group_size = 8", "algorithm.adv_estimator = lambdapo",
                "algorithm.loss_agg_mode = token-mean", "reward.lambda_sd = 0.1",
                "model.path = builtin:tiny-arithmetic", "optim.lr"):
        assert key in text


# ----------------------------------------------------------------------------- data
def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_jsonl_fields_template_and_answer_pattern(tmp_path):
    file = write_jsonl(tmp_path / "d.jsonl", [
        {"question": "What is 2+3?", "answer": "2+3=5\n#### 5", "extra": 1},
        {"question": "What is 7-1?", "answer": "#### 6", "extra": 2}])
    config = DataConfig(dataset=file, eval_dataset=file, prompt_field="question",
                        solution_field="", answer_pattern=r"####\s*(.+)$",
                        prompt_template="Q: {prompt}\nA:")
    rows = load_split(config, "train", seed=0)
    assert rows[0]["prompt"] == "Q: What is 2+3?\nA:" and rows[0]["answer"] == "5"
    assert rows[1]["answer"] == "6" and rows[1]["extra"] == 2 and rows[0]["solution"] == ""


def test_parquet_and_json_array(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    table = pyarrow.table({"prompt": ["a", "b"], "answer": ["1", "2"], "solution": ["x", "y"]})
    pq.write_table(table, tmp_path / "d.parquet")
    rows = load_split(DataConfig(dataset=str(tmp_path / "d.parquet")), "train", seed=0)
    assert [r["answer"] for r in rows] == ["1", "2"]
    (tmp_path / "d.json").write_text(json.dumps([{"prompt": "p", "answer": 3, "solution": ""}]))
    assert load_split(DataConfig(dataset=str(tmp_path / "d.json")), "train", 0)[0]["answer"] == "3"


@pytest.mark.parametrize("rows,message", [
    ([{"prompt": "a", "answer": "1", "solution": "s"}, {"prompt": "b", "solution": "s"}],
     r"d\.jsonl: row 2 has no field 'answer'"),
    ([{"prompt": ["a"], "answer": "1", "solution": "s"}], r"row 1 field 'prompt' must be a string"),
    (["{not json"], r"d\.jsonl: row 1 is not valid JSON"),
    (["[1, 2]"], r"row 1 is a list, not an object"),
])
def test_malformed_rows_name_file_and_row(tmp_path, rows, message):
    file = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=message):
        load_split(DataConfig(dataset=file), "train", seed=0)


def test_missing_file_and_bad_template(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_split(DataConfig(dataset=str(tmp_path / "nope.jsonl")), "train", 0)
    with pytest.raises(DataError, match="prompt_template"):
        normalize_rows([{"prompt": "a", "answer": "1", "solution": ""}], "x",
                       DataConfig(prompt_template="{question}"))


def test_prompt_sampler_is_seeded_and_resumable():
    rows = [{"i": i} for i in range(10)]
    a = PromptSampler(rows, seed=3)
    first = [r["i"] for r in a.take(7)]
    state = a.state()
    rest = [r["i"] for r in a.take(8)]
    b = PromptSampler(rows, seed=3)
    b.load_state(state)
    assert [r["i"] for r in b.take(8)] == rest
    assert sorted(first + rest[:3]) == list(range(10))   # one epoch covers every row once
    assert [r["i"] for r in PromptSampler(rows, seed=4).take(7)] != first


# ----------------------------------------------------------------------------- rewards
def mv(completions, answers, **kwargs):
    return MathVerifyReward(**kwargs)(["p"] * len(completions), completions,
                                      [[]] * len(completions), answer=answers)


def test_math_verify_boxed_and_marker():
    assert mv([r"so \boxed{579}", r"\boxed{-42}", r"\boxed{578}", "579 no box", r"\boxed{1/2}"],
              ["579", "-42", "579", "579", "0.5"]) == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert mv(["steps... #### 12", "#### 13", "no marker 12"], ["12", "12", "12"],
              answer_marker="####") == [1.0, 0.0, 0.0]


def test_math_verify_time_limit(monkeypatch):
    reward = MathVerifyReward(timeout_s=1)

    def slow_parse(text, **kwargs):
        end = time.monotonic() + 30
        while time.monotonic() < end:   # pure Python: interruptible
            pass
    monkeypatch.setattr(reward._mv, "parse", slow_parse)
    start = time.monotonic()
    assert reward(["p"], [r"\boxed{1}"], [[]], answer=["1"]) == [0.0]
    assert time.monotonic() - start < 5 and reward.timeouts == 1


def test_math_verify_in_worker_processes_scores_as_in_process():
    completions = [r"so \boxed{579}", r"\boxed{-42}", r"\boxed{578}", "579 no box",
                   r"\boxed{1/2}", r"so \boxed{579}", "#### 3"] * 3
    answers = ["579", "-42", "579", "579", "0.5", "579", "3"] * 3
    reward = MathVerifyReward(workers=2)
    try:
        assert mv(completions, answers) == reward(["p"] * 21, completions, [[]] * 21,
                                                  answer=answers)
        assert reward._pool is not None
    finally:
        reward.close()
    assert reward._pool is None


def test_rewards_started_in_workers_finish_as_the_call_and_report_errors_when_due(monkeypatch):
    completions = [r"so \boxed{579}", r"\boxed{-42}", r"\boxed{578}", "no box"]
    answers = ["579", "-42", "579", "579"]
    manager = RewardManager.from_config(RewardConfig(functions=["math_verify", "format"],
                                                     workers=1))
    try:
        finish = manager.start(["p"] * 4, completions, [[]] * 4, {"answer": answers})
        assert manager.functions["math_verify"]._pool is not None   # verifying already
        total, parts = finish()
        assert parts == {"math_verify": [1.0, 1.0, 0.0, 0.0], "format": [1.0, 1.0, 1.0, 0.0]}
        assert total == [2.0, 2.0, 1.0, 0.0]
        # A reward that fails to start raises when its values are due, as score() does.
        finish = manager.start(["p"] * 4, completions, [[]] * 4, {})
        with pytest.raises(RewardError, match="reward 'math_verify' raised KeyError"):
            finish()
    finally:
        manager.close()


def test_workers_that_cannot_start_fall_back_to_the_trainers_process(tmp_path):
    # A script that scores at import time, without the __main__ guard: spawned workers
    # re-import it and die; the reward warns and verifies in the script's process.
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from lambdapo.rewards import MathVerifyReward\n"
        "reward = MathVerifyReward(workers=1)\n"
        "print(reward(['p'] * 3, [r'\\boxed{2}', r'\\boxed{3}', 'x'], [[]] * 3,\n"
        "             answer=['2', '2', '2']), reward.workers)\n")
    import subprocess
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[1.0, 0.0, 0.0] 0"
    assert "verifying in the trainer's process" in out.stderr


def test_time_limit_raises():
    with pytest.raises(TimeoutError):
        with time_limit(0.2):
            while True:
                pass


def test_semantic_density_reward_matches_the_op():
    fn = SemanticDensityReward("rouge_n", 2)
    cands = [[1, 2, 3], [1, 2], [4], [5, 6]]
    sols = [[1, 2, 4], [1, 2, 4], [7, 8], [7, 8]]
    got = fn(["p"] * 4, ["x"] * 4, cands, solution_ids=sols, group_index=[0, 0, 1, 1])
    expected = lambdapo_ext.semantic_density(cands, sols, max_n=2)
    assert got == pytest.approx(expected.tolist())


def install_module(monkeypatch, **functions):
    module = types.ModuleType("user_rewards")
    for name, fn in functions.items():
        setattr(module, name, fn)
    monkeypatch.setitem(sys.modules, "user_rewards", module)


def test_user_reward_weights_and_errors(monkeypatch):
    install_module(monkeypatch,
                   length=lambda prompts, completions, completion_ids, **cols:
                   [len(c) for c in completions],
                   boom=lambda prompts, completions, completion_ids, **cols:
                   [1 / len(c) for c in completions],
                   nan=lambda prompts, completions, completion_ids, **cols:
                   [0.0, math.nan])
    manager = RewardManager.from_config(RewardConfig(
        functions=["format", "user_rewards:length"], weights={"user_rewards:length": 0.5}))
    total, parts = manager.score(["p", "q"], [r"\boxed{1}", "ab"], [[], []], {})
    assert parts == {"format": [1.0, 0.0], "user_rewards:length": [9.0, 2.0]}
    assert total == [1.0 + 4.5, 1.0]
    boom = RewardManager.from_config(RewardConfig(functions=["user_rewards:boom"]))
    with pytest.raises(RewardError, match="reward 'user_rewards:boom' raised "
                                          "ZeroDivisionError.* on sample 1 \\(prompt 'q'"):
        boom.score(["p", "q"], ["c", ""], [[], []], {})
    nan = RewardManager.from_config(RewardConfig(functions=["user_rewards:nan"]))
    with pytest.raises(RewardError, match=r"returned nan for sample 1 \(prompt 'q'"):
        nan.score(["p", "q"], ["a", "b"], [[], []], {})
    lenient = RewardManager.from_config(RewardConfig(functions=["user_rewards:nan"],
                                                     on_error="zero"))
    assert lenient.score(["p", "q"], ["a", "b"], [[], []], {})[0] == [0.0, 0.0]
    assert lenient.errors == {"user_rewards:nan": 1}
    with pytest.raises(ValueError, match="cannot load"):
        RewardManager.from_config(RewardConfig(functions=["user_rewards:missing"]))
    with pytest.raises(ValueError, match="weights names"):
        RewardManager.from_config(RewardConfig(functions=["format"], weights={"x": 1}))


def test_hugging_face_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"q": "1+1=", "a": "2"}, {"q": "2+2=", "a": "4"}, {"q": "3+3=", "a": "6"}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:1])}).save_to_disk(
        tmp_path / "hf")
    config = DataConfig(dataset=str(tmp_path / "hf"), prompt_field="q", answer_field="a",
                        solution_field="")
    assert [r["prompt"] for r in load_split(config, "train", 0)] == ["1+1=", "2+2=", "3+3="]
    assert [r["answer"] for r in load_split(config, "eval", 0)] == ["2"]
    with pytest.raises(DataError, match="no split 'validation'"):
        load_split(DataConfig(dataset=str(tmp_path / "hf"), prompt_field="q", answer_field="a",
                              solution_field="", train_split="validation"), "train", 0)
