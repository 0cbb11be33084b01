"""Built-in tasks: deterministic generators of ``{"prompt", "answer", "solution"}`` rows.

Every task is a module with ``generate(split, num, seed=0, **difficulty)`` (``split`` is
"train" or "eval", disjoint by construction), ``DEFAULT_DIFFICULTY`` and ``CHARS`` (every
character its rows hold, for the character-level built-in model). Its built-in model is
``builtin:tiny-<name>``, made by ``scripts/pretrain_builtin_model.py --task <name>``.

* ``arithmetic``: multi-digit addition and subtraction with a worked column-by-column
  solution; the task of the built-in default run.
* ``chain``: chained addition and subtraction (``47+8-25+31=``) solved by a running
  total; multi-step, so its tiny model starts weaker and improves for longer.
"""

from types import ModuleType

from . import arithmetic, chain

TASKS: dict[str, ModuleType] = {"arithmetic": arithmetic, "chain": chain}

__all__ = ["TASKS", "arithmetic", "chain"]
