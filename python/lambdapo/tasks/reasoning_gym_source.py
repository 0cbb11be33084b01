"""``data.dataset=reasoning_gym:<task>``: procedural tasks of the ``reasoning-gym`` package.

reasoning-gym (``pip install reasoning-gym``) generates problems offline, each with a
verifier. A row is ``{"prompt": question, "answer": gold answer, "solution": "",
"rg_entry": the generator's entry}``; ``rg_entry`` (question, answer, metadata) is what
the task's verifier needs, and reaches reward functions as a column.

Splits: the train rows are items ``0..num-1`` of the task's dataset at ``seed``; the
eval rows come from the dataset at ``seed + EVAL_SEED_OFFSET`` with every question that
is also among the ``num_train`` train rows dropped, so held-out accuracy never counts a
training problem.

Rewards: ``math_verify`` (the default) fits tasks with numeric answers; for any task,
``reward.functions=[lambdapo.tasks.reasoning_gym_source:verifier_reward]`` scores with
the task's own verifier. Prompts are the bare questions: add an instruction with
``data.prompt_template`` (e.g. ``'{prompt} Put the final answer in \\boxed{{}}.'``).
"""

from __future__ import annotations

import re
from typing import Any

from .common import SPLITS

PREFIX = "reasoning_gym:"
# Far beyond any num_train, so the eval items' per-index seeds never meet the train ones'.
EVAL_SEED_OFFSET = 1_000_003
# Eval candidates drawn per requested row before giving up (a task with few distinct
# problems cannot supply many held-out ones).
_MAX_DRAWS_PER_ROW = 8
_BOXED = re.compile(r"\\boxed\s*\{")


def _reasoning_gym():
    try:
        import reasoning_gym
    except ImportError as exc:
        raise ValueError("data.dataset reasoning_gym:<task> needs the reasoning-gym package "
                         "(pip install reasoning-gym)") from exc
    return reasoning_gym


def _dataset(name: str, size: int, seed: int):
    rg = _reasoning_gym()
    if name not in rg.factory.DATASETS:
        known = sorted(rg.factory.DATASETS)
        raise ValueError(f"data.dataset {PREFIX}{name}: reasoning-gym has no task {name!r} "
                         f"(it has {len(known)}, e.g. {', '.join(known[:8])})")
    return rg.create_dataset(name, size=size, seed=seed)


def _row(entry: dict[str, Any]) -> dict[str, Any]:
    answer = entry["answer"]
    return {"prompt": entry["question"], "answer": "" if answer is None else str(answer),
            "solution": "", "rg_entry": entry}


def generate(name: str, split: str, num: int, seed: int = 0,
             num_train: int = 0) -> list[dict[str, Any]]:
    """Rows of the reasoning-gym task ``name``.

    Args:
        name: a reasoning-gym task (``reasoning_gym.factory.DATASETS``), e.g.
            ``"basic_arithmetic"`` or ``"countdown"``.
        split: ``"train"`` or ``"eval"``.
        num: number of rows (>= 1).
        seed: the run's data seed.
        num_train: (eval) how many train rows the run uses; their questions are kept out.

    Returns:
        ``num`` dicts ``{"prompt": str, "answer": str, "solution": "", "rg_entry": dict}``.

    Raises:
        ValueError: naming the argument, for a bad split or num, an unknown task, a missing
            reasoning-gym package, or a task with too few distinct held-out problems.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive int, got {num!r}")
    if split == "train":
        return [_row(entry) for entry in _dataset(name, num, seed)]
    train = {entry["question"] for entry in _dataset(name, num_train, seed)} if num_train else set()
    rows = []
    for entry in _dataset(name, _MAX_DRAWS_PER_ROW * num, seed + EVAL_SEED_OFFSET):
        if entry["question"] not in train:
            rows.append(_row(entry))
            if len(rows) == num:
                return rows
    raise ValueError(f"num={num} (data.num_eval): reasoning-gym task {name!r} gave only "
                     f"{len(rows)} eval problems outside the {num_train} train ones")


def verifier_reward(prompts: list[str], completions: list[str], completion_ids: list[list[int]],
                    **columns: Any) -> list[float]:
    """The task's own verifier (``score_answer``) on each completion's final answer.

    The final answer is the content of the last ``\\boxed{}``; a completion without one
    scores 0. A reward function in TRL's signature, for
    ``reward.functions=[lambdapo.tasks.reasoning_gym_source:verifier_reward]``.

    Raises:
        KeyError: when the rows have no ``rg_entry`` column (not reasoning-gym data).
    """
    if "rg_entry" not in columns:
        raise KeyError("verifier_reward needs the rg_entry column of data.dataset="
                       "reasoning_gym:<task>")
    rg = _reasoning_gym()
    scores = []
    for completion, entry in zip(completions, columns["rg_entry"]):
        answer = _last_boxed(completion)
        if answer is None:
            scores.append(0.0)
            continue
        score_answer = rg.get_score_answer_fn(entry["metadata"]["source_dataset"])
        scores.append(float(score_answer(answer=answer, entry=entry)))
    return scores


def _last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (nested braces allowed), or None."""
    found = list(_BOXED.finditer(text))
    if not found:
        return None
    brace = found[-1].end() - 1
    depth = 0
    for i in range(brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[brace + 1:i].strip()
    return None
