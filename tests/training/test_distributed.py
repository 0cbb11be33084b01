"""More than one process (torchrun), as a user runs it, with two gloo processes on the CPU:

* the update of two processes on fixed rollouts equals the one-process update of the same
  global batch (float32, tight tolerance), for every loss aggregation, with the KL
  reference, several optimizer steps per batch (ranks holding different numbers of rows,
  or none, of a mini-batch), LoRA and gradient checkpointing;
* ranks with different micro-batch counts, or whose responses end at different steps, do
  not hang, and a rank that fails makes the others fail soon, not wait;
* ``torchrun --nproc-per-node=2 -m lambdapo train`` (and torchrun with the ``lambdapo``
  script) trains the built-in default, writes its outputs once, resumes exactly with two
  processes and refuses to resume with one; a SIGTERM to one of the processes stops both
  after the same step with a checkpoint.

The processes run ``tests/training/distributed_worker.py`` or the command line through
``python -m torch.distributed.run``, with collective timeouts (``dist_timeout_s``) and a
timeout on every subprocess, so that a hang fails the test instead of stalling it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lambdapo.distributed import Parallel, padded, reduce_step_metrics

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("distributed_worker.py")
sys.path.insert(0, str(WORKER.parent))
from distributed_worker import CASES  # noqa: E402

# One process against two: the same float32 sums in another order.
RTOL, ATOL = 2e-5, 2e-6


def env() -> dict:
    """The test's environment for a child process, its import path included."""
    path = os.pathsep.join([str(ROOT), str(ROOT / "python"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def torchrun(*args, nproc: int = 2, timeout: float = 600, check: bool = True,
             cwd: Path | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               "--standalone", *map(str, args)]
    result = subprocess.run(command, env=env(), capture_output=True, text=True,
                            timeout=timeout, cwd=cwd)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def alone(*args, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *map(str, args)], env=env(), capture_output=True,
                            text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


# ---------------------------------------------------------------------- in-process pieces
def test_padding_repeats_the_first_micro_batch_with_zero_weight():
    class Two(Parallel):   # a rank of two whose other rank has 3 micro-batches
        def max_int(self, value):
            return max(value, 3)
    two = Two(rank=1, world_size=2)
    assert padded(["a"], two, lambda: "spare") == [("a", 1.0), ("a", 0.0), ("a", 0.0)]
    assert padded([], two, lambda: "spare") == [("spare", 0.0)] * 3
    assert padded(["a", "b", "c"], two, lambda: "spare") == [("a", 1.0), ("b", 1.0),
                                                              ("c", 1.0)]
    one = Parallel()
    assert padded(["a"], one, lambda: "spare") == [("a", 1.0)]


def test_step_metrics_of_the_global_batch_from_the_ranks():
    class Gathered(Parallel):   # hands back two ranks' values
        def all_gather_objects(self, value):
            other = {"metrics": {"reward": 1.0, "loss": 0.5, "entropy": 2.0,
                                 "mismatch/abs_max": 0.3, "grad_norm": 9.0, "step": 1,
                                 "gen_time": 4.0, "tokens_per_s": 1.0, "advantage/std": 0.0,
                                 "response_length": 10.0, "reward_errors": 2},
                     "sequences": 2, "tokens": 20, "adv": (2, 2.0, 2.0)}
            return [value, other]
    mine = {"reward": 0.0, "loss": 0.25, "entropy": 1.0, "mismatch/abs_max": 0.1,
            "grad_norm": 9.0, "step": 1, "gen_time": 2.0, "tokens_per_s": 1.0,
            "advantage/std": 0.0, "response_length": 5.0}
    out = reduce_step_metrics(mine, Gathered(rank=0, world_size=2), sequences=6, tokens=30,
                              advantages=torch.tensor([-1.0, -1.0, 0.0, 0.0, 1.0, 1.0]))
    assert out["reward"] == pytest.approx(0.25)          # 6 responses at 0, 2 at 1
    assert out["loss"] == pytest.approx(0.75)            # shares of one loss: summed
    assert out["entropy"] == pytest.approx((30 + 40) / 50)   # per token
    assert out["mismatch/abs_max"] == 0.3 and out["gen_time"] == 4.0
    assert out["grad_norm"] == 9.0 and out["step"] == 1
    assert out["response_length"] == pytest.approx(50 / 8)
    assert out["tokens_per_s"] == pytest.approx(50 / 4.0)
    assert out["reward_errors"] == 2
    every = torch.tensor([-1.0, -1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    assert out["advantage/std"] == pytest.approx(float(every.std()))


def test_one_process_keeps_no_process_group(tmp_path, monkeypatch):
    from lambdapo import distributed
    from lambdapo.config import load_config
    from lambdapo.trainer import Trainer

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_process_group("cpu", 60) == distributed.SINGLE
    assert not torch.distributed.is_initialized()
    config = load_config(None, [f"output_dir={tmp_path}", "device=cpu", "steps=1",
                                "data.num_eval=2", "data.num_train=16"])
    with Trainer(config, progress=False) as trainer:
        assert not trainer.policy.sharded and not trainer.parallel.enabled
        assert type(trainer.model.model.layers[0]).__name__ == "LlamaDecoderLayer"
    # A process started as one of several but without a process group is told what to do.
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="configure_process"):
        distributed.current()


# ---------------------------------------------------------------------- two processes
@pytest.fixture(scope="module")
def updates(tmp_path_factory):
    """Every case of the worker, run by one process and by two."""
    root = tmp_path_factory.mktemp("updates")
    names = list(CASES)
    alone(WORKER, "update", root / "one", *names, timeout=900)
    torchrun(WORKER, "update", root / "two", *names, timeout=900)
    return root


def load(folder: Path, name: str) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    return (json.loads((folder / f"{name}.json").read_text()),
            load_file(str(folder / f"{name}.safetensors")))


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_make_the_one_process_update(updates, name):
    one, one_tensors = load(updates / "one", name)
    two, two_tensors = load(updates / "two", name)
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert sorted(one_tensors) == sorted(two_tensors)
    assert any(k.startswith("grad.") for k in one_tensors)
    for key, expected in one_tensors.items():
        torch.testing.assert_close(two_tensors[key], expected, rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f"{name} {key}: {m}")
    for step_one, step_two in zip(one["metrics"], two["metrics"], strict=True):
        for key in ("loss", "grad_norm", "reward", "accuracy", "advantage/mean",
                    "advantage/std", "advantage/abs_mean", "score/mean", "entropy",
                    "clip_frac", "ratio", "kl", "response_length", "finished",
                    "mismatch/abs_mean", "mismatch/abs_max", "mismatch/is_mean",
                    "mismatch/is_clipped", "lr"):
            if key in step_one:
                assert step_two[key] == pytest.approx(step_one[key], rel=1e-4, abs=1e-6), \
                    (name, key)
    if name == "lora":   # only the adapter trains
        assert all("lora_" in k for k in one_tensors if k.startswith("grad."))


@pytest.mark.parametrize("name", ["mini-batches", "empty-share"])
def test_ranks_with_different_micro_batch_counts_finish(updates, name):
    two, _ = load(updates / "two", name)
    rank0, rank1 = two["rows_per_rank"]
    assert len(rank0) == len(rank1)   # the same calls on both
    assert any(a != b for a, b in zip(rank0, rank1)), two["rows_per_rank"]
    if name == "empty-share":
        assert 0 in rank0 and 0 in rank1   # each rank sat one mini-batch out


def test_a_rank_whose_responses_end_first_does_not_wait(tmp_path):
    start = time.perf_counter()
    torchrun(WORKER, "early-finish", tmp_path, timeout=600)
    result = json.loads((tmp_path / "early-finish.json").read_text())
    rank0, rank1 = result["longest_per_rank"]
    assert max(rank0) == 1 and max(rank1) > 1, result["longest_per_rank"]
    assert len(result["metrics"]) == 2
    assert time.perf_counter() - start < 600


def test_a_failing_rank_ends_the_run_instead_of_hanging(tmp_path):
    start = time.perf_counter()
    result = torchrun(WORKER, "rank-fails", tmp_path, timeout=300, check=False)
    assert result.returncode != 0
    assert "rank 1 fails on purpose" in result.stderr
    assert time.perf_counter() - start < 300


# ---------------------------------------------------------------------- the command line
CLI = ["steps=4", "prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=24",
       "micro_batch_size=6", "data.num_train=64", "data.num_eval=9", "eval_samples=1",
       "eval_every=2", "save_every=2", "device=cpu", "threads=1", "dist_timeout_s=120",
       "log_samples=2"]


def console_script(folder: Path) -> Path:
    """A ``lambdapo`` script as pip writes it for the console entry point."""
    script = folder / "lambdapo"
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom lambdapo.cli import main\n"
                      f"if __name__ == '__main__':\n    sys.exit(main())\n")
    script.chmod(0o755)
    return script


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.mark.slow
def test_torchrun_trains_writes_once_and_resumes_exactly(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    result = torchrun("-m", "lambdapo", "train", "--quiet", *CLI, f"output_dir={full}")
    assert result.stdout.count("held-out accuracy") == 1, result.stdout   # rank 0 prints
    metrics = rows(full / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["response_length"] > 0 and m["loss"] == m["loss"] for m in metrics)
    assert len(rows(full / "samples.jsonl")) == 4 * 2
    summary = json.loads((full / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 4
    assert summary["eval_samples"] == 9   # the held-out prompts, split over the ranks
    assert [e["step"] for e in summary["eval_history"]] == [0, 2, 4]
    log = (full / "train.log").read_text()
    assert log.count("behaviour log-probs (pi_old)") == 1   # one writer
    assert "2 processes (gloo)" in log
    for step in (2, 4):
        files = {p.name for p in (full / "checkpoints" / f"step-{step}").iterdir()}
        assert {"model.safetensors", "optimizer.rank0.safetensors",
                "optimizer.rank1.safetensors", "rng.rank0.safetensors",
                "rng.rank1.safetensors", "manifest.json"} <= files
    assert (full / "curves.png").exists() and (full / "tensorboard").is_dir()
    # The saved model is the whole model in transformers' format.
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(full / "checkpoints" / "step-4")
    assert sum(p.numel() for p in saved.parameters()) > 600_000

    # Two steps, then resumed to four, with torchrun and the lambdapo script.
    script = console_script(tmp_path)
    torchrun(script, "train", "--quiet", *CLI, "steps=2", f"output_dir={part}")
    torchrun(script, "train", "--quiet", "--resume", "steps=4", f"output_dir={part}")
    resumed = rows(part / "metrics.jsonl")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(metrics, resumed):
        for key in ("reward", "loss", "grad_norm", "entropy", "response_length"):
            assert a[key] == b[key], (a["step"], key)
    # Another number of processes cannot continue a sharded optimizer state.
    one = alone("-m", "lambdapo", "train", "--resume", "steps=6", f"output_dir={part}",
                check=False)
    assert one.returncode == 2
    assert "saved by 2 processes and this run has 1" in one.stderr
    assert "--nproc-per-node=2" in one.stderr


def test_prompts_that_do_not_split_over_the_processes_are_a_config_error(tmp_path):
    result = torchrun("-m", "lambdapo", "train", *CLI, "prompts_per_step=3",
                      f"output_dir={tmp_path}", check=False, timeout=300)
    assert result.returncode != 0
    assert "prompts_per_step: 3 prompts cannot be split by whole groups over 2 processes" \
        in result.stderr


def _workers(parent: int) -> dict[int, int]:
    """rank -> pid of the torchrun workers under ``parent``."""
    found = {}
    for task in Path(f"/proc/{parent}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for pid in map(int, children):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for item in environ:
                if item.startswith(b"RANK="):
                    found[int(item[5:])] = pid
    return found


@pytest.mark.slow
def test_a_signal_to_one_process_stops_both_after_the_same_step(tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
               "--standalone", "-m", "lambdapo", "train", "--quiet", *CLI, "steps=200",
               "save_every=0", "eval_every=0", f"output_dir={run}"]
    proc = subprocess.Popen(command, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 300
        metrics = run / "metrics.jsonl"
        while time.monotonic() < deadline and not (metrics.exists() and rows(metrics)):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.5)
        workers = _workers(proc.pid)
        assert set(workers) == {0, 1}, workers
        os.kill(workers[1], signal.SIGTERM)   # rank 1 alone is told to stop
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    steps = [m["step"] for m in rows(run / "metrics.jsonl")]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step-{steps[-1]}", (latest, steps, err[-3000:])
    assert steps[-1] < 200
    log = (run / "train.log").read_text()
    assert f"stopped by SIGTERM after step {steps[-1]} of 200" in log, err[-3000:]
    files = {p.name for p in (run / "checkpoints" / latest).iterdir()}
    assert {"optimizer.rank0.safetensors", "optimizer.rank1.safetensors"} <= files
