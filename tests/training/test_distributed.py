"""More than one process (torchrun), as a user runs it, with two gloo processes on the CPU:

* the update of two processes on fixed rollouts equals the one-process update of the same
  global batch (float32, tight tolerance), for every loss aggregation, with the KL
  reference, several optimizer steps per batch (ranks holding different numbers of rows,
  or none, of a mini-batch), LoRA, gradient checkpointing, and with DDP instead of FSDP2;
* ``torchrun --nproc-per-node=2 -m lambdapo train`` trains the built-in default, writes its
  outputs once, and a SIGTERM to one of its processes stops both after the same step with a
  checkpoint; torchrun with the ``lambdapo`` script resumes it exactly with two processes,
  and one process refuses to resume it;
* (slow) ranks whose responses end at different steps do not wait for each other, and a
  rank that fails makes the others fail soon.

The processes run ``tests/training/distributed_worker.py`` or the command line through
``python -m torch.distributed.run``, with collective timeouts (``dist_timeout_s``) and a
timeout on every subprocess, so that a hang fails the test instead of stalling it. Starting
processes is most of the time here (each imports torch and transformers), so each test
starts as few as it can: one launch runs every update case.
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

# One process against two: the same float32 sums in another order. Parameters after several
# AdamW steps differ a little more (AdamW's step is sensitive to a gradient near its eps, as
# LoRA's A gradient is while B is near zero): within 5% of one step of the learning rate, far
# below what a parameter left untrained or a wrong optimizer state would give.
RTOL, ATOL = 2e-5, 2e-6
# The cases whose loss is fused with the lm-head (a separate behaviour forward; the others
# correct for the engine with the update's own log-probs: the unfused path).
FUSED_CASES = ("token-mean", "seq-mean-token-sum-norm", "ddp")
PARAM_ATOL_PER_LR = 0.05


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


def test_prompts_that_do_not_split_over_the_processes_are_a_config_error():
    with pytest.raises(ValueError, match="prompts_per_step: 3 prompts cannot be split by "
                                         "whole groups over 2 processes"):
        Parallel(rank=1, world_size=2).prompt_share([{}, {}, {}])
    assert Parallel(rank=1, world_size=2).prompt_share([1, 2, 3, 4]) == [3, 4]


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
    """Every case of the worker, run by this process alone (no process group) and by two
    processes (one launch for all)."""
    from distributed_worker import run_update

    root = tmp_path_factory.mktemp("updates")
    threads = torch.get_num_threads()
    try:
        run_update(root / "one", list(CASES))
    finally:
        torch.set_num_threads(threads)   # the cases set threads=1
    torchrun(WORKER, root / "two", *CASES, timeout=600)
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
    # The fused policy loss serves two processes as it serves one (inside the FSDP2/DDP
    # wrapper); the cases with a separate behaviour forward take it.
    assert one["fused_policy_loss"] == two["fused_policy_loss"]
    assert two["fused_policy_loss"] == (name in FUSED_CASES)
    assert sorted(one_tensors) == sorted(two_tensors)
    assert any(k.startswith("grad.") for k in one_tensors)
    for key, expected in one_tensors.items():
        lr = CASES[name][0].get("optim.lr", 0.0)
        atol = PARAM_ATOL_PER_LR * lr if key.startswith("param.") and lr else ATOL
        torch.testing.assert_close(two_tensors[key], expected, rtol=RTOL, atol=atol,
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


@pytest.mark.parametrize("name", ["token-mean", "seq-mean-token-sum-norm"])
def test_ranks_with_different_micro_batch_counts_finish(updates, name):
    two, _ = load(updates / "two", name)
    rank0, rank1 = two["rows_per_rank"]
    assert len(rank0) == len(rank1)   # the same calls on both
    assert any(a != b for a, b in zip(rank0, rank1)), two["rows_per_rank"]
    if name == "seq-mean-token-sum-norm":
        assert 0 in rank0 and 0 in rank1   # each rank sat one mini-batch out


@pytest.mark.slow
def test_ranks_that_end_apart_do_not_wait_and_a_failing_rank_ends_the_run(tmp_path):
    start = time.perf_counter()
    result = torchrun(WORKER, tmp_path, "early-finish", "rank-fails", timeout=300,
                      check=False)
    early = json.loads((tmp_path / "early-finish.json").read_text())
    rank0, rank1 = early["longest_per_rank"]
    assert max(rank0) == 1 and max(rank1) > 1, early["longest_per_rank"]
    assert len(early["metrics"]) == 2
    assert result.returncode != 0
    assert "rank 1 fails on purpose" in result.stderr
    assert time.perf_counter() - start < 300


# ---------------------------------------------------------------------- the command line
CLI = ["steps=4", "prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=16",
       "micro_batch_size=6", "data.num_train=64", "data.num_eval=3", "eval_samples=1",
       "eval_every=0", "save_every=1", "device=cpu", "threads=1", "dist_timeout_s=120",
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


def stopped_run(run: Path) -> tuple[subprocess.CompletedProcess, int]:
    """``torchrun -m lambdapo train`` of CLI in ``run``, its rank 1 sent SIGTERM once step 2
    is written: (the finished launch, the last step it trained)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
               "--standalone", "-m", "lambdapo", "train", "--quiet", *CLI, f"output_dir={run}"]
    proc = subprocess.Popen(command, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 240
        metrics = run / "metrics.jsonl"
        while time.monotonic() < deadline and not (metrics.exists() and len(rows(metrics)) >= 2):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        workers = _workers(proc.pid)
        assert set(workers) == {0, 1}, workers
        os.kill(workers[1], signal.SIGTERM)   # rank 1 alone is told to stop
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    result = subprocess.CompletedProcess(command, proc.returncode, out, err)
    return result, rows(run / "metrics.jsonl")[-1]["step"]


@pytest.mark.slow
def test_torchrun_trains_stops_on_a_signal_to_one_process_and_resumes_exactly(tmp_path,
                                                                                capsys):
    run = tmp_path / "run"
    result, last = stopped_run(run)
    # Both processes stopped after the same step, with a checkpoint of it (each exits with
    # 128 + SIGTERM; torchrun then reports a failure).
    assert result.returncode != 0 and "exitcode: 143" in result.stderr, result.stderr[-3000:]
    assert last in (2, 3), last
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{last}"
    log = (run / "train.log").read_text()
    assert f"stopped by SIGTERM after step {last} of 4" in log, result.stderr[-3000:]
    assert "2 processes (gloo): the policy is sharded over them with FSDP2" in log
    assert log.count("behaviour log-probs (pi_old)") == 1   # one writer
    first = rows(run / "metrics.jsonl")
    assert [m["step"] for m in first] == list(range(1, last + 1))
    assert all(m["response_length"] > 0 and m["loss"] == m["loss"] for m in first)
    assert len(rows(run / "samples.jsonl")) == last * 2
    files = {p.name for p in (run / "checkpoints" / "step-1").iterdir()}
    assert {"model.safetensors", "optimizer.rank0.safetensors", "optimizer.rank1.safetensors",
            "rng.rank0.safetensors", "rng.rank1.safetensors", "manifest.json"} <= files
    # The saved model is the whole model in transformers' format.
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "step-1")
    assert sum(p.numel() for p in saved.parameters()) > 600_000

    # Resumed from step 1 to the end by torchrun with the lambdapo script: its steps 2..last
    # are those of the first launch.
    torchrun(console_script(tmp_path), "train", "--quiet", "--resume",
             run / "checkpoints" / "step-1")
    resumed = rows(run / "metrics.jsonl")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(first[1:], resumed[1:last]):
        for key in ("reward", "loss", "grad_norm", "entropy", "response_length"):
            assert a[key] == b[key], (a["step"], key)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 4
    assert summary["eval_samples"] == 3   # the held-out prompts, split over the ranks

    # One process cannot continue a sharded optimizer state (checked before a model loads).
    from lambdapo.cli import main

    assert main(["train", "--resume", str(run), "steps=6"]) == 2
    error = capsys.readouterr().err
    assert "saved by 2 processes and this run has 1" in error
    assert "--nproc-per-node=2" in error
