"""pytest-benchmark suite of every op: ``pytest benchmarks/ --benchmark-only``.

Each ``bench_<op>.py`` is collected (they are not named ``test_*``), and each of its cases
becomes one benchmark ``test_<op>[<device>-<size>-<impl>]`` with the parameters
``device``, ``size`` and ``impl`` (``--benchmark-group-by param:size`` etc.); the default
group is "<op> <device> <size>", so that pytest-benchmark's table sets the implementations
of one size side by side. Options (all also settable as LAMBDAPO_BENCH_<NAME>):

  --bench-size small|full   small (default): quick sizes; full: the sizes of the issues
                            and RESULTS.md
  --bench-device cpu|cuda|all   (default all; CUDA cases skip without a GPU or kernel)
  --bench-threads N         torch CPU threads for every case (default: each case's)
  --bench-warmup N          untimed calls before timing (default: each case's, mostly 1)
  --bench-set NAME=VALUE    a bench module's setting (bench_rollout: kv_cache_gb, ...)
  --bench-results DIR|none  append the rows to DIR/<op>.jsonl (default benchmarks/out,
                            git-ignored; none: nowhere)
  --bench-record            also append them to the tracked history
                            benchmarks/results/<op>.jsonl, which RESULTS.md is made from

Each case prints a line as it starts and as it ends (case, impl, result, seconds).

The timed rounds per case are pytest-benchmark's ``--benchmark-min-rounds`` (default 5).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

RESULTS = pytest.StashKey[harness.Results]()


def _env(name: str, default: str | None) -> str | None:
    return os.environ.get(f"LAMBDAPO_BENCH_{name}", default)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lambdapo benchmarks")
    group.addoption("--bench-size", choices=harness.SIZES, default=_env("SIZE", "small"),
                    help="small (quick, default) or full (the sizes of the issues)")
    group.addoption("--bench-device", choices=("cpu", "cuda", "all"),
                    default=_env("DEVICE", "all"), help="devices whose cases run")
    group.addoption("--bench-threads", type=int, default=_env("THREADS", None),
                    help="torch CPU threads for every case (0: torch's default)")
    group.addoption("--bench-warmup", type=int, default=_env("WARMUP", None),
                    help="untimed calls of each case before timing")
    group.addoption("--bench-set", action="append", default=[], metavar="NAME=VALUE",
                    help="a setting of a bench module (repeatable)")
    group.addoption("--bench-results", default=_env("RESULTS", str(harness.OUT_DIR)),
                    metavar="DIR", help="append one JSON line per case to DIR/<op>.jsonl "
                    "(default benchmarks/out, git-ignored; none: nowhere)")
    group.addoption("--bench-record", action="store_true",
                    default=_env("RECORD", "") not in ("", "0"),
                    help="also append the rows to the tracked history benchmarks/results/")


@pytest.hookimpl(trylast=True)   # after pytest-benchmark's, whose table it narrows
def pytest_configure(config: pytest.Config) -> None:
    try:
        import pytest_benchmark  # noqa: F401
    except ImportError:
        raise pytest.UsageError("the benchmarks need pytest-benchmark: "
                                "pip install -e '.[bench]' --no-build-isolation") from None
    settings = []
    for item in config.getoption("bench_set"):
        name, sep, value = item.partition("=")
        if not sep:
            raise pytest.UsageError(f"--bench-set {item!r}: expected NAME=VALUE")
        settings.append((name, value))
    device = config.getoption("bench_device")
    threads, warmup = config.getoption("bench_threads"), config.getoption("bench_warmup")
    options = harness.BenchOptions(
        size=config.getoption("bench_size"),
        devices=("cpu", "cuda") if device == "all" else (device,),
        threads=None if threads is None else int(threads),
        warmup=None if warmup is None else int(warmup),
        rounds=config.getoption("benchmark_min_rounds"),
        settings=tuple(settings),
        results_dir=_folder(config.getoption("bench_results")),
        record=config.getoption("bench_record"))
    results = harness.Results(options)
    config.stash[RESULTS] = results
    config.pluginmanager.register(results, "lambdapo-bench-results")
    _narrow_benchmark_table(config)


def _narrow_benchmark_table(config: pytest.Config) -> None:
    """pytest-benchmark's own table in about 120 columns unless told otherwise: the columns
    min, median, IQR and rounds (--benchmark-columns), and, as its default groups name the
    op, device and size already, each row named by its implementation (--benchmark-name)."""
    session = getattr(config, "_benchmarksession", None)
    if session is None:
        return
    if config.getoption("benchmark_columns") is None:
        session.columns = ["min", "median", "iqr", "rounds"]
    given = {arg.split("=")[0] for arg in config.invocation_params.args}
    if "--benchmark-name" not in given and config.getoption("benchmark_group_by") == "group":
        named = session.name_format

        def impl_name(bench: dict) -> str:
            impl = (bench.get("params") or {}).get("impl")
            return named({**bench, "name": impl} if impl and bench.get("name") else bench)
        session.name_format = impl_name


def _folder(value: str | None) -> Path | None:
    return None if value is None or value.lower() in ("", "none") else Path(value)


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    # bench_<op>.py are the suite's test modules; a file named on the command line is
    # collected by pytest itself already.
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" in metafunc.fixturenames:
        params = metafunc.config.stash[RESULTS].add_cases(metafunc.module)
        metafunc.parametrize("device,size,impl", params)


def pytest_collection_finish(session: pytest.Session) -> None:
    session.config.stash[RESULTS].check_settings()


@pytest.fixture
def case(request: pytest.FixtureRequest, device: str, size: str, impl: str) -> harness.Case:
    """The case this benchmark runs."""
    return request.config.stash[RESULTS].case(request.module.OP, device, size, impl)


@pytest.fixture
def options(request: pytest.FixtureRequest) -> harness.BenchOptions:
    """The session's ``--bench-*`` options."""
    return request.config.stash[RESULTS].options


@pytest.fixture
def measure(request: pytest.FixtureRequest, benchmark, case: harness.Case):
    """``measure(fn)`` times ``fn`` for this case through pytest-benchmark (warm-up, peak
    memory, the session's rounds), records its row and returns it (a harness.Result whose
    ``extra`` the test may add to)."""
    results = request.config.stash[RESULTS]

    def run(fn) -> harness.Result:
        result = harness.measure(benchmark, case, fn, results.options)
        results.record(request.node.nodeid, result)
        return result
    return run
