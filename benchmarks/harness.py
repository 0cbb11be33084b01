"""What the benchmarks add to pytest-benchmark, and nothing it already does.

pytest-benchmark times every case (``benchmark.pedantic``), keeps the statistics, writes
``--benchmark-json`` / ``--benchmark-save`` and compares runs (``--benchmark-compare``).
This module adds what it lacks:

* :class:`Case`: one implementation of an op at one size on one device; its parameters
  ``device``, ``size`` and ``impl`` make ``--benchmark-group-by param:size`` (or the
  default group, "op device size") line the implementations of one size up;
* :class:`CudaEventClock`: a pytest-benchmark timer that reads CUDA events, so that a CUDA
  case reports the device time between two events around the call;
* :func:`peak_mib`: the peak memory one call needs beyond its inputs;
* :class:`Results`: a pytest plugin that keeps one row per case (measured, not run with
  its reason, or failed), prints a short progress line as each case starts and ends, adds
  the ratios against the op's baselines and the op's targets to ``extra_info``, prints the
  ratio tables (at most 120 columns) and the target lines last, and appends the rows to
  ``<dir>/<op>.jsonl``: by default the untracked ``benchmarks/out/`` (``--bench-results
  DIR``, ``none`` for nowhere), and to the tracked history ``benchmarks/results/`` only
  when asked (``--bench-record``);
* :func:`main`: the ``python benchmarks/bench_<op>.py`` command line, which runs the same
  cases through pytest.

A bench module defines ``OP``, ``RATIOS`` (the implementations the others are compared
with, first one in the table; or a dict device -> tuple), optionally ``SETTINGS``
(name -> default, set with ``--bench-set NAME=VALUE``), ``cases(options, device)``,
``targets(rows, device)`` and one test function taking ``case`` and ``measure``.

Peak memory is what a call allocates beyond what exists before it: torch.cuda's peak
allocation on CUDA; on the CPU the process's peak resident set (VmHWM, reset before the
call) over the resident set before it, with glibc's mmap threshold pinned so that freed
buffers go back to the system and every call starts from the same place.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import os
import platform
import re
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator

import pytest
import torch

# The tracked history: rows go there only when asked (--record, --bench-record);
# benchmarks/summarize.py --markdown makes benchmarks/RESULTS.md from it.
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Where a run's rows go by default: git-ignored, never committed.
OUT_DIR = Path(__file__).resolve().parent / "out"
TABLE_WIDTH = 120
SIZES = ("small", "full")
MIB = 2**20


# ------------------------------------------------------------------------------ rows
@dataclass
class Result:
    """One row of a run: a case's median time, peak extra memory and status."""
    op: str
    impl: str
    size: str
    device: str
    median_ms: float | None = None
    peak_mib: float | None = None
    status: str = "ok"
    extra: dict = field(default_factory=dict)
    device_name: str = ""


@dataclass
class Target:
    """A goal of an issue, checked on one row of this run (``bound`` None: a ratio that is
    reported but not judged)."""
    size: str
    label: str
    value: float | None
    bound: float | None = None
    at_least: bool = True       # met when value >= bound (else value <= bound)
    unit: str = "x"
    impl: str = "lambdapo"      # the row it is attached to

    @property
    def met(self) -> bool | None:
        if self.value is None or self.bound is None:
            return None
        return self.value >= self.bound if self.at_least else self.value <= self.bound

    def line(self, op: str | None = None, device: str | None = None) -> str:
        """``target <op> <device> <size>: <label>: <value> (bound ...) met|MISSED``; without
        ``op`` and ``device`` (under a heading that names them) ``target <size>: ...``."""
        where = " ".join(x for x in (op, device, short_size(self.size)) if x)
        head = f"target {where}: {self.label}"
        if self.value is None:
            return f"{head}: not measured"
        if self.bound is None:
            return f"{head}: {self.value:.3f}{self.unit}"
        sign = ">=" if self.at_least else "<="
        return (f"{head}: {self.value:.3f}{self.unit} (bound {sign} {self.bound:g}{self.unit}) "
                f"{'met' if self.met else 'MISSED'}")

    def as_dict(self) -> dict:
        return {"label": self.label, "value": self.value, "bound": self.bound,
                "at_least": self.at_least, "unit": self.unit, "met": self.met}


def ratio(rows: dict[tuple[str, str], Result], size: str, numerator: str,
          denominator: str) -> float | None:
    """median time of ``numerator`` / that of ``denominator`` at ``size``, or None when one
    of them has no time; ``rows`` maps (impl, size) to rows."""
    a, b = rows.get((numerator, size)), rows.get((denominator, size))
    if a is None or b is None or not a.median_ms or not b.median_ms:
        return None
    return a.median_ms / b.median_ms


def by_impl_size(rows: list[Result]) -> dict[tuple[str, str], Result]:
    return {(r.impl, r.size): r for r in rows}


def fastest_peer_and_copy_targets(rows: list[Result], device: str, peer_names: tuple[str, ...],
                                  copy_passes: float | None = None) -> list[Target]:
    """lambdapo against the fastest of ``peer_names`` that ran (>= 1x) at each size, and
    with ``copy_passes`` (the elementwise and row ops), on CUDA fwd+bwd against the "copy"
    row of its shape (>= 80% of its rate for the least traffic: ``copy_passes`` copies'
    worth)."""
    index = by_impl_size(rows)
    out = []
    for size in dict.fromkeys(r.size for r in rows if r.impl == "lambdapo"):
        measured = [p for p in peer_names if ratio(index, size, p, "lambdapo")]
        best = min(measured, key=lambda p: index[(p, size)].median_ms, default=peer_names[0])
        out.append(Target(size, f"lambdapo vs {best} (fastest peer)",
                          ratio(index, size, best, "lambdapo"), 1.0))
        copy = index.get(("copy", ",".join(size.split(",")[:3])))
        ours = index.get(("lambdapo", size))
        if copy_passes is not None and device == "cuda" and size.endswith("fwd+bwd"):
            share = (100 * copy_passes * copy.median_ms / ours.median_ms
                     if copy and ours and copy.median_ms and ours.median_ms else None)
            out.append(Target(size, "fwd+bwd share of the measured copy rate", share, 80.0,
                              unit="%"))
    return out


# ------------------------------------------------------------------------------ environment
def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``bfloat16``, as size labels spell dtypes."""
    return str(dtype).removeprefix("torch.")


def device_name(device: str) -> str:
    """The GPU's name, or the CPU model with torch's current thread count."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or "cpu"
    try:
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        model = match.group(1).strip() if match else model
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def environment(device: str) -> dict:
    """Date, device, torch and commit of a run (LAMBDAPO_COMMIT names the commit where the
    tree is a copy without git, as on a lent GPU machine)."""
    commit = os.environ.get("LAMBDAPO_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "describe", "--always", "--dirty"],
                                    capture_output=True, text=True, cwd=Path(__file__).parent,
                                    timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit = "unknown"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "commit": commit or "unknown",
    }


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch's CPU thread count set to ``count`` (None or 0: left as it is) inside."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------ memory
def _proc_status_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


_MALLOC_PINNED = False


def _pin_malloc_thresholds() -> None:
    global _MALLOC_PINNED
    if _MALLOC_PINNED:
        return
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 128 * 1024)
    libc.mallopt(m_trim_threshold, 128 * 1024)
    _MALLOC_PINNED = True


def peak_mib(fn: Callable[[], object], device: str) -> float:
    """Peak memory in MiB that one call of ``fn`` needs beyond what exists before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / MIB
    _pin_malloc_thresholds()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _proc_status_kib("VmRSS")
    fn()
    return max(0, _proc_status_kib("VmHWM") - before) / 1024


def available_bytes(device: str) -> int:
    """Free memory of ``device``: the GPU's, or the system's MemAvailable."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free
    match = re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text())
    return int(match.group(1)) * 1024


class InputSlot:
    """Holds the inputs (or engines) of one size at a time: the cases of a size run one
    after another, and a full-size GPU input (5 GiB of logits) must be freed before the
    next size's is made."""

    def __init__(self) -> None:
        self._key: object = None
        self._value: Any = None
        self._release: Callable[[Any], None] | None = None

    def get(self, key: object, build: Callable[[], Any],
            release: Callable[[Any], None] | None = None) -> Any:
        """The value built for ``key``, building it (after releasing the previous one)
        when the key changed."""
        if self._key != key or self._value is None:
            self.clear()
            self._value, self._key, self._release = build(), key, release
        return self._value

    def clear(self) -> None:
        value, release = self._value, self._release
        self._key = self._value = self._release = None
        if value is not None and release is not None:
            release(value)
        del value
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------ timers
class CudaEventClock:
    """A pytest-benchmark timer in seconds of GPU time. Every reading records a CUDA event
    on the current stream, waits for it and adds the time since the previous reading's
    event, so that end minus start of a round is the device time between two events
    around the call (what ``torch.cuda.Event`` timing measures), all the work it queued
    included. Each step is one float32 ``elapsed_time``, so precision does not decay over
    a long session."""

    __name__ = "cuda_event_clock"

    def __init__(self) -> None:
        self._last: torch.cuda.Event | None = None
        self._seconds = 0.0

    def __call__(self) -> float:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        event.synchronize()
        if self._last is not None:
            self._seconds += self._last.elapsed_time(event) / 1e3
        self._last = event
        return self._seconds


CUDA_EVENT_CLOCK = CudaEventClock()


class ScaledPerfCounter:
    """``time.perf_counter`` times ``factor``: a round that runs 1/factor of a batch reads
    as the whole batch (for a peer too slow to run a full batch per round)."""

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self.__name__ = f"perf_counter_x{factor:g}"

    def __call__(self) -> float:
        return time.perf_counter() * self.factor


# ------------------------------------------------------------------------------ cases
@dataclass(frozen=True)
class BenchOptions:
    """The session's benchmark options (benchmarks/conftest.py's ``--bench-*``)."""
    size: str = "small"
    devices: tuple[str, ...] = ("cpu", "cuda")
    threads: int | None = None        # torch CPU threads for every case (None: each case's)
    warmup: int | None = None         # untimed calls before timing (None: each case's)
    rounds: int = 5                   # timed rounds (--benchmark-min-rounds)
    settings: tuple[tuple[str, str], ...] = ()
    results_dir: Path | None = None   # append rows to <dir>/<op>.jsonl (None: nowhere)
    record: bool = False              # also append them to RESULTS_DIR (the tracked history)

    def sizes(self, presets: dict[str, dict[str, list]], device: str) -> list:
        """The sizes of ``presets[self.size][device]``."""
        return presets[self.size][device]

    def setting(self, defaults: dict[str, Any], name: str) -> Any:
        """``--bench-set name=VALUE`` converted to the type of ``defaults[name]``, or that
        default."""
        given = dict(self.settings)
        if name not in given:
            return defaults[name]
        kind = type(defaults[name])
        return given[name].lower() in ("1", "true", "yes") if kind is bool else kind(given[name])


@dataclass(frozen=True)
class Case:
    """One implementation of an op at one size, on one device.

    ``spec`` is what the bench module needs to build the inputs. ``bytes_moved`` and
    ``flops`` (per call) give a CUDA row its GB/s and roofline fraction, or TFLOP/s.
    ``time_scale`` > 1 marks a round that runs 1/time_scale of the batch."""
    op: str
    impl: str
    size: str
    device: str
    spec: tuple = ()
    runs_on: str = ""              # device of the timed call when not ``device``
    kernels: tuple[str, ...] = ()  # dispatcher ops (lambdapo::NAME) a CUDA case needs
    rounds: int | None = None      # fixed timed rounds (None: the session's)
    min_rounds: int = 1
    warmup: int = 1                # untimed calls first (compilation, lazy init)
    peak_memory: bool = True
    threads: int | None = None
    time_scale: float = 1.0
    bytes_moved: int | None = None
    flops: int | None = None

    @property
    def timing_device(self) -> str:
        return self.runs_on or self.device

    @property
    def group(self) -> str:
        return f"{self.op} {self.device} {self.size}"

    def param(self) -> Any:
        """The pytest parameter set (device, size, impl) of this case: its benchmark group,
        its timer, and on CUDA a skip when the GPU or a kernel is missing."""
        options: dict[str, Any] = {"group": self.group}
        if self.timing_device == "cuda":
            options["timer"] = CUDA_EVENT_CLOCK
        elif self.time_scale != 1:
            options["timer"] = ScaledPerfCounter(self.time_scale)
        marks = [pytest.mark.benchmark(**options)]
        if self.device == "cuda":
            reason = cuda_missing(self.kernels)
            if reason:
                marks.append(pytest.mark.skip(reason=reason))
        case_id = f"{self.device}-{self.size}-{self.impl}".replace(" ", "_")
        return pytest.param(self.device, self.size, self.impl, marks=marks, id=case_id)


def cuda_missing(kernels: tuple[str, ...]) -> str | None:
    """Why CUDA cases cannot run here (no GPU, or no CUDA kernel of one of ``kernels``),
    or None."""
    if not torch.cuda.is_available():
        return "no GPU visible to torch"
    from lambdapo_ext._loader import has_kernel

    missing = [op for op in kernels if not has_kernel(op, "CUDA")]
    if missing:
        return f"lambdapo_ext has no CUDA kernel of lambdapo::{', '.join(missing)}"
    return None


def calls(case: Case, options: BenchOptions) -> tuple[int, int]:
    """(untimed warm-up calls, timed rounds) of ``case`` in this session."""
    warmup = options.warmup if options.warmup is not None else case.warmup
    return warmup, case.rounds or max(options.rounds, case.min_rounds)


def measure(benchmark: Any, case: Case, fn: Callable[[], object],
            options: BenchOptions) -> Result:
    """Times ``fn`` with pytest-benchmark after ``case.warmup`` untimed calls and one call
    for the peak memory. Out of memory in an implementation other than lambdapo's is
    "not run" (a skip); in lambdapo's it fails the case."""
    device = case.timing_device
    threads = options.threads if options.threads is not None else case.threads
    warmup, rounds = calls(case, options)
    result = Result(case.op, case.impl, case.size, case.device)
    with torch_threads(threads):
        result.device_name = device_name(device)
        try:
            for _ in range(warmup):
                fn()
            if case.peak_memory:
                result.peak_mib = round(peak_mib(fn, device), 2)
            benchmark.pedantic(fn, rounds=rounds, warmup_rounds=0, iterations=1)
        except torch.OutOfMemoryError as exc:
            if case.impl.startswith("lambdapo"):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            pytest.skip(f"out of memory: {str(exc).splitlines()[0][:160]}")
    if benchmark.disabled:
        result.status = "not timed (--benchmark-disable)"
        return result
    median_s = benchmark.stats.stats.median
    result.median_ms = round(median_s * 1e3, 4)
    if device == "cuda" and case.bytes_moved:
        result.extra.update(bandwidth(case.bytes_moved, median_s))
    if device == "cuda" and case.flops:
        result.extra["TFLOP/s"] = round(case.flops / median_s / 1e12, 1)
    if threads:
        result.extra["threads"] = threads
    return result


# Peak HBM bandwidth by card name (bytes/s), for the roofline fraction.
HBM_BYTES_PER_S = {"H100 SXM": 3.35e12, "H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12,
                   "H200": 4.8e12, "A100-SXM4-80GB": 2.04e12, "A100-SXM4-40GB": 1.56e12}


def bandwidth(bytes_moved: int, seconds: float) -> dict:
    """Achieved GB/s and, for a known card, the fraction of its datasheet HBM peak."""
    achieved = bytes_moved / seconds
    out = {"GB/s": round(achieved / 1e9, 1)}
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in HBM_BYTES_PER_S.items() if k in name), None)
    if peak:
        out["roofline"] = round(achieved / peak, 3)
    return out


# ------------------------------------------------------------------------------ the plugin
class Results:
    """pytest plugin (registered by benchmarks/conftest.py) that keeps one row per case and
    reports them: a progress line as each case starts and ends, ratio tables and target
    lines in the terminal summary, ratios and targets in pytest-benchmark's JSON
    ``extra_info``, rows appended to ``<results_dir>/<op>.jsonl`` (and to the tracked
    history with ``record``)."""

    def __init__(self, options: BenchOptions) -> None:
        self.options = options
        self.modules: dict[str, ModuleType] = {}
        self._cases: dict[tuple[str, str, str, str], Case] = {}
        self._order: list[tuple[str, str, str, str]] = []
        self.rows: dict[tuple[str, str, str, str], Result] = {}
        self._nodeids: dict[str, tuple[str, str, str, str]] = {}
        self._targets: dict[tuple[str, str], list[Target]] = {}
        self._final = False
        # progress: the collected cases by node id (in run order), the start of the run
        # and of the current case
        self._items: dict[str, tuple[str, str, str, str]] = {}
        self._positions: dict[str, int] = {}
        self._reporter: Any = None
        self._run_start = self._case_start = time.perf_counter()
        self._outcome: dict[str, str] = {}

    # -- collection
    def add_cases(self, module: ModuleType) -> list:
        """Every case of ``module`` on the session's devices, as pytest parameter sets."""
        self.modules[module.OP] = module
        params = []
        for device in self.options.devices:
            for case in module.cases(self.options, device):
                key = (case.op, case.device, case.size, case.impl)
                if key in self._cases:
                    raise ValueError(f"two cases named {key}")
                self._cases[key] = case
                self._order.append(key)
                params.append(case.param())
        return params

    def case(self, op: str, device: str, size: str, impl: str) -> Case:
        return self._cases[(op, device, size, impl)]

    def check_settings(self) -> None:
        """Every ``--bench-set`` name is a setting of a collected bench module."""
        known = {name for m in self.modules.values() for name in getattr(m, "SETTINGS", {})}
        unknown = [name for name, _ in self.options.settings if name not in known]
        if unknown and self.modules:
            raise pytest.UsageError(f"--bench-set {', '.join(unknown)}: not a setting of the "
                                    f"collected benchmarks (they have {sorted(known)})")

    # -- results
    def record(self, nodeid: str, result: Result) -> None:
        key = (result.op, result.device, result.size, result.impl)
        self.rows[key] = result
        self._nodeids[nodeid] = key

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo) -> Any:
        report = yield
        key = self._key_of(item)
        if key is None:
            return report
        case = self._cases[key]
        if report.skipped and key not in self.rows:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(
                report.longrepr)
            self.record(item.nodeid, Result(
                case.op, case.impl, case.size, case.device,
                status=f"not run: {reason.removeprefix('Skipped: ')}"))
        elif report.failed and call.excinfo is not None:
            self.record(item.nodeid, Result(
                case.op, case.impl, case.size, case.device,
                status=f"failed: {call.excinfo.exconly().splitlines()[0][:160]}"))
        return report

    # -- progress
    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self._items = {item.nodeid: key for item in session.items
                       if (key := self._key_of(item)) is not None}
        self._positions = {nodeid: i for i, nodeid in enumerate(self._items, 1)}
        self._reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        self._run_start = time.perf_counter()

    @pytest.hookimpl(tryfirst=True)
    def pytest_report_teststatus(self, report: pytest.TestReport, config: pytest.Config
                                 ) -> tuple[str, str, str] | None:
        """No pass/skip letter for a case (its progress line says it); verbose words stay."""
        if report.nodeid not in self._items or config.get_verbosity() > 0:
            return None
        if report.when == "call" and report.passed:
            return "passed", "", "PASSED"
        if report.skipped:
            return "skipped", "", "SKIPPED"
        return None

    @pytest.hookimpl(trylast=True)   # after the reporter's own (the file name, once)
    def pytest_runtest_logstart(self, nodeid: str, location: tuple) -> None:
        if nodeid in self._items:
            self._case_start = time.perf_counter()
            self._outcome.pop(nodeid, None)
            if self._reporter is not None and self._reporter.verbosity <= 0:
                self._progress(nodeid, "...")   # (-v: pytest names the case itself)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.nodeid not in self._items:
            return
        if report.failed:
            self._outcome[report.nodeid] = f"FAILED ({report.when})"
        elif report.skipped and report.nodeid not in self._outcome:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else ""
            self._outcome[report.nodeid] = (
                "not run: " + str(reason).removeprefix("Skipped: ")).rstrip(": ")

    def pytest_runtest_logfinish(self, nodeid: str, location: tuple) -> None:
        if nodeid not in self._items:
            return
        row = self.rows.get(self._items[nodeid])
        outcome = self._outcome.get(nodeid)
        if outcome is None and row is not None:
            outcome = f"{_ms(row.median_ms)} ms" if row.median_ms is not None else row.status
        seconds = time.perf_counter() - self._case_start
        self._progress(nodeid, f"{outcome or 'done'}, {seconds:.1f} s")

    def _progress(self, nodeid: str, tail: str) -> None:
        """``[ 3/12 0:01:05] lambda_advantages cpu P=64,G=16 torch_compile: <tail>``"""
        if self._reporter is None:
            return
        op, device, size, impl = self._items[nodeid]
        index, total = self._positions[nodeid], len(self._items)
        elapsed = int(time.perf_counter() - self._run_start)
        clock = f"{elapsed // 3600}:{elapsed // 60 % 60:02d}:{elapsed % 60:02d}"
        line = (f"[{index:>{len(str(total))}}/{total} {clock}] {op} {device} "
                f"{short_size(size)} {impl}: {tail}")
        # On pytest's terminal writer, past the reporter's own bookkeeping, so that the
        # file name it prints once per file (at default verbosity) is not printed again.
        writer = getattr(self._reporter, "_tw", None)
        if writer is None:
            self._reporter.write_line(clip(line, TABLE_WIDTH))
            return
        if writer.width_of_current_line:
            writer.line()
        writer.line(clip(line, TABLE_WIDTH))
        writer.flush()

    def _key_of(self, item: pytest.Item) -> tuple[str, str, str, str] | None:
        callspec = getattr(item, "callspec", None)
        module = getattr(item, "module", None)
        if callspec is None or module is None or not hasattr(module, "OP"):
            return None
        params = callspec.params
        key = (module.OP, params.get("device"), params.get("size"), params.get("impl"))
        return key if key in self._cases else None

    def rows_of(self, op: str, device: str) -> list[Result]:
        """The rows of ``op`` on ``device`` in case order."""
        return [self.rows[k] for k in self._order
                if k[0] == op and k[1] == device and k in self.rows]

    def finalize(self) -> None:
        """Adds the ratios against each op's baselines to the rows and checks the targets
        (once)."""
        if self._final:
            return
        self._final = True
        for op, module in self.modules.items():
            for device in self.options.devices:
                rows = self.rows_of(op, device)
                if not any(r.median_ms for r in rows):
                    continue
                add_ratios(rows, ratio_bases(module, device))
                targets = module.targets(rows, device) if hasattr(module, "targets") else []
                self._targets[(op, device)] = targets
                index = by_impl_size(rows)
                for target in targets:
                    row = index.get((target.impl, target.size))
                    if row is not None:
                        row.extra.setdefault("targets", []).append(target.as_dict())

    # -- reporting
    @pytest.hookimpl(optionalhook=True)
    def pytest_benchmark_update_json(self, config: pytest.Config, benchmarks: list,
                                     output_json: dict) -> None:
        """extra_info of every benchmark: its row (op, impl, size, device, device name, peak
        memory, ratios, targets); the cases that did not run, with the reason."""
        self.finalize()
        for bench in output_json["benchmarks"]:
            key = self._nodeids.get(bench["fullname"])
            if key is not None:
                row = self.rows[key]
                bench["extra_info"].update(
                    op=row.op, impl=row.impl, size=row.size, device=row.device,
                    device_name=row.device_name, peak_mib=row.peak_mib, **row.extra)
        output_json["lambdapo_not_run"] = [
            {"op": r.op, "impl": r.impl, "size": r.size, "device": r.device, "status": r.status}
            for r in self.rows.values() if r.status not in ("ok", "not timed (--benchmark-disable)")]

    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        """After pytest-benchmark's tables: one ratio table per op and device, then every
        target line, then where the rows were appended."""
        self.finalize()
        write = terminalreporter.write_line
        lines: list[str] = []
        saved: dict[Path, None] = {}
        for op, module in self.modules.items():
            for device in self.options.devices:
                rows = self.rows_of(op, device)
                if not rows:
                    continue
                env = environment(device)   # one date for the run's rows everywhere
                if any(r.median_ms for r in rows):
                    terminalreporter.section(f"{op} on {device}", sep="-")
                    for line in table_lines(rows, ratio_bases(module, device)[0], env):
                        write(line)
                    targets = self._targets.get((op, device), [])
                    if targets:
                        lines += [f"targets of {op} on {device}:"] + [t.line() for t in targets]
                else:
                    reasons = sorted({r.status for r in rows})
                    write(clip(f"# {op} on {device}: nothing timed ({'; '.join(reasons)})",
                               TABLE_WIDTH))
                    if device == "cuda" and cuda_missing(getattr(module, "KERNELS", ())):
                        continue   # no GPU here: no rows worth keeping
                for folder in destinations(self.options):
                    saved[append_results(folder, op, rows, env)] = None
        if lines:
            terminalreporter.section("targets", sep="-")
            for line in lines:
                write(clip(line, TABLE_WIDTH))
        if not destinations(self.options):
            write("rows not saved (--no-save / --bench-results none)")
        for line in saved_lines(list(saved)):
            write(line)


def destinations(options: BenchOptions) -> list[Path]:
    """The folders a session's rows are appended to: ``results_dir`` (the untracked
    benchmarks/out/ unless told otherwise) and, when recording, the tracked history."""
    out = [options.results_dir] if options.results_dir is not None else []
    if options.record and not any(same_path(d, RESULTS_DIR) for d in out):
        out.append(RESULTS_DIR)
    return out


def same_path(a: Path, b: Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def saved_lines(paths: list[Path]) -> list[str]:
    """What the end of a run says about where its rows went."""
    if not paths:
        return []
    lines = []
    for path in paths:
        shown = _relative(path)
        if same_path(path.parent, RESULTS_DIR):
            lines.append(f"recorded in {shown} (tracked history; then regenerate RESULTS.md: "
                         "python benchmarks/summarize.py --markdown --write)")
        else:
            lines.append(f"rows appended to {shown}")
    if not any(same_path(p.parent, RESULTS_DIR) for p in paths):
        lines.append("(not in the tracked history benchmarks/results/: --record, or "
                     "--bench-record under pytest, adds them there)")
    return lines


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def ratio_bases(module: ModuleType, device: str) -> tuple[str, ...]:
    """The implementations the others of ``module`` are compared with on ``device``."""
    bases = module.RATIOS
    return bases[device] if isinstance(bases, dict) else bases


def add_ratios(rows: list[Result], bases: tuple[str, ...]) -> None:
    """``speedup_vs_<base>`` (the base's time / the row's) and ``mem_ratio_vs_<base>``
    (peak memory, the same way; None under the 0.1 MiB resolution) into each row's extra."""
    index = by_impl_size(rows)
    for base in bases:
        for r in rows:
            b = index.get((base, r.size))
            if b is None or b is r or not r.median_ms or not b.median_ms:
                continue
            r.extra[f"speedup_vs_{base}"] = _significant(b.median_ms / r.median_ms)
            if b.peak_mib and r.peak_mib is not None:
                r.extra[f"mem_ratio_vs_{base}"] = (
                    _significant(b.peak_mib / r.peak_mib) if r.peak_mib >= 0.1 else None)


def _significant(value: float) -> float:
    return float(f"{value:.4g}")


# Short names of the extras a table shows in its notes column (others: the JSON rows).
NOTE_KEYS = {"GB/s": "GB/s", "roofline": "roof", "TFLOP/s": "TFLOP/s",
             "over_grads_MiB": "over_grads_MiB", "tokens_per_s": "tok/s",
             "threads": "thr", "tokenize_ms": "tokenize_ms", "push_ms": "push_ms",
             "start_s": "start_s", "middle_s": "middle_s", "scaled_from_pairs": "scaled"}
SHORT_IMPLS = {"torch_eager": "eager", "torch_compile": "compile",
               "torch_reference": "reference"}
SHORT_DTYPES = (("bfloat16", "bf16"), ("float32", "fp32"), ("float16", "fp16"))


def short_size(size: str) -> str:
    """A size label with its dtype abbreviated (``bfloat16`` -> ``bf16``)."""
    for long, short in SHORT_DTYPES:
        size = size.replace(long, short)
    return size


def clip(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, the cut marked with "~"."""
    return text if len(text) <= width else text[:width - 1] + "~"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return (f"{value:.0f}" if value >= 1000 else f"{value:.1f}" if value >= 100
            else f"{value:.3f}" if value >= 1 else f"{value:.4f}")


def table_lines(rows: list[Result], baseline: str, env: dict,
                width: int = TABLE_WIDTH) -> list[str]:
    """A heading from ``env`` (:func:`environment`), then one line per row, at most
    ``width`` characters: size, implementation, median ms, peak extra MiB, ``baseline``'s
    time and peak memory over the row's (> 1: faster / leaner), and a notes column (the
    status of a case that did not run, else a few extras). Everything else is in the
    JSON rows."""
    device = rows[0].device_name or env["device_name"] if rows else env["device_name"]
    # Peers that cannot run on this device at all: one line under the table, not a row each.
    elsewhere: dict[str, list[str]] = {}
    for r in rows:
        if re.fullmatch(r"not run: \w+ only", r.status):
            elsewhere.setdefault(r.status.removeprefix("not run: "), []).append(r.impl)
    rows = [r for r in rows if not re.fullmatch(r"not run: \w+ only", r.status)]
    footer = [clip(f"not run ({where}): {', '.join(dict.fromkeys(impls))}", width)
              for where, impls in elsewhere.items()]
    base = SHORT_IMPLS.get(baseline, baseline)
    size_w = min(36, max([4] + [len(short_size(r.size)) for r in rows]))
    impl_w = min(18, max([4] + [len(r.impl) for r in rows]))
    speed_w = max(7, len(base) + 3)
    header = (f"{'size':<{size_w}} {'impl':<{impl_w}} {'ms':>10} {'peak MiB':>8} "
              f"{'vs ' + base:>{speed_w}} {'mem vs':>6}  notes")
    rule = "-" * min(width, len(header) + 20)
    lines = [clip(f"# {device} | torch {env['torch']} | commit {env['commit']} | {env['date']}",
                  width), header, rule]
    for r in rows:
        speed = r.extra.get(f"speedup_vs_{baseline}")
        mem_key = f"mem_ratio_vs_{baseline}"
        mem = "" if mem_key not in r.extra else (
            "(~0)" if r.extra[mem_key] is None else f"{r.extra[mem_key]:.2f}x")
        m = f"{r.peak_mib:.1f}" if r.peak_mib is not None else "-"
        if r.status != "ok":
            notes = r.status
        else:
            notes = " ".join(f"{NOTE_KEYS[k]}={v}" for k, v in r.extra.items()
                             if k in NOTE_KEYS and not isinstance(v, (list, dict)))
        speed_s = f"{speed:.2f}x" if speed else ""
        line = f"{clip(short_size(r.size), size_w):<{size_w}} {clip(r.impl, impl_w):<{impl_w}} "
        if r.median_ms is None and r.peak_mib is None:   # not run: the reason has the room
            line += f"   {notes}"
        else:
            line += f"{_ms(r.median_ms):>10} {m:>8} {speed_s:>{speed_w}} {mem:>6}  {notes}"
        lines.append(clip(line.rstrip(), width))
    return lines + [rule, clip(f"vs {base}, mem vs: {baseline}'s median time and peak memory "
                               "over the row's (> 1: faster, leaner)", width)] + footer


def append_results(folder: Path, op: str, rows: list[Result], env: dict) -> Path:
    """Appends one JSON line per row, with ``env`` (:func:`environment`: date, device name,
    torch, commit), to ``folder/<op>.jsonl``."""
    records = []
    for r in rows:
        row = asdict(r)
        row["device_name"] = row["device_name"] or env["device_name"]
        records.append({**env, **row})
    return append_rows(folder, op, records)


def append_rows(folder: Path, op: str, records: list[dict]) -> Path:
    """Appends ``records`` as JSON lines to ``folder/<op>.jsonl``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{op}.jsonl"
    with path.open("a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


# ------------------------------------------------------------------------------ command line
def main(bench_file: str, description: str, *, settings: dict[str, Any] | None = None,
         default_device: str = "all") -> int:
    """``python benchmarks/bench_<op>.py``: runs the file's cases through pytest
    (``--benchmark-only``), with a progress line per case, and prints the ratio table and
    the targets.

    --device cpu|cuda|all, --quick (the small sizes), --repeats N (timed rounds), one flag
    per entry of ``settings``; the rows go to benchmarks/out/<op>.jsonl (untracked), or to
    ``--out DIR``, or nowhere (``--no-save``), and with ``--record`` also to the tracked
    history benchmarks/results/<op>.jsonl. Any other argument goes to pytest
    (``--benchmark-json out.json``, ``-k lambdapo``...).
    """
    parser = argparse.ArgumentParser(description=description.strip().splitlines()[0],
                                     epilog="Other arguments are passed to pytest.")
    parser.add_argument("--device", default=default_device, choices=["cpu", "cuda", "all"])
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per case")
    add_save_arguments(parser)
    for name, default in (settings or {}).items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=type(default),
                            default=default, help=f"(default {default})")
    args, pytest_args = parser.parse_known_args()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU is visible to torch")
    if device == "all" and not torch.cuda.is_available():
        device = "cpu"
    # -q: the progress lines replace pytest's per-test lines; --benchmark-quiet: the ratio
    # table replaces pytest-benchmark's (every round is in --benchmark-json).
    argv = [str(Path(bench_file).resolve()), "--benchmark-only", "--benchmark-quiet",
            "-p", "no:cacheprovider", "-q", "-rfE", "-o", "console_output_style=classic",
            "--disable-warnings",
            f"--bench-device={device}", f"--bench-size={'small' if args.quick else 'full'}",
            f"--benchmark-min-rounds={args.repeats}"]
    argv += [f"--bench-set={name}={getattr(args, name)}" for name in settings or {}]
    argv += save_options(args)
    return int(pytest.main(argv + pytest_args))


def add_save_arguments(parser: argparse.ArgumentParser) -> None:
    """The scripts' flags for where rows go: --record, --out DIR, --no-save."""
    saving = parser.add_mutually_exclusive_group()
    saving.add_argument("--record", action="store_true",
                        help="also append the rows to the tracked history "
                             "benchmarks/results/<op>.jsonl (RESULTS.md is made from it)")
    saving.add_argument("--no-save", action="store_true", help="write no rows anywhere")
    parser.add_argument("--out", type=Path, default=OUT_DIR, metavar="DIR",
                        help="append the rows to DIR/<op>.jsonl (default: benchmarks/out, "
                             "git-ignored)")


def save_options(args: argparse.Namespace) -> list[str]:
    """The conftest options (--bench-results, --bench-record) for the parsed save flags."""
    out = [f"--bench-results={'none' if args.no_save else args.out}"]
    return out + (["--bench-record"] if args.record else [])
