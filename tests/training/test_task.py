"""The built-in ``arithmetic`` task and the tiny model shipped with it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lambdapo.tasks import arithmetic

ASSET = Path(arithmetic.__file__).resolve().parents[1] / "assets" / "tiny-arithmetic"
PROMPT = re.compile(r"^(\d+)([+-])(\d+)=$")


def _operands(row):
    a, op, b = PROMPT.match(row["prompt"]).groups()
    return int(a), op, int(b)


def test_rows_have_the_documented_fields_and_formats():
    rows = arithmetic.generate("train", 200, seed=3)
    assert len(rows) == 200
    for row in rows:
        assert set(row) == {"prompt", "answer", "solution"}
        assert all(isinstance(v, str) for v in row.values())
        assert PROMPT.match(row["prompt"]), row
        assert re.fullmatch(r"-?\d+", row["answer"]), row
        assert str(int(row["answer"])) == row["answer"]  # no leading zeros or "-0"


def test_deterministic_and_prefix_stable():
    a = arithmetic.generate("train", 100, seed=7, max_digits=4)
    assert a == arithmetic.generate("train", 100, seed=7, max_digits=4)
    assert a[:40] == arithmetic.generate("train", 40, seed=7, max_digits=4)
    assert a != arithmetic.generate("train", 100, seed=8, max_digits=4)
    assert arithmetic.generate("eval", 50) == arithmetic.generate("eval", 50, seed=0)
    # Equivalent spellings of the same difficulty give the same problems.
    assert arithmetic.generate("eval", 30, ops="-+") == arithmetic.generate("eval", 30, ops="+-")


def test_splits_are_disjoint_and_rows_distinct():
    train = {r["prompt"] for seed in range(3) for r in arithmetic.generate("train", 3000, seed=seed)}
    evals = [r["prompt"] for r in arithmetic.generate("eval", 2000, seed=0)]
    assert len(set(evals)) == len(evals)
    assert not train & set(evals)
    for prompt in evals[:200]:
        a, op, b = _operands({"prompt": prompt})
        assert arithmetic.split_of(a, op, b) == "eval"


def test_difficulty_controls_the_operands():
    rows = arithmetic.generate("train", 300, seed=1, min_digits=3, max_digits=3, ops="-")
    for row in rows:
        a, op, b = _operands(row)
        assert op == "-" and 100 <= a <= 999 and 100 <= b <= 999
    default = arithmetic.generate("train", 500, seed=1)
    ops = {_operands(r)[1] for r in default}
    assert ops == {"+", "-"}
    assert any(r["answer"].startswith("-") for r in default)  # negative results occur


@pytest.mark.parametrize("split", ["train", "eval"])
def test_answers_and_solutions_are_correct(split):
    for row in arithmetic.generate(split, 500, seed=2, min_digits=1, max_digits=4):
        a, op, b = _operands(row)
        assert int(row["answer"]) == (a + b if op == "+" else a - b)
        assert row["solution"].endswith(f"\\boxed{{{row['answer']}}}")
        # Every column step is a true equation.
        steps = row["solution"][:row["solution"].index("\\boxed")].split(",")
        for step in steps:
            if step.startswith("-("):
                assert step == f"-({b}-{a})" and a < b
                continue
            lhs, rhs = step.split("=")
            assert eval(lhs) == int(rhs), (row, step)  # noqa: S307 - digits and +/- only


def test_hand_checked_examples():
    assert arithmetic.solve(347, "+", 285) == ("632", "7+5=12,4+8+1=13,3+2+1=6\\boxed{632}")
    assert arithmetic.solve(632, "-", 285) == ("347", "12-5=7,13-8-1=4,6-2-1=3\\boxed{347}")
    assert arithmetic.solve(285, "-", 632) == (
        "-347", "-(632-285),12-5=7,13-8-1=4,6-2-1=3\\boxed{-347}")
    assert arithmetic.solve(1000, "-", 1) == ("999", "10-1=9,10-0-1=9,10-0-1=9,1-0-1=0\\boxed{999}")
    assert arithmetic.solve(95, "+", 7) == ("102", "5+7=12,9+0+1=10\\boxed{102}")
    assert arithmetic.solve(42, "-", 42) == ("0", "2-2=0,4-4=0\\boxed{0}")


def test_math_verify_accepts_the_solutions():
    math_verify = pytest.importorskip("math_verify")
    rows = arithmetic.generate("eval", 60, seed=5)
    rows += [arithmetic.make_row(285, "-", 632), arithmetic.make_row(42, "-", 42)]
    assert any(r["answer"].startswith("-") for r in rows)
    for row in rows:
        gold = math_verify.parse(row["answer"])
        assert math_verify.verify(gold, math_verify.parse(row["solution"])), row
        wrong = str(int(row["answer"]) + 1)
        assert not math_verify.verify(math_verify.parse(wrong), math_verify.parse(row["solution"]))
    # The sign matters.
    assert not math_verify.verify(math_verify.parse("-347"), math_verify.parse("\\boxed{347}"))


@pytest.mark.parametrize("kwargs, name", [
    ({"split": "test", "num": 3}, "split"),
    ({"split": "train", "num": -1}, "num"),
    ({"split": "train", "num": 2.0}, "num"),
    ({"split": "train", "num": 2, "seed": "0"}, "seed"),
    ({"split": "train", "num": 2, "min_digits": 0}, "min_digits"),
    ({"split": "train", "num": 2, "max_digits": 10}, "max_digits"),
    ({"split": "train", "num": 2, "min_digits": 4, "max_digits": 3}, "min_digits"),
    ({"split": "train", "num": 2, "ops": "*"}, "ops"),
    ({"split": "train", "num": 2, "ops": ""}, "ops"),
    ({"split": "train", "num": 2, "digits": 3}, "digits"),
    # 1-digit addition has only 100 problems, about an eighth of them in eval.
    ({"split": "eval", "num": 100, "min_digits": 1, "max_digits": 1, "ops": "+"}, "num"),
])
def test_bad_arguments_raise_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        arithmetic.generate(**kwargs)


def test_shipped_model_loads_and_solves_some_eval_problems():
    if not (ASSET / "config.json").exists():
        pytest.fail(f"the built-in model is missing from {ASSET}")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(ASSET)
    model = transformers.AutoModelForCausalLM.from_pretrained(ASSET)
    assert model.config.head_dim >= 32  # vLLM's attention backends need it
    assert len(tokenizer) == model.config.vocab_size
    assert tokenizer.eos_token_id == model.generation_config.eos_token_id
    assert tokenizer.pad_token_id == model.generation_config.pad_token_id
    assert sum(f.stat().st_size for f in ASSET.iterdir()) < 8 * 2**20

    rows = arithmetic.generate("eval", 32, seed=0)
    # Character-level: tokenizing prompt and solution apart equals tokenizing them together.
    row = rows[0]
    assert (tokenizer(row["prompt"])["input_ids"]
            + tokenizer(row["solution"], add_special_tokens=False)["input_ids"]
            == tokenizer(row["prompt"] + row["solution"])["input_ids"])
    ids = tokenizer(row["solution"], add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == row["solution"]
    assert tokenizer.unk_token_id not in tokenizer(row["prompt"] + row["solution"])["input_ids"]

    tokenizer.padding_side = "left"
    enc = tokenizer([r["prompt"] for r in rows], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=64)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    answers = [re.findall(r"\\boxed\{([^{}]*)\}", t) for t in texts]
    correct = sum(bool(a) and a[-1] == r["answer"] for a, r in zip(answers, rows))
    assert correct >= 4, list(zip(texts, rows))
