"""Reward functions and their weighted combination.

Every reward function has the signature of TRL's reward functions::

    fn(prompts: list[str], completions: list[str], completion_ids: list[list[int]],
       **columns: list) -> list[float]

one float per completion. ``columns`` holds the dataset's columns aligned with the
completions (``answer``, ``solution``, any other column of the data), plus
``solution_ids`` (the reference solution tokenized by the policy's tokenizer) and
``group_index`` (which prompt each completion answers). User rewards are given in the
config as ``module:function`` and may ignore the columns they do not need (take
``**columns``).

Built-in:

* ``math_verify``: 1.0 when the final answer of the completion equals the gold ``answer``
  as the ``math-verify`` package parses and compares them, else 0.0. The final answer is
  what follows the last ``reward.answer_marker`` when one is set, else what math-verify
  extracts (``\\boxed{}`` first). Each parse/verify call runs under ``reward.timeout_s``
  (a timed-out sample scores 0 and is counted in the metrics); each distinct final answer
  of a batch is verified once, in ``reward.workers`` processes when that is > 0.
* ``semantic_density``: ``lambdapo_ext.semantic_density`` between the completion's tokens and
  the reference solution's tokens (weight ``reward.lambda_sd``).
* ``format``: 1.0 when a final answer can be found at all (boxed, or after the marker).
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import os
import re
import signal
import threading
import time
import warnings
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import lambdapo_ext

from .config import RewardConfig

RewardFn = Callable[..., list]


class RewardError(RuntimeError):
    """A reward function raised or returned a non-finite value."""


@contextmanager
def time_limit(seconds: float):
    """Raises TimeoutError in the block after ``seconds`` (SIGALRM; main thread only, where
    pure-Python code such as sympy is interrupted between bytecodes). Elsewhere it cannot
    interrupt and the block runs unbounded, with a one-time warning."""
    if threading.current_thread() is not threading.main_thread() or seconds <= 0:
        if seconds > 0:
            _warn_once("reward time limits need the main thread; running without them")
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"exceeded {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


_BOXED = re.compile(r"\\boxed\s*\{")


def final_answer_text(completion: str, marker: str) -> str | None:
    """The text that holds the final answer: after the last ``marker`` (if set), else the
    completion itself when it has a \\boxed{} (math-verify extracts it), else None."""
    if marker:
        index = completion.rfind(marker)
        return completion[index + len(marker):].strip() if index >= 0 else None
    return completion if _BOXED.search(completion) else None


def _drop_timeout_disabled_warning(record: logging.LogRecord) -> bool:
    return "Timeout is disabled" not in record.getMessage()


class MathVerifyReward:
    """1.0 when math-verify finds the completion's final answer equal to the gold answer.

    ``workers`` > 0 verifies the distinct answers of a call in that many worker processes
    (parsing and comparing with sympy can take far longer than a training step's other
    work on real data); each worker keeps its own time limits and parse cache. Call
    :meth:`close` to stop them."""

    def __init__(self, answer_marker: str = "", timeout_s: int = 5, workers: int = 0):
        try:
            import math_verify
        except ImportError as exc:
            raise ImportError("the math_verify reward needs the math-verify package: "
                              "pip install math-verify") from exc
        self._mv = math_verify
        # math-verify's own (signal) timeouts are off because time_limit() provides them;
        # its one-time warning that nobody does is then wrong.
        for name in ("math_verify.grader", "math_verify.parser"):
            logging.getLogger(name).addFilter(_drop_timeout_disabled_warning)
        self.marker = answer_marker
        self.timeout_s = timeout_s
        self.timeouts = 0
        self.workers = workers
        self._pool = None
        self._gold_cache: dict[str, list] = {}

    def _parse(self, text: str) -> list:
        with time_limit(self.timeout_s):
            return self._mv.parse(text, parsing_timeout=None)

    def _gold(self, answer: str) -> list:
        if answer not in self._gold_cache:
            gold = self._parse(answer)
            if not gold:  # a plain answer such as "42" math-verify may want boxed
                gold = self._parse(f"\\boxed{{{answer}}}")
            self._gold_cache[answer] = gold
        return self._gold_cache[answer]

    def __call__(self, prompts, completions, completion_ids, **columns) -> list[float]:
        return self.start(prompts, completions, completion_ids, **columns)()

    def start(self, prompts, completions, completion_ids, **columns
              ) -> Callable[[], list[float]]:
        """Starts scoring and returns the call that waits for the values: with workers, they
        verify while the caller goes on (the trainer runs its first forward meanwhile);
        without, the values are computed here."""
        if "answer" not in columns:
            raise KeyError("math_verify needs the dataset's 'answer' column")
        # Sampled groups repeat completions (about half of a batch on the built-in task):
        # each distinct (final answer text, gold answer) is parsed and verified once.
        keys = []
        for completion, answer in zip(completions, columns["answer"]):
            text = final_answer_text(completion, self.marker)
            keys.append(None if text is None else (text, str(answer)))
        distinct = list(dict.fromkeys(k for k in keys if k is not None))
        if self.workers > 0 and len(distinct) > 1:
            scores = self._score_in_workers(distinct)
        else:
            computed = [self._score(*key) for key in distinct]
            scores = lambda: computed  # noqa: E731

        def values() -> list[float]:
            known = dict(zip(distinct, scores()))
            return [0.0 if key is None else known[key] for key in keys]
        return values

    def _score_in_workers(self, pairs: list[tuple[str, str]]) -> Callable[[], list[float]]:
        if self._pool is None:
            import concurrent.futures
            import multiprocessing

            # spawn: the trainer's process holds torch's threads, which fork would copy.
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_start, initargs=(os.getpid(),))
        chunk = max(1, -(-len(pairs) // (4 * self.workers)))
        try:
            futures = [self._pool.submit(_score_in_worker, (self.marker, self.timeout_s,
                                                            pairs[i:i + chunk]))
                       for i in range(0, len(pairs), chunk)]
        except BrokenProcessPool as exc:
            return self._without_workers(pairs, exc)

        def scores() -> list[float]:
            out = []
            try:
                for future in futures:
                    values, timeouts = future.result()
                    out += values
                    self.timeouts += timeouts
            except BrokenProcessPool as exc:
                return self._without_workers(pairs, exc)()
            return out
        return scores

    def _without_workers(self, pairs: list[tuple[str, str]], exc: Exception
                         ) -> Callable[[], list[float]]:
        """Verifies in this process from now on, after the workers failed to start or died
        (a script that starts training at import time, without ``if __name__ ==
        "__main__":``, cannot start spawned workers), saying so once."""
        warnings.warn(f"reward.workers: the math-verify worker processes failed "
                      f"({type(exc).__name__}: {str(exc).strip().splitlines()[0]}); verifying "
                      f"in the trainer's process from now on (a script that trains must "
                      f"guard its entry point with `if __name__ == \"__main__\":` for "
                      f"workers)", RuntimeWarning, stacklevel=4)
        self.close()
        self.workers = 0
        known = [self._score(*pair) for pair in pairs]
        return lambda: known

    def close(self) -> None:
        """Stops the worker processes (a later call starts them again)."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def _score(self, text: str, answer: str) -> float:
        try:
            predicted = self._parse(text if not self.marker else f"\\boxed{{{text}}}")
            with time_limit(self.timeout_s):
                ok = bool(predicted) and self._mv.verify(self._gold(answer), predicted,
                                                         timeout_seconds=None)
        except TimeoutError:
            self.timeouts += 1
            ok = False
        return 1.0 if ok else 0.0


_WORKER_REWARD: dict[tuple[str, int], MathVerifyReward] = {}


def _worker_start(trainer_pid: int) -> None:
    """In a reward worker: Ctrl-C, which a terminal sends to the whole process group, is the
    trainer's to handle (it stops the workers); and the worker ends by itself within a
    second of its trainer's death, even by SIGKILL (which nobody can catch)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == trainer_pid:
            time.sleep(0.5)
        os._exit(0)
    threading.Thread(target=watch, name="lambdapo-trainer-watch", daemon=True).start()


def _score_in_worker(job: tuple[str, int, list[tuple[str, str]]]) -> tuple[list[float], int]:
    """(scores of ``pairs``, timeouts among them) in a worker process, whose main thread
    runs the time limits."""
    marker, timeout_s, pairs = job
    reward = _WORKER_REWARD.setdefault((marker, timeout_s), MathVerifyReward(marker, timeout_s))
    before = reward.timeouts
    scores = [reward._score(text, answer) for text, answer in pairs]
    return scores, reward.timeouts - before


class SemanticDensityReward:
    """``lambdapo_ext.semantic_density`` of each completion against its reference solution."""

    def __init__(self, metric: str = "rouge_n", max_n: int = 2):
        self.metric = metric
        self.max_n = max_n

    def __call__(self, prompts, completions, completion_ids, **columns) -> list[float]:
        if "solution_ids" not in columns:
            raise KeyError("semantic_density needs reference solutions: set data.solution_field")
        solutions = columns["solution_ids"]
        groups = columns.get("group_index")
        if groups is not None:  # one reference per group, shared by its G completions
            first = {}
            for i, g in enumerate(groups):
                first.setdefault(g, len(first))
            refs = [None] * len(first)
            for i, g in enumerate(groups):
                refs[first[g]] = solutions[i]
            ref_index = [first[g] for g in groups]
        else:
            refs, ref_index = list(solutions), list(range(len(solutions)))
        import torch
        values = lambdapo_ext.semantic_density(
            [list(c) for c in completion_ids], [list(r) for r in refs],
            metric=self.metric, max_n=self.max_n, ref_index=torch.tensor(ref_index))
        return values.tolist()


def semantic_density_to_texts(completion_ids: list[list[int]], solutions: list[str],
                              tokenize: Callable[[str], list[int]], *, metric: str = "rouge_n",
                              max_n: int = 2) -> list[float]:
    """``lambdapo_ext.semantic_density`` of each completion against its reference solution
    given as text (the adapters' case: a dataset column, verl's ``extra_info``). Equal texts
    share one reference, tokenized once with ``tokenize``."""
    import torch
    first: dict[str, int] = {}
    ref_index = [first.setdefault(text, len(first)) for text in solutions]
    return lambdapo_ext.semantic_density(
        [list(c) for c in completion_ids], [tokenize(text) for text in first], metric=metric,
        max_n=max_n, ref_index=torch.tensor(ref_index)).tolist()


class FormatReward:
    """1.0 when the completion states a final answer where the answer reward looks for it."""

    def __init__(self, answer_marker: str = ""):
        self.marker = answer_marker

    def __call__(self, prompts, completions, completion_ids, **columns) -> list[float]:
        return [0.0 if final_answer_text(c, self.marker) is None else 1.0 for c in completions]


def load_user_reward(spec: str) -> RewardFn:
    """``module:function`` -> the function. Raises ValueError naming the spec."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward {spec!r}: expected a built-in name or module:function")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"reward {spec!r}: cannot load it ({exc})") from exc
    if not callable(fn):
        raise ValueError(f"reward {spec!r} is not callable")
    return fn


@dataclass
class RewardManager:
    """Named reward functions with weights; ``score`` returns the weighted total and each
    function's values."""
    functions: dict[str, RewardFn]
    weights: dict[str, float]
    on_error: str = "raise"
    errors: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: RewardConfig) -> "RewardManager":
        functions: dict[str, RewardFn] = {}
        for name in config.functions:
            if name == "math_verify":
                functions[name] = MathVerifyReward(config.answer_marker, config.timeout_s,
                                                   config.workers)
            elif name == "semantic_density":
                functions[name] = SemanticDensityReward(config.sd_metric, config.sd_max_n)
            elif name == "format":
                functions[name] = FormatReward(config.answer_marker)
            else:
                functions[name] = load_user_reward(name)
        unknown = set(config.weights) - set(functions)
        if unknown:
            raise ValueError(f"reward.weights names {sorted(unknown)}, which are not in "
                             f"reward.functions {config.functions}")
        weights = {name: float(config.weights.get(
            name, config.lambda_sd if name == "semantic_density" else 1.0)) for name in functions}
        return cls(functions, weights, config.on_error)

    def score(self, prompts: list[str], completions: list[str],
              completion_ids: list[list[int]], columns: dict[str, list],
              ) -> tuple[list[float], dict[str, list[float]]]:
        """(total reward per completion, {name: values}). Raises RewardError naming the
        reward and the sample when a function raises or returns a wrong-length or non-finite
        result (unless ``on_error == "zero"``: those samples score 0 and are counted)."""
        return self.start(prompts, completions, completion_ids, columns)()

    def start(self, prompts: list[str], completions: list[str],
              completion_ids: list[list[int]], columns: dict[str, list],
              ) -> Callable[[], tuple[list[float], dict[str, list[float]]]]:
        """:meth:`score` in two halves: the functions that can work in the background (a
        ``start`` method, as math_verify with workers) start now; the returned call runs the
        others, waits for those, and returns what :meth:`score` returns, with its errors."""
        started: dict[str, Callable[[], list]] = {}
        for name, fn in self.functions.items():
            if hasattr(fn, "start"):
                try:
                    started[name] = fn.start(prompts, completions, completion_ids, **columns)
                except Exception as exc:  # noqa: BLE001 - reported when the values are due
                    started[name] = functools.partial(_raise, exc)

        def finish() -> tuple[list[float], dict[str, list[float]]]:
            per_function = {name: self._checked_values(
                name, fn, started.get(name) or functools.partial(
                    fn, prompts, completions, completion_ids, **columns),
                prompts, completions, completion_ids, columns)
                for name, fn in self.functions.items()}
            total = [sum(self.weights[name] * per_function[name][i] for name in per_function)
                     for i in range(len(completions))]
            return total, per_function
        return finish

    def _checked_values(self, name: str, fn: RewardFn, produce: Callable[[], list], prompts,
                        completions, completion_ids, columns) -> list[float]:
        n = len(completions)
        try:
            values = [float(v) for v in produce()]
            if len(values) != n:
                raise RewardError(f"reward {name!r} returned {len(values)} values for {n} "
                                  f"completions")
        except RewardError:
            raise
        except Exception as exc:  # noqa: BLE001 - any user error is reported the same way
            if self.on_error != "zero":
                i = _first_failing_sample(fn, prompts, completions, completion_ids, columns)
                where = (f"sample {i} (prompt {prompts[i][:80]!r}, completion "
                         f"{completions[i][:80]!r})" if i is not None else "the batch")
                raise RewardError(f"reward {name!r} raised {type(exc).__name__}: {exc} "
                                  f"on {where}") from exc
            self.errors[name] = self.errors.get(name, 0) + n
            values = [0.0] * n
        for i, v in enumerate(values):
            if not math.isfinite(v):
                if self.on_error != "zero":
                    raise RewardError(f"reward {name!r} returned {v} for sample {i} (prompt "
                                      f"{prompts[i][:80]!r}, completion "
                                      f"{completions[i][:80]!r})")
                self.errors[name] = self.errors.get(name, 0) + 1
                values[i] = 0.0
        return values

    @property
    def workers(self) -> int:
        """Worker processes that the functions started by :meth:`start` may keep busy."""
        return sum(getattr(fn, "workers", 0) for fn in self.functions.values()
                   if hasattr(fn, "start"))

    def close(self) -> None:
        """Stops the worker processes of the functions that have them."""
        for fn in self.functions.values():
            if hasattr(fn, "close"):
                fn.close()


def _raise(exc: Exception):
    raise exc


def _first_failing_sample(fn: RewardFn, prompts, completions, completion_ids,
                          columns: dict[str, list]) -> int | None:
    """Index of the first sample on which ``fn`` raises alone (None if none does)."""
    for i in range(len(completions)):
        try:
            fn(prompts[i:i + 1], completions[i:i + 1], completion_ids[i:i + 1],
               **{k: v[i:i + 1] for k, v in columns.items()})
        except Exception:  # noqa: BLE001
            return i
    return None
