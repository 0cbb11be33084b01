"""The built-in ``chain`` task, the task registry and the tiny model shipped with it."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lambdapo.config import DataConfig
from lambdapo.data import load_split
from lambdapo.tasks import TASKS, arithmetic, chain

REPO = Path(__file__).resolve().parents[2]
ASSETS = Path(chain.__file__).resolve().parents[1] / "assets"
ASSET = ASSETS / "tiny-chain"
PROMPT = re.compile(r"^\d+(?:[+-]\d+)+=$")
# The files of a checkpoint; README.md also records the wall time, so it is not compared.
CHECKPOINT_FILES = ("config.json", "generation_config.json", "model.safetensors",
                    "tokenizer.json", "tokenizer_config.json")


def _chain(row):
    """``"47+8-25="`` -> ``((47, 8, 25), ("+", "-"))``."""
    tokens = re.findall(r"\d+|[+-]", row["prompt"][:-1])
    return tuple(int(t) for t in tokens[::2]), tuple(tokens[1::2])


def test_rows_have_the_documented_fields_and_formats():
    rows = chain.generate("train", 300, seed=3)
    assert len(rows) == 300
    for row in rows:
        assert set(row) == {"prompt", "answer", "solution"}
        assert PROMPT.match(row["prompt"]), row
        assert re.fullmatch(r"-?\d+", row["answer"]) and str(int(row["answer"])) == row["answer"]
        assert set(row["prompt"] + row["solution"]) <= set(chain.CHARS)
        terms, ops = _chain(row)
        assert 3 <= len(terms) <= 4 and all(0 <= t <= 99 for t in terms)
    # Both counts of terms, both ops and negative results all occur.
    assert {len(_chain(r)[0]) for r in rows} == {3, 4}
    assert {op for r in rows for op in _chain(r)[1]} == {"+", "-"}
    assert any(r["answer"].startswith("-") for r in rows)


def test_deterministic_and_prefix_stable():
    a = chain.generate("train", 100, seed=7, max_terms=5)
    assert a == chain.generate("train", 100, seed=7, max_terms=5)
    assert a[:40] == chain.generate("train", 40, seed=7, max_terms=5)
    assert a != chain.generate("train", 100, seed=8, max_terms=5)
    assert chain.generate("eval", 50) == chain.generate("eval", 50, seed=0)
    assert chain.generate("eval", 30, ops="-+") == chain.generate("eval", 30, ops="+-")


def test_splits_are_disjoint_and_rows_distinct():
    train = {r["prompt"] for seed in range(3) for r in chain.generate("train", 3000, seed=seed)}
    evals = [r["prompt"] for r in chain.generate("eval", 2000, seed=0)]
    assert len(set(evals)) == len(evals)
    assert not train & set(evals)
    for prompt in evals[:200]:
        assert chain.split_of(*_chain({"prompt": prompt})) == "eval"


def test_difficulty_controls_the_terms():
    rows = chain.generate("train", 200, seed=1, min_terms=5, max_terms=5, min_digits=3,
                          max_digits=3, ops="+")
    for row in rows:
        terms, ops = _chain(row)
        assert len(terms) == 5 and all(100 <= t <= 999 for t in terms) and set(ops) == {"+"}


@pytest.mark.parametrize("split", ["train", "eval"])
def test_answers_and_solutions_are_correct(split):
    for row in chain.generate(split, 500, seed=2, max_terms=6, max_digits=3):
        terms, ops = _chain(row)
        assert int(row["answer"]) == eval(row["prompt"][:-1])  # noqa: S307 - digits and +/-
        assert row["solution"].endswith(f"\\boxed{{{row['answer']}}}")
        steps = row["solution"][:row["solution"].index("\\boxed")].split(",")
        assert len(steps) == len(ops)
        total = terms[0]
        for step, op, term in zip(steps, ops, terms[1:]):
            # Each step starts from the previous total and is a true equation.
            lhs, rhs = step.rsplit("=", 1)
            assert lhs == f"{total}{op}{term}" and eval(lhs) == int(rhs), (row, step)  # noqa: S307
            total = int(rhs)
        assert total == int(row["answer"])


def test_hand_checked_examples():
    assert chain.solve((47, 8, 25, 31), ("+", "-", "+")) == (
        "61", "47+8=55,55-25=30,30+31=61\\boxed{61}")
    assert chain.solve((8, 25, 3), ("-", "+")) == ("-14", "8-25=-17,-17+3=-14\\boxed{-14}")
    assert chain.solve((5, 5, 0), ("-", "-")) == ("0", "5-5=0,0-0=0\\boxed{0}")
    assert chain.make_row((8, 25, 3), ("-", "+"))["prompt"] == "8-25+3="


def test_math_verify_accepts_the_solutions():
    math_verify = pytest.importorskip("math_verify")
    rows = chain.generate("eval", 60, seed=5) + [chain.make_row((8, 25, 3), ("-", "+"))]
    assert any(r["answer"].startswith("-") for r in rows)
    for row in rows:
        parsed = math_verify.parse(row["solution"])
        assert math_verify.verify(math_verify.parse(row["answer"]), parsed), row
        wrong = str(int(row["answer"]) + 1)
        assert not math_verify.verify(math_verify.parse(wrong), parsed), row


def test_math_verify_reward_scores_the_solutions():
    pytest.importorskip("math_verify")
    from lambdapo.rewards import MathVerifyReward
    rows = chain.generate("eval", 8, seed=1) + [chain.make_row((8, 25, 3), ("-", "+"))]
    reward = MathVerifyReward()
    prompts, answers = [r["prompt"] for r in rows], [r["answer"] for r in rows]
    good = reward(prompts, [r["solution"] for r in rows], None, answer=answers)
    wrong = [r["solution"].replace(f"\\boxed{{{r['answer']}}}",
                                   f"\\boxed{{{int(r['answer']) + 1}}}") for r in rows]
    assert all(w != r["solution"] for w, r in zip(wrong, rows))
    bad = reward(prompts, wrong, None, answer=answers)
    assert good == [1.0] * len(rows) and bad == [0.0] * len(rows)


@pytest.mark.parametrize("kwargs, name", [
    ({"split": "test", "num": 3}, "split"),
    ({"split": "train", "num": -1}, "num"),
    ({"split": "train", "num": 2, "seed": 1.5}, "seed"),
    ({"split": "train", "num": 2, "min_terms": 1}, "min_terms"),
    ({"split": "train", "num": 2, "max_terms": 9}, "max_terms"),
    ({"split": "train", "num": 2, "min_terms": 4, "max_terms": 3}, "min_terms"),
    ({"split": "train", "num": 2, "max_digits": 0}, "max_digits"),
    ({"split": "train", "num": 2, "min_digits": 3}, "min_digits"),
    ({"split": "train", "num": 2, "ops": "*"}, "ops"),
    ({"split": "train", "num": 2, "terms": 3}, "terms"),
    # 2 one-digit terms added: 100 problems, about an eighth of them in eval.
    ({"split": "eval", "num": 100, "min_terms": 2, "max_terms": 2, "max_digits": 1,
      "ops": "+"}, "num"),
])
def test_bad_arguments_raise_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        chain.generate(**kwargs)


def test_registry_and_data_dispatch():
    assert TASKS == {"arithmetic": arithmetic, "chain": chain}
    for name, task in TASKS.items():
        assert set(task.CHARS) >= set("0123456789+-=,\\boxed{}")
        assert (ASSETS / f"tiny-{name}" / "config.json").exists(), name
    config = DataConfig(dataset="chain", num_train=50, num_eval=20)
    train, held_out = load_split(config, "train", seed=4), load_split(config, "eval", seed=4)
    assert [r["prompt"] for r in train] == [r["prompt"] for r in chain.generate("train", 50, 4)]
    assert [r["answer"] for r in held_out] == [r["answer"] for r in chain.generate("eval", 20, 4)]
    # A built-in eval task next to a built-in train task.
    mixed = DataConfig(dataset="arithmetic", eval_dataset="chain", num_eval=5)
    assert load_split(mixed, "eval", seed=0)[0]["prompt"] == chain.generate("eval", 1)[0]["prompt"]


def _load_shipped():
    if not (ASSET / "config.json").exists():
        pytest.fail(f"the built-in model is missing from {ASSET}")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return (torch, transformers.AutoTokenizer.from_pretrained(ASSET),
            transformers.AutoModelForCausalLM.from_pretrained(ASSET))


def test_shipped_model_loads_and_solves_some_eval_problems():
    torch, tokenizer, model = _load_shipped()
    torch.set_num_threads(2)
    assert model.config.head_dim >= 32  # vLLM's attention backends need it
    assert len(tokenizer) == model.config.vocab_size
    assert tokenizer.eos_token_id == model.generation_config.eos_token_id
    assert sum(f.stat().st_size for f in ASSET.iterdir()) < 5 * 2**20

    rows = chain.generate("eval", 64, seed=0)
    row = rows[0]
    ids = tokenizer(row["prompt"] + row["solution"])["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == row["prompt"] + row["solution"]

    tokenizer.padding_side = "left"
    enc = tokenizer([r["prompt"] for r in rows], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=64)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    answers = [re.findall(r"\\boxed\{([^{}]*)\}", t) for t in texts]
    correct = sum(bool(a) and a[-1] == r["answer"] for a, r in zip(answers, rows))
    # Partial competence: it solves some, far from all (room for RL).
    assert 4 <= correct <= 56, list(zip(texts, rows))


def _recorded_command(readme: Path) -> list[str]:
    """The script arguments of the README's "Produced by" command."""
    match = re.search(r"^    PYTHONPATH=python python scripts/pretrain_builtin_model.py(.*)$",
                      readme.read_text(), re.M)
    assert match, f"{readme} records no command"
    return shlex.split(match.group(1))


# Only tiny-chain: bit-identity also needs the CPU's kernels to match, and tiny-arithmetic
# was made on another machine. On this project's 2-vCPU machine (AVX512, 2026-11-28) its
# recorded command gives the same 500 steps but other weights (held-out greedy 0.574 vs
# 0.566), from the script before and after --task alike, which agree byte for byte.
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LAMBDAPO_REPRODUCE_CHECKPOINTS") != "1",
                    reason="minutes of pre-training, and bit-exact only on the CPU kind that "
                           "made the checkpoint: set LAMBDAPO_REPRODUCE_CHECKPOINTS=1 to run")
@pytest.mark.parametrize("name", ["chain"])
def test_pretrain_script_reproduces_the_shipped_checkpoint(name, tmp_path):
    shipped = ASSETS / f"tiny-{name}"
    args = _recorded_command(shipped / "README.md")
    subprocess.run([sys.executable, str(REPO / "scripts" / "pretrain_builtin_model.py"), *args,
                    "--out", str(tmp_path)], check=True, cwd=REPO, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(REPO / "python")})
    for file in CHECKPOINT_FILES:
        assert (tmp_path / file).read_bytes() == (shipped / file).read_bytes(), (name, file)


def test_reasoning_gym_source_without_the_package_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # import raises ImportError
    config = DataConfig(dataset="reasoning_gym:basic_arithmetic", num_train=4)
    with pytest.raises(ValueError, match="pip install reasoning-gym"):
        load_split(config, "train", seed=0)


def test_reasoning_gym_source_rows_splits_and_verifier():
    pytest.importorskip("reasoning_gym")
    from lambdapo.data import DataError
    from lambdapo.tasks.reasoning_gym_source import verifier_reward
    config = DataConfig(dataset="reasoning_gym:basic_arithmetic", num_train=300, num_eval=40)
    train, held_out = load_split(config, "train", seed=1), load_split(config, "eval", seed=1)
    assert len(train) == 300 and len(held_out) == 40
    assert train == load_split(config, "train", seed=1)  # a pure function of the seed
    assert train != load_split(config, "train", seed=2)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    for row in held_out:
        assert row["answer"] == row["rg_entry"]["answer"] and row["solution"] == ""
    rows = held_out[:4]
    completions = [f"so \\boxed{{{r['answer']}}}" for r in rows]
    completions += [f"\\boxed{{{rows[0]['answer']}1}}", f"the answer is {rows[0]['answer']}"]
    rows += [rows[0], rows[0]]
    scores = verifier_reward([r["prompt"] for r in rows], completions, None,
                             rg_entry=[r["rg_entry"] for r in rows])
    # The task's own verifier: full marks for the gold answer, less for a wrong one (this
    # task gives partial credit), nothing without a \boxed{} answer.
    assert scores[:4] == [1.0] * 4 and scores[4] < 1.0 and scores[5] == 0.0
    with pytest.raises(DataError, match="no task 'no_such_task'"):
        load_split(DataConfig(dataset="reasoning_gym:no_such_task"), "train", seed=0)
    with pytest.raises(KeyError, match="rg_entry"):
        verifier_reward(["p"], ["\\boxed{1}"], None, answer=["1"])
