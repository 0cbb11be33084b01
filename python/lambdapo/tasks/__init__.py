"""Built-in tasks: deterministic generators of ``{"prompt", "answer", "solution"}`` rows.

``arithmetic`` is the task of the built-in default run (multi-digit addition and
subtraction with a worked column-by-column solution).
"""

from . import arithmetic

TASKS = {"arithmetic": arithmetic.generate}

__all__ = ["TASKS", "arithmetic"]
