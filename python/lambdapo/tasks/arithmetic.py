"""The built-in ``arithmetic`` task: multi-digit addition and subtraction.

Each row is ``{"prompt": str, "answer": str, "solution": str}``:

* ``prompt``   the problem, e.g. ``"347+285="``; the model continues it directly
  (no chat template, no instruction: the built-in model is a tiny character-level LM).
* ``answer``   the gold result as a plain integer string, e.g. ``"632"`` or ``"-62"``.
* ``solution`` a worked, column-by-column reference (least significant column first)
  ending in ``\\boxed{<answer>}``; it is both the pre-training target (the completion
  the model learns to write after the prompt) and the semantic-density reference.

Solution format (operands right-aligned, a missing digit is 0):

* addition, one step per column ``x+y[+1]=s``: ``+1`` is the carry coming in, and the
  column's digit is the last digit of ``s`` (``s >= 10`` carries into the next column)::

      347+285=  ->  7+5=12,4+8+1=13,3+2+1=6\\boxed{632}

* subtraction of the smaller from the larger operand, one step per column
  ``[1]x-y[-1]=d``: a leading ``1`` on the top digit borrows ten from the next column,
  ``-1`` repays the borrow of the previous one. A negative result is first rewritten
  as ``-(larger-smaller)``::

      632-285=  ->  12-5=7,13-8-1=4,6-2-1=3\\boxed{347}
      285-632=  ->  -(632-285),12-5=7,13-8-1=4,6-2-1=3\\boxed{-347}

Train and eval are disjoint by construction: a stable hash of the problem text
(``"347+285"``) puts every problem in exactly one split, whatever ``seed`` or ``num``.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from .common import check_generate_args

OPS = ("+", "-")
# Every character a prompt or solution can hold, plus a space for hand-typed prompts.
CHARS = " ()+,-=0123456789\\{}bdeox"
DEFAULT_DIFFICULTY: dict[str, Any] = {"min_digits": 2, "max_digits": 3, "ops": "+-"}
MAX_DIGITS = 9
# About 1 problem in EVAL_EVERY goes to the eval split.
EVAL_EVERY = 8
# Drawing stops after this many candidates per requested row (a tiny problem space,
# e.g. 1-digit operands, cannot supply many distinct problems for one split).
_MAX_DRAWS_PER_ROW = 64


def split_of(a: int, op: str, b: int) -> str:
    """Returns the split ("train" or "eval") the problem ``a op b`` belongs to.

    A keyed hash, not Python's ``hash`` (salted per process), so the assignment is the
    same on every machine and run.
    """
    digest = hashlib.blake2b(f"{a}{op}{b}".encode(), digest_size=8, person=b"lpo-arith").digest()
    return "eval" if int.from_bytes(digest, "little") % EVAL_EVERY == 0 else "train"


def _digits(n: int, width: int) -> list[int]:
    """Digits of non-negative ``n``, least significant first, zero-padded to ``width``."""
    return [int(ch) for ch in reversed(str(n).rjust(width, "0"))]


def _addition_steps(a: int, b: int) -> list[str]:
    width = max(len(str(a)), len(str(b)))
    steps, carry = [], 0
    for x, y in zip(_digits(a, width), _digits(b, width)):
        s = x + y + carry
        steps.append(f"{x}+{y}{'+1' if carry else ''}={s}")
        carry = s // 10
    return steps


def _subtraction_steps(top: int, bottom: int) -> list[str]:
    """Column steps of ``top - bottom`` for ``top >= bottom >= 0``."""
    width = len(str(top))
    steps, borrow = [], 0
    for x, y in zip(_digits(top, width), _digits(bottom, width)):
        d = x - borrow - y
        borrow_out = d < 0
        # Borrowing shows as the top digit plus ten ("1x"), which keeps each step true.
        lead = "1" if borrow_out else ""
        steps.append(f"{lead}{x}-{y}{'-1' if borrow else ''}={d + 10 * borrow_out}")
        borrow = int(borrow_out)
    return steps


def solve(a: int, op: str, b: int) -> tuple[str, str]:
    """Returns ``(answer, solution)`` of the problem ``a op b`` (``a, b >= 0``)."""
    if op == "+":
        value, steps = a + b, _addition_steps(a, b)
    elif op == "-":
        value = a - b
        if a >= b:
            steps = _subtraction_steps(a, b)
        else:
            steps = [f"-({b}-{a})"] + _subtraction_steps(b, a)
    else:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    return str(value), ",".join(steps) + f"\\boxed{{{value}}}"


def make_row(a: int, op: str, b: int) -> dict[str, str]:
    """The row ``{"prompt", "answer", "solution"}`` of the problem ``a op b``."""
    answer, solution = solve(a, op, b)
    return {"prompt": f"{a}{op}{b}=", "answer": answer, "solution": solution}


def _check_difficulty(difficulty: dict[str, Any]) -> tuple[int, int, tuple[str, ...]]:
    unknown = sorted(set(difficulty) - set(DEFAULT_DIFFICULTY))
    if unknown:
        raise ValueError(f"unknown difficulty argument(s) {unknown}; "
                         f"expected some of {sorted(DEFAULT_DIFFICULTY)}")
    merged = {**DEFAULT_DIFFICULTY, **difficulty}
    lo, hi, ops = merged["min_digits"], merged["max_digits"], merged["ops"]
    for name, value in (("min_digits", lo), ("max_digits", hi)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DIGITS:
            raise ValueError(f"{name} must be an int in [1, {MAX_DIGITS}], got {value!r}")
    if lo > hi:
        raise ValueError(f"min_digits ({lo}) must be <= max_digits ({hi})")
    if not isinstance(ops, (str, list, tuple)) or not ops or any(o not in OPS for o in ops):
        raise ValueError(f"ops must be a non-empty string or sequence of {OPS}, got {ops!r}")
    # Sorted and deduplicated, so "+-" and "-+" give the same problems.
    return lo, hi, tuple(sorted(set(ops)))


def generate(split: str, num: int, seed: int = 0, **difficulty: Any) -> list[dict[str, str]]:
    """Generates ``num`` distinct arithmetic problems of one split.

    Args:
        split: ``"train"`` or ``"eval"``; the two never share a problem.
        num: number of rows (>= 0).
        seed: RNG seed; the rows are a pure function of ``(split, num, seed, difficulty)``
            and the first ``k`` rows of a call do not depend on ``num`` (prefix-stable).
        **difficulty: ``min_digits`` / ``max_digits`` (int, 1..9, defaults 2 / 3): each
            operand's digit count is drawn uniformly from this range, then its digits
            uniformly (no leading zero; 1-digit operands include 0);
            ``ops`` (str or sequence over "+", "-", default "+-"): drawn uniformly.

    Returns:
        A list of ``num`` dicts ``{"prompt": str, "answer": str, "solution": str}``
        (see the module docstring for the formats).

    Raises:
        ValueError: naming the argument, for a bad split, num, seed or difficulty, or
            when the difficulty's problem space cannot supply ``num`` distinct problems.
    """
    check_generate_args(split, num, seed)
    lo, hi, ops = _check_difficulty(difficulty)

    # A string seed is hashed with SHA-512 by random.Random: stable across runs/platforms.
    rng = random.Random(f"arithmetic:{split}:{seed}:{lo}:{hi}:{''.join(ops)}")

    def operand() -> int:
        n = rng.randint(lo, hi)
        return rng.randint(0, 9) if n == 1 else rng.randint(10 ** (n - 1), 10 ** n - 1)

    rows: list[dict[str, str]] = []
    seen: set[tuple[int, str, int]] = set()
    for _ in range(_MAX_DRAWS_PER_ROW * num + 1000):
        if len(rows) == num:
            return rows
        a, op, b = operand(), rng.choice(ops), operand()
        if (a, op, b) in seen or split_of(a, op, b) != split:
            continue
        seen.add((a, op, b))
        rows.append(make_row(a, op, b))
    if len(rows) == num:
        return rows
    raise ValueError(f"num={num} exceeds the distinct {split!r} problems this difficulty "
                     f"(min_digits={lo}, max_digits={hi}, ops={''.join(ops)!r}) provides; "
                     f"found {len(rows)}")
