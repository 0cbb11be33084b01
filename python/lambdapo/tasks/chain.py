"""The built-in ``chain`` task: chained addition and subtraction, e.g. ``47+8-25+31=``.

A multi-step task: the tiny model must get every intermediate result right, so it
starts weaker than on ``arithmetic`` and has more to learn from RL.

Each row is ``{"prompt": str, "answer": str, "solution": str}``:

* ``prompt``   the chain, e.g. ``"47+8-25+31="``; the model continues it directly.
* ``answer``   the gold result as a plain integer string, e.g. ``"61"`` or ``"-17"``.
* ``solution`` the running total, one step per operation, left to right, each step
  ``total op operand=new total``, ending in ``\\boxed{<answer>}``; the pre-training
  target and the semantic-density reference::

      47+8-25+31=  ->  47+8=55,55-25=30,30+31=61\\boxed{61}
      8-25+3=      ->  8-25=-17,-17+3=-14\\boxed{-14}

Train and eval are disjoint by construction: a stable hash of the problem text
(``"47+8-25+31"``) puts every problem in exactly one split, whatever ``seed`` or ``num``.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from .common import check_generate_args

OPS = ("+", "-")
# Every character a prompt or solution can hold, plus a space for hand-typed prompts
# (the same set as ``arithmetic``, so one tokenizer layout serves both).
CHARS = " ()+,-=0123456789\\{}bdeox"
DEFAULT_DIFFICULTY: dict[str, Any] = {"min_terms": 3, "max_terms": 4, "min_digits": 1,
                                      "max_digits": 2, "ops": "+-"}
MAX_TERMS = 8
MAX_DIGITS = 6
# About 1 problem in EVAL_EVERY goes to the eval split.
EVAL_EVERY = 8
# Drawing stops after this many candidates per requested row (a tiny problem space
# cannot supply many distinct problems for one split).
_MAX_DRAWS_PER_ROW = 64


def _text(terms: tuple[int, ...], ops: tuple[str, ...]) -> str:
    """``(47, 8, 25), ("+", "-")`` -> ``"47+8-25"``."""
    return str(terms[0]) + "".join(f"{op}{t}" for op, t in zip(ops, terms[1:]))


def split_of(terms: tuple[int, ...], ops: tuple[str, ...]) -> str:
    """Returns the split ("train" or "eval") of the chain ``terms`` joined by ``ops``.

    A keyed hash, not Python's ``hash`` (salted per process), so the assignment is the
    same on every machine and run.
    """
    digest = hashlib.blake2b(_text(terms, ops).encode(), digest_size=8,
                             person=b"lpo-chain").digest()
    return "eval" if int.from_bytes(digest, "little") % EVAL_EVERY == 0 else "train"


def solve(terms: tuple[int, ...], ops: tuple[str, ...]) -> tuple[str, str]:
    """Returns ``(answer, solution)`` of the chain ``terms[0] ops[0] terms[1] ...``.

    Raises:
        ValueError: when ``ops`` is not one shorter than ``terms`` (at least 2 terms),
            holds an op other than "+"/"-", or a term is negative.
    """
    if len(terms) < 2 or len(ops) != len(terms) - 1:
        raise ValueError(f"terms ({len(terms)}) must be >= 2 and one more than ops ({len(ops)})")
    if any(op not in OPS for op in ops):
        raise ValueError(f"ops must be from {OPS}, got {ops!r}")
    if any(t < 0 for t in terms):
        raise ValueError(f"terms must be non-negative, got {terms!r}")
    total, steps = terms[0], []
    for op, term in zip(ops, terms[1:]):
        new = total + term if op == "+" else total - term
        steps.append(f"{total}{op}{term}={new}")
        total = new
    return str(total), ",".join(steps) + f"\\boxed{{{total}}}"


def make_row(terms: tuple[int, ...], ops: tuple[str, ...]) -> dict[str, str]:
    """The row ``{"prompt", "answer", "solution"}`` of one chain."""
    answer, solution = solve(terms, ops)
    return {"prompt": _text(terms, ops) + "=", "answer": answer, "solution": solution}


def _check_difficulty(difficulty: dict[str, Any]) -> tuple[int, int, int, int, tuple[str, ...]]:
    unknown = sorted(set(difficulty) - set(DEFAULT_DIFFICULTY))
    if unknown:
        raise ValueError(f"unknown difficulty argument(s) {unknown}; "
                         f"expected some of {sorted(DEFAULT_DIFFICULTY)}")
    merged = {**DEFAULT_DIFFICULTY, **difficulty}
    for name, lo, hi in (("min_terms", 2, MAX_TERMS), ("max_terms", 2, MAX_TERMS),
                         ("min_digits", 1, MAX_DIGITS), ("max_digits", 1, MAX_DIGITS)):
        value = merged[name]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {value!r}")
    for kind in ("terms", "digits"):
        if merged[f"min_{kind}"] > merged[f"max_{kind}"]:
            raise ValueError(f"min_{kind} ({merged[f'min_{kind}']}) must be <= "
                             f"max_{kind} ({merged[f'max_{kind}']})")
    ops = merged["ops"]
    if not isinstance(ops, (str, list, tuple)) or not ops or any(o not in OPS for o in ops):
        raise ValueError(f"ops must be a non-empty string or sequence of {OPS}, got {ops!r}")
    # Sorted and deduplicated, so "+-" and "-+" give the same problems.
    return (merged["min_terms"], merged["max_terms"], merged["min_digits"],
            merged["max_digits"], tuple(sorted(set(ops))))


def generate(split: str, num: int, seed: int = 0, **difficulty: Any) -> list[dict[str, str]]:
    """Generates ``num`` distinct chains of one split.

    Args:
        split: ``"train"`` or ``"eval"``; the two never share a problem.
        num: number of rows (>= 0).
        seed: RNG seed; the rows are a pure function of ``(split, num, seed, difficulty)``
            and the first ``k`` rows of a call do not depend on ``num`` (prefix-stable).
        **difficulty: ``min_terms`` / ``max_terms`` (int, 2..8, defaults 3 / 4): the
            number of terms, drawn uniformly; ``min_digits`` / ``max_digits`` (int, 1..6,
            defaults 1 / 2): each term's digit count, drawn uniformly, then its digits
            (no leading zero; 1-digit terms include 0); ``ops`` (str or sequence over
            "+", "-", default "+-"): each operation drawn uniformly.

    Returns:
        A list of ``num`` dicts ``{"prompt": str, "answer": str, "solution": str}``
        (see the module docstring for the formats).

    Raises:
        ValueError: naming the argument, for a bad split, num, seed or difficulty, or
            when the difficulty's problem space cannot supply ``num`` distinct problems.
    """
    check_generate_args(split, num, seed)
    min_terms, max_terms, min_digits, max_digits, ops = _check_difficulty(difficulty)

    # A string seed is hashed with SHA-512 by random.Random: stable across runs/platforms.
    rng = random.Random(f"chain:{split}:{seed}:{min_terms}:{max_terms}:{min_digits}:"
                        f"{max_digits}:{''.join(ops)}")

    def term() -> int:
        n = rng.randint(min_digits, max_digits)
        return rng.randint(0, 9) if n == 1 else rng.randint(10 ** (n - 1), 10 ** n - 1)

    rows: list[dict[str, str]] = []
    seen: set[tuple[tuple[int, ...], tuple[str, ...]]] = set()
    for _ in range(_MAX_DRAWS_PER_ROW * num + 1000):
        if len(rows) == num:
            return rows
        count = rng.randint(min_terms, max_terms)
        terms = tuple(term() for _ in range(count))
        chosen = tuple(rng.choice(ops) for _ in range(count - 1))
        if (terms, chosen) in seen or split_of(terms, chosen) != split:
            continue
        seen.add((terms, chosen))
        rows.append(make_row(terms, chosen))
    if len(rows) == num:
        return rows
    raise ValueError(f"num={num} exceeds the distinct {split!r} problems this difficulty "
                     f"({min_terms}-{max_terms} terms of {min_digits}-{max_digits} digits, "
                     f"ops={''.join(ops)!r}) provides; found {len(rows)}")
