"""Stopping a run as users and schedulers do, with real signals on real processes: SIGTERM
and SIGINT end `lambdapo train` cleanly (a checkpoint of the last finished step, the plot,
one line naming the checkpoint and the resume command, exit 143 / 130, the reward worker
gone), the run then continues from that step; a reward worker whose trainer is killed with
SIGKILL ends by itself; and a CPU that other work keeps busy is noticed once."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lambdapo import process as process_lib
from lambdapo.process import CpuContention

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), str(ROOT / "python"), os.environ.get("PYTHONPATH", "")])}


def _builtin_run(run: Path, **extra) -> list[str]:
    """A long run of the built-in model and task, whose answers keep a reward worker busy."""
    settings = {"steps": 200, "prompts_per_step": 4, "rollout.group_size": 4,
                "rollout.max_new_tokens": 24, "data.num_train": 64, "data.num_eval": 2,
                "eval_samples": 1, "reward.workers": 1, "device": "cpu", "output_dir": run,
                **extra}
    return [f"{k}={v}" for k, v in settings.items()]


def _start(args: list[str], **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lambdapo.cli", "train", "--quiet", *args],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, **popen)


def _end(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.communicate()


def _wait_for_steps(run: Path, steps: int, process: subprocess.Popen, timeout: float = 240):
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the run ended early: {process.communicate()[1][-2000:]}")
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.2)
    raise AssertionError(f"no {steps} steps within {timeout} s")


def _descendants(pid: int) -> list[int]:
    found = []
    for child in process_lib._children(pid):
        found += [child, *_descendants(child)]
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").exists(), reason="reads /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_run_cleanly_and_it_resumes(tmp_path, signum):
    run = tmp_path / "run"
    trainer = _start(_builtin_run(run))
    try:
        _wait_for_steps(run, 2, trainer)
        helpers = _descendants(trainer.pid)
        assert helpers, "the reward worker should be running"
        # SIGINT as a terminal's Ctrl-C sends it: to the whole process group.
        os.killpg(trainer.pid, signum) if signum == signal.SIGINT else trainer.send_signal(signum)
        out, err = trainer.communicate(timeout=240)
    finally:
        _end(trainer)
    assert trainer.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    name = signal.Signals(signum).name
    lines = [line for line in err.splitlines() if f"stopped by {name}" in line]
    assert len(lines) == 1, err[-3000:]
    step = int(lines[0].split("after step ")[1].split()[0])
    assert f"checkpoint {run / 'checkpoints' / f'step-{step}'}" in lines[0]
    assert f"lambdapo train --resume {run}" in lines[0]
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{step}"
    assert (run / "curves.png").stat().st_size > 0
    assert not _wait_gone(helpers), "the reward worker or a helper outlived the run"
    # The run continues from that step with its own settings.
    resumed = subprocess.run([sys.executable, "-m", "lambdapo.cli", "train", "--quiet",
                              "--resume", str(run), f"steps={step + 1}"], env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {run} from step {step} of {step + 1}" in resumed.stderr
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, step + 2))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").exists(), reason="reads /proc")
def test_a_reward_worker_ends_by_itself_when_its_trainer_is_killed(tmp_path):
    run = tmp_path / "run"
    trainer = _start(_builtin_run(run))
    try:
        _wait_for_steps(run, 1, trainer)
        helpers = _descendants(trainer.pid)
        assert helpers
        trainer.kill()   # SIGKILL: nothing in the trainer runs any more
        trainer.communicate(timeout=60)
    finally:
        _end(trainer)
    assert not _wait_gone(helpers, timeout=5.0), "a worker outlived its killed trainer"


def test_other_work_on_the_cores_is_noticed_once(monkeypatch, caplog):
    samples = iter([(0.0, 0.0, 0.0), (1.0, 2.0, 1.0), (2.0, 4.0, 2.0)])
    monkeypatch.setattr(process_lib, "_cpu_sample", lambda: next(samples))
    watch = CpuContention(threads=2, every=1)
    watch.cores, watch.active = 2, True
    message = watch.after_step()   # 2 busy cores, 1 of them ours: another process has one
    assert message and "about 1.0 of this machine's 2 cores" in message
    assert "threads=1" in message and message in caplog.text
    assert watch.after_step() is None   # once


def test_an_idle_machine_or_spare_cores_give_no_warning(monkeypatch):
    samples = iter([(0.0, 0.0, 0.0), (1.0, 1.1, 1.0), (2.0, 3.0, 2.0), (3.0, 4.6, 3.0)])
    monkeypatch.setattr(process_lib, "_cpu_sample", lambda: next(samples))
    watch = CpuContention(threads=2, every=1)
    watch.cores, watch.active = 2, True
    assert watch.after_step() is None          # others use 0.1 core
    watch.cores = 8                            # others use 1 core, 6 are spare
    assert watch.after_step() is None
    watch.cores, watch.threads = 2, 1          # 1 thread beside 0.6 core of others
    assert watch.after_step() is None


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads /proc")
def test_a_busy_process_beside_the_run_is_measured():
    cores = len(os.sched_getaffinity(0))
    # The busy process is another's, not a child of this one (whose CPU time counts as the
    # run's own): started by a shell that exits at once, leaving it to init.
    launched = subprocess.run(["sh", "-c", f"'{sys.executable}' -c 'while True: pass' "
                               f">/dev/null 2>&1 & echo $!"],
                              capture_output=True, text=True, check=True)
    spinner = int(launched.stdout)
    try:
        time.sleep(0.5)
        watch = CpuContention(threads=cores, every=1)
        time.sleep(1.5)
        message = watch.after_step()
    finally:
        os.kill(spinner, signal.SIGKILL)
    assert message is not None and f"of this machine's {cores} cores" in message
