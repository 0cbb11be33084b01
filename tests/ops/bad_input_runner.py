"""The runner of the bad-input cases: the Case type, the verdicts, the helpers the case modules
share, and a server that runs each case in a process of its own.

A bad input must give a Python exception whose message names the offending argument; never a
signal, never an abort, never a silently accepted call (issue 13). Each case is one call (or a
forward and backward) on a small tensor; the server imports torch once and forks a fresh child
per case, so a crash kills only that child and costs milliseconds, not a torch import. The cases
are listed per op family in tests/ops/bad_inputs_<family>.py; tests/ops/test_bad_inputs.py
gathers them and is the script that runs them (its ``--case`` and ``--serve`` modes).

Verdicts: ok; crash (killed by a signal), timeout, died (exited without a verdict); accepted
(a bad input raised nothing); wrong-error (an exception type an op must not raise, such as
ZeroDivisionError); unnamed (the message does not name the argument); rejected-valid (a valid
input raised); wrong-result (a valid or strided input gave a wrong result); cuda-unusable (after
the case, a small valid call and torch.cuda.synchronize() failed in the same process).

Case classes: shape, dtype, device (CUDA only: a CPU call with a meta tensor goes to the fake
kernel, which returns uninitialized tensors instead of rejecting the mix), range (out-of-range
values), nonfinite, empty, scalar, memory (strided, expanded or overlapping inputs: the op may
reject them naming the argument, or must give the result of the contiguous input).
"""

from __future__ import annotations

import faulthandler
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

import lambdapo_ext

ALLOWED_ERRORS = (ValueError, TypeError, RuntimeError, IndexError)
DETAIL_CHARS = 600
DEFAULT_TIMEOUT_S = 60

# Message words that name an argument given as several tensors (the C++ ops take the packed
# parts separately).
ARGUMENT_ALIASES = {
    "cand": ("cand", "cand_values", "cand_starts", "cand_lengths"),
    "ref": ("ref", "ref_values", "ref_starts", "ref_lengths"),
}

# Judges one case id on one device in this process (the case list's own judge).
JudgeCase = Callable[[str, str], dict[str, str]]


@dataclass(frozen=True)
class Case:
    """One bad (or edge-case valid) input of one op.

    ``call(device)`` runs the op. With ``names`` and neither ``check`` nor ``equal_to``, the
    call must raise an exception naming one of ``names``. With ``check`` the input is valid:
    ``check(result)`` must pass. With ``equal_to`` (layout cases) the call may raise naming one
    of ``names``, or must return ``equal_to(device)``'s result.
    """

    op: str
    kind: str
    name: str
    call: Callable[[str], Any]
    names: tuple[str, ...] = ()
    check: Callable[[Any], None] | None = None
    equal_to: Callable[[str], Any] | None = None
    cuda_only: bool = False
    issue: str = ""  # what issue 13 saw for this case, if it listed it

    @property
    def id(self) -> str:
        return f"{self.op}/{self.kind}/{self.name}"

    @property
    def devices(self) -> tuple[str, ...]:
        return ("cuda",) if self.cuda_only else ("cpu", "cuda")


# ---------------------------------------------------------------- helpers of the case modules
def int64(values, device: str) -> torch.Tensor:
    """An int64 tensor of ``values`` on ``device``."""
    return torch.tensor(values, dtype=torch.int64, device=device)


def with_value(tensor: torch.Tensor, index, value) -> torch.Tensor:
    """``tensor`` with ``tensor[index] = value`` written in place."""
    tensor[index] = value
    return tensor


def check_shapes(shape: tuple[int, ...], dtype: torch.dtype) -> Callable[[Any], None]:
    """check(): every output tensor has ``shape`` and ``dtype``."""
    def check(result):
        for out in (result if isinstance(result, tuple) else (result,)):
            assert tuple(out.shape) == shape and out.dtype == dtype, (
                f"expected {dtype} {shape}, got {out.dtype} {tuple(out.shape)}")
    return check


def assert_same(actual: Any, expected: Any) -> None:
    # Not torch.testing.assert_close: its first call takes ~2 s of imports, in every child.
    if isinstance(expected, tuple):
        assert isinstance(actual, tuple) and len(actual) == len(expected), describe(actual)
        for a, e in zip(actual, expected):
            assert_same(a, e)
        return
    assert (actual.shape, actual.dtype, actual.device) == (
        expected.shape, expected.dtype, expected.device), (
        f"got {describe(actual)}, expected {describe(expected)}")
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert torch.allclose(a, e, rtol=1e-5, atol=1e-6, equal_nan=True), (
        f"greatest difference {float((a - e).abs().nan_to_num(math.inf).max())}: got "
        f"{describe(actual)}, expected {describe(expected)}")


def describe(result: Any) -> str:
    if isinstance(result, torch.Tensor):
        return f"{result.dtype} {tuple(result.shape)} {result.flatten()[:4].tolist()}"
    if isinstance(result, tuple):
        return "(" + ", ".join(describe(r) for r in result) + ")"
    return repr(result)


# ------------------------------------------------- cases that check the checker
# (the verdict each must get, the case); the case lists add them under their ids.
def _raise(exc: BaseException):
    raise exc


def _selftest(name: str, call: Callable[[str], Any], **kwargs) -> Case:
    return Case("selftest", "harness", name, call, **kwargs)


SELFTEST_CASES: list[tuple[str, Case]] = [
    ("crash", _selftest("sigsegv", lambda d: os.kill(os.getpid(), signal.SIGSEGV), names=("x",))),
    ("crash", _selftest("abort", lambda d: os.abort(), names=("x",))),
    ("timeout", _selftest("hang", lambda d: signal.pause(), names=("x",))),
    ("died", _selftest("exit", lambda d: os._exit(3), names=("x",))),
    ("accepted", _selftest("accepted", lambda d: None, names=("x",))),
    ("wrong-error", _selftest("zero_division", lambda d: 1 // 0, names=("x",))),
    ("unnamed", _selftest("unnamed", lambda d: _raise(ValueError("selftest: y is bad")),
                          names=("x",))),
    ("rejected-valid", _selftest("rejected_valid", lambda d: _raise(ValueError("x")),
                                 check=lambda result: None)),
    ("wrong-result", _selftest("wrong_result", lambda d: torch.ones(2), names=("x",),
                               equal_to=lambda d: torch.zeros(2))),
    ("ok", _selftest("named", lambda d: _raise(RuntimeError("selftest: x must be 0")),
                     names=("x",))),
]


# ---------------------------------------------------------------- judging one case
def names_argument(message: str, names: Iterable[str]) -> bool:
    """Whether ``message`` mentions one of ``names`` (or an alias) as a whole word."""
    words = [alias for name in names for alias in ARGUMENT_ALIASES.get(name, (name,))]
    return any(re.search(rf"\b{re.escape(word)}\b", message) for word in words)


def _message(exc: BaseException) -> str:
    # torch appends the C++ location ("Exception raised from ..."), which is not the message.
    return str(exc).split("\nException raised from")[0].strip()


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= DETAIL_CHARS else text[:DETAIL_CHARS] + " ..."


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def judge(case: Case, device: str,
          smoke_call: Callable[[str], Any] | None = None) -> dict[str, str]:
    """Runs ``case`` on ``device`` in this process: {"verdict": ..., "detail": ...}. On CUDA,
    ``smoke_call(device)`` (a small valid call of the case's op) then shows whether the device
    still works."""
    torch.manual_seed(0)
    try:
        result = case.call(device)
        _synchronize(device)
    except Exception as exc:  # noqa: BLE001 - every exception is judged
        detail = f"{type(exc).__name__}: {_message(exc)}"
        if case.check is not None:
            verdict = "rejected-valid"
        elif not isinstance(exc, ALLOWED_ERRORS):
            verdict = "wrong-error"
        elif not names_argument(_message(exc), case.names):
            verdict = "unnamed"
            detail += f" [should name: {' or '.join(case.names)}]"
        else:
            verdict = "ok"
    else:
        verdict, detail = "ok", "returned"
        try:
            if case.equal_to is not None:
                torch.manual_seed(0)
                assert_same(result, case.equal_to(device))
                detail = "returned the contiguous input's result"
            elif case.check is not None:
                case.check(result)
                detail = "valid input: result checked"
            else:
                verdict, detail = "accepted", f"no exception (returned {describe(result)})"
        except Exception as exc:  # noqa: BLE001
            verdict, detail = "wrong-result", f"{type(exc).__name__}: {exc}"
    if device == "cuda" and smoke_call is not None:
        try:
            smoke_call(device)
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001
            verdict = "cuda-unusable"
            detail += f"; then a valid call failed: {type(exc).__name__}: {_message(exc)}"
    return {"verdict": verdict, "detail": _short(detail)}


# ---------------------------------------------------------------- the forking server
def _start_child(judge_case: JudgeCase, case_id: str, device: str,
                 timeout_s: int) -> tuple[int, int, Any]:
    """Forks a child that judges one case and writes its verdict to a pipe: (pid, read fd,
    stderr file)."""
    read_fd, write_fd = os.pipe()
    stderr_file = tempfile.TemporaryFile()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child: never returns
        code = 1
        try:
            os.close(read_fd)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.dup2(stderr_file.fileno(), 1)  # stdout carries the server's answers
            os.dup2(stderr_file.fileno(), 2)
            faulthandler.enable()  # a fatal signal prints the Python stack, then kills
            signal.alarm(timeout_s)  # default action of SIGALRM: terminate
            verdict = judge_case(case_id, device)
            os.write(write_fd, json.dumps(verdict).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    return pid, read_fd, stderr_file


def _finish_child(status: int, read_fd: int, stderr_file) -> dict[str, str]:
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    stderr_file.seek(0)
    stderr = stderr_file.read().decode(errors="replace")
    stderr_file.close()
    if os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status))
        verdict = "timeout" if sig == signal.SIGALRM else "crash"
        return {"verdict": verdict, "detail": _short(f"killed by {sig.name}; stderr: {stderr}")}
    if not chunks or os.WEXITSTATUS(status) != 0:
        return {"verdict": "died", "detail": _short(
            f"exit status {os.WEXITSTATUS(status)} without a verdict; stderr: {stderr}")}
    return json.loads(b"".join(chunks))


def run_isolated(judge_case: JudgeCase, requests: list[tuple[str, str]], jobs: int,
                 timeout_s: int) -> Iterable[dict[str, str]]:
    """Judges each (case id, device) in a forked child, ``jobs`` at a time; yields verdicts
    with "case" and "device" as the children finish."""
    # A CUDA context does not survive fork: only the children may create one.
    if torch.cuda.is_initialized():
        raise RuntimeError("run_isolated: CUDA is initialized in this process; the children "
                           "could not use it")
    pending = list(reversed(requests))
    running: dict[int, tuple[str, str, int, Any]] = {}
    while pending or running:
        while pending and len(running) < max(1, jobs):
            case_id, device = pending.pop()
            pid, read_fd, stderr_file = _start_child(judge_case, case_id, device, timeout_s)
            running[pid] = (case_id, device, read_fd, stderr_file)
        pid, status = os.wait()
        if pid not in running:
            continue
        case_id, device, read_fd, stderr_file = running.pop(pid)
        yield {"case": case_id, "device": device, **_finish_child(status, read_fd, stderr_file)}


def serve(judge_case: JudgeCase) -> None:
    """Answers requests on stdin (one JSON object a line, {"cases": [[id, device], ...],
    "jobs": N, "timeout_s": T}) with one JSON verdict a line per case, then {"done": true},
    until stdin closes. Torch and the ops are imported once; CUDA is never initialized here,
    only in the children."""
    for line in sys.stdin:
        request = json.loads(line)
        for verdict in run_isolated(judge_case, [tuple(r) for r in request["cases"]],
                                    request.get("jobs", 1),
                                    request.get("timeout_s", DEFAULT_TIMEOUT_S)):
            print(json.dumps(verdict), flush=True)
        print(json.dumps({"done": True}), flush=True)


class CaseServer:
    """Client of a ``script --serve`` process (a script whose ``--serve`` calls
    :func:`serve`) run with this interpreter and the lambdapo_ext that this process
    imported."""

    def __init__(self, script: str) -> None:
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(lambdapo_ext.__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH"))
                                            if p)
        self._process = subprocess.Popen(
            [sys.executable, os.path.abspath(script), "--serve"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env=env, text=True)

    def run(self, requests: list[tuple[str, str]], *, jobs: int = 1,
            timeout_s: int = DEFAULT_TIMEOUT_S) -> Iterable[dict[str, str]]:
        """Verdicts of the (case id, device) requests, as they finish."""
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write(json.dumps({"cases": requests, "jobs": jobs,
                                              "timeout_s": timeout_s}) + "\n")
        self._process.stdin.flush()
        while True:
            line = self._process.stdout.readline()
            if not line:
                raise RuntimeError(f"the bad-input case server exited "
                                   f"(status {self._process.wait()})")
            answer = json.loads(line)
            if answer.get("done"):
                return
            yield answer

    def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        self._process.wait(timeout=30)

    def __enter__(self) -> "CaseServer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
