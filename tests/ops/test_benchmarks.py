"""The benchmark suite's own layer (benchmarks/harness.py, benchmarks/conftest.py): every op
has its cases and peers, ratios and targets come out right, and one tiny case goes
through pytest-benchmark into its JSON and the JSONL rows. The benchmarks themselves run
with ``pytest benchmarks/ --benchmark-only``, not here."""

from __future__ import annotations

import importlib
import hashlib
import json
import os
import re
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
    assert lines[0] == "# cpu | torch 2 | commit abc | today"
    assert "5.00x" in lines[3] and "(~0)" in lines[3]
    assert lines[-2].startswith("vs eager, mem vs: torch_eager's median time and peak memory")
    assert lines[-1] == "not run (CUDA only): peer"      # one line, not a row per case
    assert len(lines) == 3 + 3 + 3


def test_tables_fit_120_columns():
    """The longest sizes, names, extras and statuses of the benches still fit: the rest is
    in the JSON rows."""
    size = "N=16384,H=4096,V=151936,bfloat16,fwd+bwd"
    rows = [harness.Result("linear_token_logprobs", "lambdapo", size, "cuda", 131.88, 6924.0,
                           extra={"TFLOP/s": 463.9, "over_grads_MiB": 1317.2,
                                  "speedup_vs_torch_eager": 1.08, "mem_ratio_vs_torch_eager": 4.1,
                                  "per_step": [1, 2], "targets": [{"label": "x"}]},
                           device_name="NVIDIA H100 80GB HBM3"),
            harness.Result("linear_token_logprobs", "liger_fused_linear", size, "cuda",
                           status="not run: liger-kernel not importable (No module named "
                                  "'liger_kernel'); pip install liger-kernel to compare")]
    harness.add_ratios(rows, ("torch_eager",))
    env = {"device_name": "x" * 200, "torch": "2.11.0+cu130", "commit": "e023b5d-dirty",
           "date": "2026-11-27T08:38:17Z"}
    lines = harness.table_lines(rows, "torch_eager", env)
    assert max(len(line) for line in lines) <= 120, lines
    assert "N=16384,H=4096,V=151936,bf16,fwd+bwd" in lines[3] and "TFLOP/s=463.9" in lines[3]
    assert "per_step" not in lines[3] and "liger-kernel not importable" in lines[4]
    target = harness.Target(size, "peak extra - gradients", 1317.2, 512, at_least=False,
                            unit=" MiB")
    assert len(target.line()) <= 120      # under "targets of linear_token_logprobs on cuda:"
    assert target.line().startswith("target N=16384,H=4096,V=151936,bf16,fwd+bwd: peak extra")


def test_rows_go_to_the_untracked_folder_unless_recorded(tmp_path):
    """Rows are appended to benchmarks/out/ (git-ignored) by default, to the tracked history
    benchmarks/results/ only when recorded, nowhere with --no-save."""
    assert harness.OUT_DIR != harness.RESULTS_DIR
    git = subprocess.run(["git", "check-ignore", "-q", str(harness.OUT_DIR / "x.jsonl")],
                         cwd=ROOT, capture_output=True)
    if git.returncode != 128:   # 128: not a git checkout
        assert git.returncode == 0, "benchmarks/out/ must be git-ignored"
    out = harness.OUT_DIR
    assert harness.destinations(harness.BenchOptions(results_dir=out)) == [out]
    assert harness.destinations(harness.BenchOptions(results_dir=out, record=True)) == [
        out, harness.RESULTS_DIR]
    assert harness.destinations(harness.BenchOptions(results_dir=harness.RESULTS_DIR,
                                                     record=True)) == [harness.RESULTS_DIR]
    assert harness.destinations(harness.BenchOptions()) == []
    parser = harness.argparse.ArgumentParser()
    harness.add_save_arguments(parser)
    assert harness.save_options(parser.parse_args([])) == [f"--bench-results={out}"]
    assert harness.save_options(parser.parse_args(["--record"]))[-1] == "--bench-record"
    assert harness.save_options(parser.parse_args(["--no-save"])) == ["--bench-results=none"]
    assert harness.save_options(parser.parse_args(["--out", str(tmp_path)])) == [
        f"--bench-results={tmp_path}"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--record", "--no-save"])


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
    assert "targets of lambda_advantages on cpu:\ntarget P=64,G=16: " in done.stdout
    # a progress line as each case starts and ends
    assert re.search(r"\[1/2 0:00:\d\d\] lambda_advantages cpu P=64,G=16 lambdapo: \.\.\.",
                     done.stdout), done.stdout
    assert re.search(r"\[2/2 0:\d\d:\d\d\] lambda_advantages cpu P=64,G=16 torch_eager: "
                     r"[\d.]+ ms, [\d.]+ s", done.stdout), done.stdout
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


def _tracked_state() -> tuple[str, dict[str, str]]:
    """git's view of the checkout (changes and untracked files that are not ignored) and the
    hash of every file of the history benchmarks/results/."""
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"],
                            cwd=ROOT, capture_output=True, text=True)
    history = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
               for p in sorted(harness.RESULTS_DIR.glob("*"))}
    return (status.stdout if status.returncode == 0 else ""), history


def test_default_run_writes_nothing_tracked():
    """``python benchmarks/bench_<op>.py`` with no saving flag leaves the checkout as git
    sees it and the history as it was, appends its rows to benchmarks/out/ and says so
    (that file is put back as it was afterwards)."""
    out = harness.OUT_DIR / "lambda_advantages.jsonl"
    existed, size = out.exists(), out.stat().st_size if out.exists() else 0
    folder_existed = harness.OUT_DIR.exists()
    before = _tracked_state()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), str(ROOT / "python"), os.environ.get("PYTHONPATH", "")])}
    try:
        done = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks/bench_lambda_advantages.py"), "--device",
             "cpu", "--quick", "--repeats", "1", "-k", "lambdapo"],
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert _tracked_state() == before
        assert "rows appended to benchmarks/out/lambda_advantages.jsonl" in done.stdout
        added = out.read_text()[size:].splitlines()
        assert {json.loads(line)["impl"] for line in added} == {"lambdapo"}
        assert len(added) == 3
        # progress lines, the table and every other line of the run's own report fit
        assert "lambda_advantages cpu P=16,G=1024 lambdapo: ..." in done.stdout
        report = done.stdout[done.stdout.index("lambda_advantages on cpu"):]
        assert max(len(line) for line in report.splitlines()) <= 120, report
    finally:
        if existed:
            with out.open("r+") as f:
                f.truncate(size)
        elif out.exists():
            out.unlink()
            if not folder_existed:
                harness.OUT_DIR.rmdir()


def test_results_md_is_generated_from_the_rows():
    """benchmarks/RESULTS.md is what summarize.py makes of benchmarks/results/*.jsonl:
    regenerate it (python benchmarks/summarize.py --markdown --write) after recording."""
    import summarize

    text = summarize.markdown()
    assert (ROOT / "benchmarks/RESULTS.md").read_text() == text, (
        "benchmarks/RESULTS.md is stale: python benchmarks/summarize.py --markdown --write")
    for op in summarize.load_rows():
        assert f"## {summarize.OPS.get(op, (op,))[0]}" in text
    for removed in ("rms_norm", "swiglu", "decode_attention"):
        assert f"## {removed}" not in text and not (
            harness.RESULTS_DIR / f"{removed}.jsonl").exists()
    # every table row names its machine, date and commit
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith(("| size", "| setting")):
            assert re.search(r"\| \d{4}-\d\d-\d\d \| `[0-9a-f]{7}", line), line


def _jsonl(path: Path, rows: list[dict]) -> None:
    base = {"device": "cpu", "device_name": "AMD EPYC (2 threads)", "torch": "2",
            "op": "op", "status": "ok", "peak_mib": 1.0, "extra": {}}
    path.write_text("".join(json.dumps({**base, **r}) + "\n" for r in rows))


def test_markdown_takes_each_size_from_its_newest_run(tmp_path):
    """A row's ratios come from its own run only: a peer measured in an older run is not
    set against a newer lambdapo time; sizes the newest run lacks keep their older run."""
    import summarize

    old = {"date": "2026-01-01T00:00:00Z", "commit": "aaaaaaa"}
    new = {"date": "2026-02-01T00:00:00Z", "commit": "bbbbbbb", "device_name": "Intel Xeon"}
    _jsonl(tmp_path / "op.jsonl", [
        {**old, "impl": "lambdapo", "size": "s1", "median_ms": 2.0},
        {**old, "impl": "peer", "size": "s1", "median_ms": 6.0},
        {**old, "impl": "lambdapo", "size": "s2", "median_ms": 1.0},
        {**old, "impl": "peer", "size": "s2", "median_ms": 5.0},
        {**new, "impl": "lambdapo", "size": "s1", "median_ms": 4.0},
        {**new, "impl": "peer", "size": "s1", "status": "not run: CUDA only",
         "median_ms": None},
        {**old, "device": "cuda", "impl": "lambdapo", "size": "s1", "median_ms": 0.5}])
    text = summarize.markdown(tmp_path)
    cuda, cpu = text.split("### CUDA")[1].split("### CPU")
    assert [line for line in cuda.splitlines() if line.startswith("| s") and not line.startswith("| size")] == [
        "| s1 | 0.5 | 1.0 | AMD EPYC (2 threads) | 2026-01-01 | `aaaaaaa` |"]
    rows = [line for line in cpu.splitlines() if line.startswith("| s") and not line.startswith("| size")]
    assert rows == ["| s1 | 4 | 1.0 | - | Intel Xeon | 2026-02-01 | `bbbbbbb` |",
                    "| s2 | 1 | 1.0 | 5.00x | AMD EPYC (2 threads) | 2026-01-01 | `aaaaaaa` |"]
    assert "`-`: not run (peer at s1: CUDA only)." in text


# ------------------------------------------------------------------------------ train step
def _train_step_setup(settings=(), size="full", device="cpu"):
    bench = importlib.import_module("bench_train_step")
    options = harness.BenchOptions(size=size, settings=tuple(settings))
    cases = bench.cases(options, device)
    return bench, cases, cases[0].spec[0]


def test_train_step_real_shape_cases():
    """Issue 39's cases: Qwen2.5-0.5B's shape on the CPU at 4 prompts x 4 samples x 64 new
    tokens, full fine-tuning or LoRA, against TRL; Qwen3-4B's shape with LoRA rank 16,
    gradient checkpointing and a KL reference, 2 x 4 x 32, lambdapo only. The built-in
    setting keeps its label (the history's rows stay comparable)."""
    bench, cases, setup = _train_step_setup()
    assert [c.size for c in cases] == ["16x8,max48,builtin,float32,1threads"] * 2
    assert (setup.lora_rank, setup.checkpointing, setup.kl_coef) == (0, False, 0.0)

    bench, cases, setup = _train_step_setup([("model", "qwen2.5-0.5b")])
    assert {c.impl for c in cases} == {"lambdapo", "trl"}
    assert (setup.prompts, setup.group, setup.max_new, setup.dtype) == (4, 4, 64, "float32")
    assert setup.lora_rank == 0 and setup.micro_batch == 16
    assert cases[0].size == "4x4,max64,qwen2.5-0.5b,float32,1threads"
    on_cuda = _train_step_setup([("model", "qwen2.5-0.5b")], device="cuda")[2]
    assert (on_cuda.prompts, on_cuda.dtype) == (16, "bfloat16")

    bench, cases, setup = _train_step_setup([("model", "qwen2.5-0.5b"), ("lora_rank", "16")])
    assert (setup.lora_rank, setup.lora_alpha, setup.checkpointing) == (16, 32.0, False)
    assert cases[0].size == "4x4,max64,qwen2.5-0.5b,float32,lora16,1threads"

    bench, cases, setup = _train_step_setup([("model", "qwen3-4b")])
    assert (setup.prompts, setup.group, setup.max_new, setup.dtype) == (2, 4, 32, "bfloat16")
    assert setup.lora_rank == 16 and setup.checkpointing and setup.kl_coef > 0
    assert cases[0].size == "2x4,max32,qwen3-4b,bfloat16,lora16,gc,kl0.04,1threads"
    shape, dtype = bench.SHAPES["qwen3-4b"]
    assert dtype == "bfloat16" and shape["vocab_size"] == 151936 and shape["tie_word_embeddings"]
    assert (shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"],
            shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"]) == (
        2560, 9728, 36, 32, 8, 128)
    trl_case = next(c for c in cases if c.impl == "trl")
    with pytest.raises(pytest.skip.Exception, match="lambdapo-only"):
        bench.trl_step(trl_case, 1, "unused", None)
    layers = _train_step_setup([("model", "qwen3-4b"), ("layers", "2")])[1][0].size
    assert layers.startswith("2x4,max32,qwen3-4b-2layers,") and bench.model_of(layers) == "qwen3-4b"


def test_train_step_driver_runs_the_cases_it_names():
    """The driver's cases (--modes full,lora) are the ones its pytest processes build from
    the --bench-set options it passes them, so that the node ids it runs exist."""
    bench = importlib.import_module("bench_train_step")
    for model, modes, dtype in (("qwen2.5-0.5b", "full,lora", ""), ("qwen3-4b", "", ""),
                                ("qwen3-4b", "", "float32"), ("builtin", "lora", "")):
        args = harness.argparse.Namespace(
            model_config=model, modes=modes, lora_rank=16, lora_alpha=32.0, checkpointing=-1,
            kl_coef=-1.0, layers=0, seed=0, device="cpu", dtype=dtype)
        setups = bench.driver_setups(args)
        assert len(setups) == max(1, len(modes.split(",")))
        for setup in setups:
            # An overridden dtype is in the label and in a model folder of its own.
            assert (",float32," in bench.size_label(setup, 1)) == (dtype == "float32" or
                                                                  model != "qwen3-4b")
            if model != "builtin":
                assert ("float32" in bench.shaped_model_folder(setup).name) == bool(dtype)
            settings = [tuple(o.removeprefix("--bench-set=").split("=", 1))
                        for o in bench.bench_sets(setup)]
            built = bench.cases(harness.BenchOptions(size="full", settings=tuple(settings)),
                                "cpu")[0]
            assert built.spec[0] == setup
            assert built.size == bench.size_label(setup, 1)


def test_train_step_targets():
    """Real shapes: lambdapo's step time and peak resident memory against TRL's (<= 1x);
    Qwen3-4B's shape: its peak resident memory within 20 GiB; lines say met / not met."""
    bench = importlib.import_module("bench_train_step")
    full, lora = "4x4,max64,qwen2.5-0.5b,float32,1threads", \
        "4x4,max64,qwen2.5-0.5b,float32,lora16,1threads"
    big = "2x4,max32,qwen3-4b,bfloat16,lora16,gc,kl0.04,1threads"

    def row(impl, size, ms, rss):
        return harness.Result("train_step", impl, size, "cpu", median_ms=ms,
                              extra={"peak_rss_mib": rss, "middle_s": 0.01})
    rows = [row("lambdapo", full, 900.0, 9000.0), row("trl", full, 1000.0, 10000.0),
            row("lambdapo", lora, 1100.0, 5000.0), row("trl", lora, 1000.0, 4000.0),
            row("lambdapo", big, 1e5, 21 * 1024.0)]
    found = {(t.size, t.label): t for t in bench.targets(rows, "cpu")}
    assert found[(full, "step time / TRL's")].value == pytest.approx(0.9)
    assert found[(full, "peak resident memory / TRL's")].met
    assert not found[(lora, "step time / TRL's")].met
    assert not found[(lora, "peak resident memory / TRL's")].met
    assert found[(big, "peak resident memory")].value == pytest.approx(21.0)
    assert bench.verdict(found[(big, "peak resident memory")]).endswith(
        "21.000 GiB (bound <= 20 GiB) not met")
    assert bench.verdict(found[(full, "step time / TRL's")]).endswith("met")
    assert not any(t.label == "middle part" for t in found.values())
    memory = bench.peak_rss()
    assert memory["peak_rss_mib"] > 0 and memory["workers"] >= 0


def test_train_step_memory_case_path_runs_on_the_builtin_model(tmp_path):
    """A tiny run of the Qwen3-4B case's code path (LoRA rank 16, gradient checkpointing,
    the KL reference as the base with the adapter off) on the built-in model through the
    bench's pytest case: one step, its row with the peak resident memory."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), str(ROOT / "python"), os.environ.get("PYTHONPATH", "")])}
    bench = ROOT / "benchmarks/bench_train_step.py"
    size = "16x8,max16,builtin,float32,lora16,gc,kl0.04,1threads"
    command = [sys.executable, "-m", "pytest", f"{bench}::test_train_step[cpu-{size}-lambdapo]",
               "--benchmark-only", "-p", "no:cacheprovider", "-q", "--bench-size=small",
               "--bench-device=cpu", "--bench-warmup=0", "--benchmark-min-rounds=1",
               "--bench-set=lora_rank=16", "--bench-set=checkpointing=1",
               "--bench-set=kl_coef=0.04", f"--bench-results={tmp_path}"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    row = json.loads((tmp_path / "train_step.jsonl").read_text().splitlines()[-1])
    assert row["status"] == "ok" and row["size"] == size and row["median_ms"] > 0
    assert row["extra"]["peak_rss_mib"] > 100 and row["extra"]["steps"] == 1


def test_train_step_table_shows_peak_resident_memory(tmp_path):
    """RESULTS.md's train_step table sets lambdapo's peak resident set beside TRL's, with
    their ratio; a lambdapo-only case shows its own peak and no ratio; rows recorded before
    the peak was measured leave the cells empty."""
    import summarize

    run = {"date": "2026-12-07T00:00:00Z", "commit": "ccccccc", "op": "train_step"}
    old = {"date": "2026-12-01T00:00:00Z", "commit": "aaaaaaa", "op": "train_step"}

    def extra(step, peak=None):
        return {"gen_s": 1.0, "middle_s": 0.1, "train_s": step - 1.1, "step_s": step,
                **({"peak_rss_mib": peak} if peak else {})}
    _jsonl(tmp_path / "train_step.jsonl", [
        {**run, "impl": "lambdapo", "size": "a", "median_ms": 9000.0,
         "extra": extra(9.0, 6 * 1024.0)},
        {**run, "impl": "trl", "size": "a", "median_ms": 10000.0,
         "extra": extra(10.0, 8 * 1024.0)},
        {**run, "impl": "lambdapo", "size": "b", "median_ms": 9000.0,
         "extra": extra(9.0, 15 * 1024.0)},
        {**run, "impl": "trl", "size": "b", "status": "not run: lambdapo only",
         "median_ms": None},
        {**old, "impl": "lambdapo", "size": "c", "median_ms": 900.0, "extra": extra(0.9)},
        {**old, "impl": "trl", "size": "c", "median_ms": 1800.0, "extra": extra(1.8)}])
    lines = [line for line in summarize.markdown(tmp_path).splitlines()
             if line.startswith("| ") and "ms" not in line]
    assert "peak RSS GiB (ours / TRL) | peak / TRL |" in lines[0]
    cells = {line.split(" | ")[0][2:]: line.split(" | ") for line in lines[1:]}
    assert cells["a"][7:9] == ["6.00 / 8.00", "0.75x"] and cells["a"][3] == "0.90x"
    assert cells["b"][7:9] == ["15.00 / -", "-"]
    assert cells["c"][7:9] == ["", ""] and cells["c"][3] == "0.50x"
