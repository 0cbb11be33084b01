"""What the built-in task generators share: the split names and the checks of
``generate(split, num, seed)``'s common arguments."""

from __future__ import annotations

SPLITS = ("train", "eval")


def check_generate_args(split: str, num: int, seed: int) -> None:
    """Raises ValueError naming the argument for a bad split, row count or seed."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if isinstance(num, bool) or not isinstance(num, int) or num < 0:
        raise ValueError(f"num must be a non-negative int, got {num!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
