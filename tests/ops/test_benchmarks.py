"""The benchmark suite's own layer (benchmarks/harness.py, benchmarks/conftest.py): every op
has its cases and peers, ratios and targets come out right, and one tiny case goes
through pytest-benchmark into its JSON and the JSONL rows. The benchmarks themselves run
with ``pytest benchmarks/ --benchmark-only``, not here."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is in the [bench] extra")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import harness  # noqa: E402

# Implementations each op must list on both devices (peers included: a missing one is a
# skip with its reason, never absent).
EXPECTED = {
    "bench_lambda_advantages": {"lambdapo", "torch_eager", "torch_compile"},
    "bench_token_logprobs": {"lambdapo", "torch_eager", "torch_compile", "flash_attn_triton",
                             "liger_kernel"},
    "bench_linear_token_logprobs": {"lambdapo", "torch_eager", "torch_compile", "bare_matmuls",
                                    "cut_cross_entropy", "liger_fused_linear"},
    "bench_policy_loss": {"lambdapo", "lambdapo_unfused", "torch_eager", "bare_matmuls",
                          "liger_grpo", "liger_flce"},
    "bench_semantic_density": {"lambdapo", "torch_reference", "rouge_score", "rouge_score_rs"},
    "bench_rollout": {"transformers", "vllm", "vllm_sync_weights"},
    "bench_train_step": {"lambdapo", "trl"},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("size", harness.SIZES)
def test_every_op_has_its_cases(name, size):
    module = importlib.import_module(name)
    options = harness.BenchOptions(size=size)
    for device in ("cpu", "cuda"):
        cases = module.cases(options, device)
        assert {c.impl for c in cases} >= EXPECTED[name], device
        keys = [(c.device, c.size, c.impl) for c in cases]
        assert len(keys) == len(set(keys))
        assert all(c.op == module.OP and c.device == device for c in cases)
        for c in cases:
            bases = harness.ratio_bases(module, device)
            assert bases and all(isinstance(b, str) for b in bases)
            marks = c.param().marks
            timer = next(m.kwargs.get("timer") for m in marks if m.name == "benchmark")
            assert (timer is harness.CUDA_EVENT_CLOCK) == (c.timing_device == "cuda")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_kernels_are_dispatcher_ops(name):
    """A CUDA case skips unless lambdapo::<op> has a CUDA kernel for each of its KERNELS:
    a name that is no registered op would skip it on every GPU."""
    from lambdapo_ext._loader import has_kernel

    module = importlib.import_module(name)
    kernels = {k for c in module.cases(harness.BenchOptions(), "cuda") for k in c.kernels}
    assert all(has_kernel(k, "CPU") for k in kernels), kernels


def test_full_sizes_are_the_recorded_ones():
    lambda_advantages = importlib.import_module("bench_lambda_advantages")
    sizes = {c.size for c in lambda_advantages.cases(harness.BenchOptions(size="full"), "cuda")}
    assert "P=512,G=4096" in sizes
    token_logprobs = importlib.import_module("bench_token_logprobs")
    sizes = {c.size for c in token_logprobs.cases(harness.BenchOptions(size="full"), "cuda")}
    assert "N=16384,V=151936,bfloat16,fwd+bwd" in sizes


def _row(impl, size, ms, mib=None):
    return harness.Result("op", impl, size, "cpu", median_ms=ms, peak_mib=mib)


def test_ratios_and_table():
    rows = [_row("lambdapo", "s", 2.0, 0.05), _row("torch_eager", "s", 10.0, 40.0),
            _row("torch_compile", "s", 4.0, 1.0),
            harness.Result("op", "peer", "s", "cpu", status="not run: CUDA only")]
    harness.add_ratios(rows, ("torch_eager", "torch_compile"))
    assert rows[0].extra["speedup_vs_torch_eager"] == 5.0
    assert rows[0].extra["mem_ratio_vs_torch_eager"] is None     # under the resolution
    assert rows[2].extra["mem_ratio_vs_torch_eager"] == 40.0
    assert rows[0].extra["speedup_vs_torch_compile"] == 2.0
    assert "speedup_vs_torch_eager" not in rows[1].extra
    env = {"device_name": "cpu", "torch": "2", "commit": "abc", "date": "today"}
    lines = harness.table_lines(rows, "torch_eager", env)
    assert lines[0].startswith("# cpu | torch 2 | commit abc")
    assert "5.00x" in lines[3] and "(~0 MiB)" in lines[3]
    assert lines[-1].rstrip().endswith("not run: CUDA only")


def test_targets():
    index = harness.by_impl_size([_row("lambdapo", "s", 2.0), _row("torch_compile", "s", 3.0)])
    ratio = harness.ratio(index, "s", "torch_compile", "lambdapo")
    assert ratio == 1.5
    assert harness.ratio(index, "s", "missing", "lambdapo") is None
    met = harness.Target("s", "vs compile", ratio, 1.5)
    missed = harness.Target("s", "time", 5.0, 4.0, at_least=False, unit=" ms")
    assert met.met and not missed.met
    assert met.line("op", "cpu") == "target op cpu s: vs compile: 1.500x (bound >= 1.5x) met"
    assert missed.line("op", "cuda").endswith("5.000 ms (bound <= 4 ms) MISSED")
    assert harness.Target("s", "x", None, 1.0).line("op", "cpu").endswith("not measured")
    assert harness.Target("s", "x", 0.8).met is None


def test_settings_and_scaled_clock():
    options = harness.BenchOptions(settings=(("kv_cache_gb", "2.5"), ("model", "qwen")))
    assert options.setting({"kv_cache_gb": 1.0}, "kv_cache_gb") == 2.5
    assert options.setting({"model": "builtin"}, "model") == "qwen"
    assert options.setting({"seed": 0}, "seed") == 0
    clock = harness.ScaledPerfCounter(64)
    a, b = clock(), clock()
    assert b >= a and clock.__name__ == "perf_counter_x64"


def test_one_case_through_pytest_benchmark(tmp_path):
    """A tiny case: pytest-benchmark's JSON carries the row, the ratio and the target in
    extra_info and lists what did not run; the JSONL row is appended; --benchmark-compare
    reads a saved run back."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), str(ROOT / "python"), os.environ.get("PYTHONPATH", "")])}
    report = tmp_path / "run.json"
    bench = ROOT / "benchmarks/bench_lambda_advantages.py"
    nodes = [f"{bench}::test_lambda_advantages[cpu-P=64,G=16-{impl}]"
             for impl in ("lambdapo", "torch_eager")]
    command = [sys.executable, "-m", "pytest", *nodes, "--benchmark-only",
               "-p", "no:cacheprovider", "-q", "--bench-size=small", "--benchmark-min-rounds=2",
               f"--benchmark-json={report}", f"--bench-results={tmp_path}",
               f"--benchmark-storage=file://{tmp_path / 'storage'}", "--benchmark-save=first"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "target lambda_advantages cpu P=64,G=16" in done.stdout
    data = json.loads(report.read_text())
    by_impl = {b["params"]["impl"]: b for b in data["benchmarks"]}
    assert set(by_impl) == {"lambdapo", "torch_eager"}
    ours = by_impl["lambdapo"]
    assert ours["group"] == "lambda_advantages cpu P=64,G=16"
    assert ours["stats"]["rounds"] == 2
    info = ours["extra_info"]
    assert info["op"] == "lambda_advantages" and info["device"] == "cpu"
    assert "threads" in info["device_name"] and info["peak_mib"] is not None
    assert info["speedup_vs_torch_eager"] > 0
    assert info["targets"][0]["label"] == "lambdapo vs torch.compile"   # compile deselected
    assert info["targets"][0]["value"] is None
    assert data["lambdapo_not_run"] == []
    rows = [json.loads(line) for line in (tmp_path / "lambda_advantages.jsonl").read_text()
            .splitlines()]
    assert {r["impl"] for r in rows} == {"lambdapo", "torch_eager"}
    assert all(r["median_ms"] > 0 and r["commit"] for r in rows)
    again = subprocess.run(command[:-3] + [f"--benchmark-storage=file://{tmp_path / 'storage'}",
                                           "--benchmark-compare"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "Comparing against benchmarks from" in again.stdout + again.stderr
    assert "(0001_first)" in again.stdout


def test_cuda_event_clock_reads_event_time(monkeypatch):
    """On a stand-in for torch.cuda.Event (no GPU here): a round's end minus start is the
    elapsed time between its two events, whatever came before."""
    device_ms = iter([0.0, 5000.0, 5002.5, 9000.0, 9000.25])

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            self.at = next(device_ms)

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return other.at - self.at

    monkeypatch.setattr(harness.torch.cuda, "Event", Event)
    clock = harness.CudaEventClock()
    readings = [clock() for _ in range(5)]
    assert readings[0] == 0.0
    assert readings[2] - readings[1] == pytest.approx(2.5e-3)
    assert readings[4] - readings[3] == pytest.approx(0.25e-3)
