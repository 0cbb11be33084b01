"""Faults injected into checkpointing and training: a save killed at every point (an
exception, or ``os._exit`` in a subprocess) leaves ``latest`` naming a complete
checkpoint; damaged checkpoint files give an error naming the file; a run killed between
checkpoints and resumed has each step once in metrics.jsonl, samples.jsonl and TensorBoard;
config changes on resume; keep_last; the lock on output_dir."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lambdapo import checkpoint as ckpt
from lambdapo.config import load_config
from lambdapo.trainer import Trainer
from test_loop import TIMING, overrides
from tiny_model import make_tiny_model

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------ checkpoint writes, small fakes
class FakeModel:
    """Stands in for a transformers model: one weight tensor, saved as safetensors."""

    def __init__(self, value: float):
        self.weight = torch.full((256,), value)

    def save_pretrained(self, folder, safe_serialization=True):
        Path(folder).mkdir(parents=True, exist_ok=True)
        save_file({"weight": self.weight}, str(Path(folder) / "model.safetensors"))


class FakeTokenizer:
    def save_pretrained(self, folder):
        (Path(folder) / "tokenizer.json").write_text("{}")


def fake_save(run: Path, step: int, value: float, keep_last: int = 0) -> Path:
    param = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones(4)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return ckpt.save_checkpoint(run, step, model=FakeModel(value), tokenizer=FakeTokenizer(),
                                optimizer=optimizer, scheduler=scheduler,
                                rng={"torch": torch.get_rng_state()},
                                state={"value": value}, keep_last=keep_last)


def latest_value(run: Path) -> float:
    """The weight value of the checkpoint ``latest`` resolves to, after verifying it and
    loading its optimizer state as a resume would."""
    folder = ckpt.find_checkpoint(run)
    ckpt.verify_checkpoint(folder)
    param = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    state, _ = ckpt.load_checkpoint(folder, optimizer=optimizer, scheduler=scheduler,
                                    device=torch.device("cpu"))
    value = float(load_file(str(folder / "model.safetensors"))["weight"][0])
    assert state["value"] == value
    return value


# The operations a save performs on the file system, in order; a fault is injected at
# the k-th call of any of them.
FAULT_POINTS = [(ckpt, "save_file"), (ckpt, "write_manifest"), (os, "rename"),
                (os, "replace"), (shutil, "rmtree")]


def inject_fault(monkeypatch, k: int, fault) -> list:
    calls = []
    for owner, name in FAULT_POINTS:
        original = getattr(owner, name)

        def hooked(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            if len(calls) == k + 1:
                fault()
            return _original(*args, **kwargs)
        monkeypatch.setattr(owner, name, hooked)
    return calls


def test_resaving_a_step_killed_at_every_point_keeps_latest_complete(tmp_path, monkeypatch):
    """The issue's case (re-saving step 2 over an existing step-2, with pruning): whatever
    operation is interrupted, latest resolves to the old or the new checkpoint, complete,
    and the next save cleans up."""
    class Killed(BaseException):
        pass

    def fault():
        raise Killed()

    k = 0
    while True:
        run = tmp_path / f"run{k}"
        fake_save(run, 1, 1.0)
        fake_save(run, 2, 2.0)
        calls = inject_fault(monkeypatch, k, fault)
        try:
            fake_save(run, 2, 3.0, keep_last=1)
            finished = True
        except Killed:
            finished = False
        monkeypatch.undo()
        assert latest_value(run) in ((3.0,) if finished else (2.0, 3.0)), (k, calls)
        fake_save(run, 3, 4.0)
        assert latest_value(run) == 4.0
        names = sorted(p.name for p in (run / "checkpoints").iterdir())
        assert not [n for n in names if n.startswith((".tmp", ".old"))], (k, names)
        if finished:
            break
        k += 1
    assert k >= 6, calls   # every write, both renames, the pointer, both deletions


def test_a_first_save_killed_at_every_point_leaves_no_partial_checkpoint(tmp_path,
                                                                         monkeypatch):
    class Killed(BaseException):
        pass

    def fault():
        raise Killed()

    for k in range(20):
        run = tmp_path / f"run{k}"
        inject_fault(monkeypatch, k, fault)
        try:
            fake_save(run, 1, 1.0)
            finished = True
        except Killed:
            finished = False
        monkeypatch.undo()
        if finished or (run / "checkpoints" / "step-1").exists():
            assert latest_value(run) == 1.0, k
        else:
            with pytest.raises(FileNotFoundError, match="no 'latest'"):
                ckpt.find_checkpoint(run)
        if finished:
            break
    assert k >= 4


def save_killed_at(run: Path, k: int) -> int:
    """In a forked child: the two first saves, then the re-save with the process killed
    (``os._exit``: no cleanup, no ``finally``, as ``kill -9``) at fault point k. Returns
    the child's exit status: 17 if killed, 0 if the save finished."""
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            fake_save(run, 1, 1.0)
            fake_save(run, 2, 2.0)
            calls = []
            for owner, name in FAULT_POINTS:
                original = getattr(owner, name)

                def hooked(*args, _original=original, **kwargs):
                    calls.append(1)
                    if len(calls) == k + 1:
                        os._exit(17)
                    return _original(*args, **kwargs)
                setattr(owner, name, hooked)
            fake_save(run, 2, 3.0, keep_last=1)
            status = 0
        finally:
            os._exit(status)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_resaving_a_step_with_the_process_killed_at_every_point(tmp_path):
    for k in range(20):
        run = tmp_path / f"run{k}"
        status = save_killed_at(run, k)
        assert status in (0, 17), status
        assert latest_value(run) in ((3.0,) if status == 0 else (2.0, 3.0)), k
        fake_save(run, 3, 4.0)
        assert latest_value(run) == 4.0
        if status == 0:
            break
    assert k >= 6


def test_keep_last_never_deletes_the_checkpoint_latest_names(tmp_path):
    for step in (1, 2, 3):
        fake_save(tmp_path, step, float(step), keep_last=2)
    folders = lambda: sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))  # noqa
    assert folders() == ["step-2", "step-3"]
    fake_save(tmp_path, 6, 6.0, keep_last=2)
    assert folders() == ["step-3", "step-6"]
    # A run resumed from an earlier step: latest names a lower step than others.
    fake_save(tmp_path, 4, 4.0, keep_last=1)
    assert folders() == ["step-4", "step-6"]
    assert latest_value(tmp_path) == 4.0
    fake_save(tmp_path, 5, 5.0, keep_last=0)
    assert folders() == ["step-4", "step-5", "step-6"]


# ------------------------------------------------------------------ a real tiny run
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    import random

    root = tmp_path_factory.mktemp("faults")
    model = make_tiny_model(root / "model")
    rng = random.Random(0)
    with open(root / "data.jsonl", "w") as f:
        for _ in range(64):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            f.write(json.dumps({"question": f"{a}+{b}=", "answer": str(a + b),
                                "solution": f"{a}+{b}={a + b} \\boxed{{{a + b}}}"}) + "\n")
    return root, model


@pytest.fixture(scope="module")
def saved_run(workspace):
    """A 2-step run with a checkpoint at each step."""
    root, model = workspace
    config = load_config(None, overrides(root, model, "saved", steps=2, save_every=1))
    with Trainer(config, progress=False) as trainer:
        trainer.train()
    return root / "saved"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def overwrite_weights(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-4096:] = os.urandom(4096)   # inside the tensor data: same size, valid header
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated model": ("model.safetensors", truncate),
    "empty model": ("model.safetensors", lambda p: p.write_bytes(b"")),
    "overwritten weights": ("model.safetensors", overwrite_weights),
    "truncated optimizer": ("optimizer.safetensors", truncate),
    "garbled state": ("trainer_state.json", lambda p: p.write_text("{ not json")),
    "truncated state": ("trainer_state.json", truncate),
    "missing rng": ("rng.safetensors", lambda p: p.unlink()),
    "garbled manifest": ("manifest.json", lambda p: p.write_text("[1, 2")),
}


# Without a manifest (a checkpoint of an older lambdapo) the loaders still name the file;
# only the manifest can reveal overwritten bytes.
DAMAGE_CASES = [(damage, True) for damage in DAMAGE] + [
    (damage, False) for damage in DAMAGE
    if damage not in ("overwritten weights", "garbled manifest")]


@pytest.mark.parametrize("damage,manifest", DAMAGE_CASES,
                         ids=[f"{d}-{'manifest' if m else 'no-manifest'}"
                              for d, m in DAMAGE_CASES])
def test_a_damaged_checkpoint_is_an_error_naming_the_file(workspace, saved_run, tmp_path,
                                                          damage, manifest):
    root, model = workspace
    name, spoil = DAMAGE[damage]
    folder = tmp_path / "step-2"
    shutil.copytree(saved_run / "checkpoints" / "step-2", folder)
    if not manifest:
        (folder / "manifest.json").unlink()
    spoil(folder / name)
    config = load_config(None, overrides(root, model, f"damaged-{tmp_path.name}", steps=3))
    with pytest.warns(UserWarning) if not manifest else contextlib.nullcontext():
        with pytest.raises(ckpt.CheckpointError) as error:
            Trainer(config, resume=str(folder), progress=False)
    message = str(error.value)
    assert name in message and str(folder) in message, message


def test_latest_naming_a_missing_checkpoint_is_a_clear_error(tmp_path):
    fake_save(tmp_path, 1, 1.0)
    shutil.rmtree(tmp_path / "checkpoints" / "step-1")
    with pytest.raises(ckpt.CheckpointError, match="names 'step-1', which does not exist"):
        ckpt.find_checkpoint(tmp_path)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def tensorboard_steps(run: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


def test_a_run_killed_between_checkpoints_resumes_without_repeated_steps(workspace,
                                                                        monkeypatch):
    """Killed after step 3 was logged (checkpoint at step 2): the resumed run's
    metrics.jsonl, samples.jsonl and TensorBoard hold each step once, the same rows as an
    uninterrupted run's."""
    from lambdapo import metrics as metrics_lib

    root, model = workspace
    extra = dict(steps=4, save_every=2, eval_every=1)
    with Trainer(load_config(None, overrides(root, model, "whole", **extra)),
                 progress=False) as trainer:
        trainer.train()

    class Killed(BaseException):
        pass

    write = metrics_lib.MetricsWriter.write

    def write_then_die(self, metrics):
        write(self, metrics)
        if metrics["step"] == 3:
            raise Killed()
    monkeypatch.setattr(metrics_lib.MetricsWriter, "write", write_then_die)
    config = load_config(None, overrides(root, model, "killed", **extra))
    with Trainer(config, progress=False) as trainer, pytest.raises(Killed):
        trainer.train()
    monkeypatch.undo()
    killed = root / "killed"
    assert [m["step"] for m in read_rows(killed / "metrics.jsonl")] == [1, 2, 3]
    with Trainer(config, resume="auto", progress=False) as trainer:
        assert trainer.step == 2
        trainer.train()

    whole = root / "whole"
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa
    assert strip(read_rows(killed / "metrics.jsonl")) == strip(read_rows(whole / "metrics.jsonl"))
    samples = read_rows(killed / "samples.jsonl")
    assert [s["step"] for s in samples] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert samples == read_rows(whole / "samples.jsonl")
    assert tensorboard_steps(killed, "reward") == [1, 2, 3, 4]
    assert tensorboard_steps(killed, "eval/accuracy") == [0, 1, 2, 3, 4]
    # A fresh run in the same folder starts its outputs over.
    fresh = load_config(None, overrides(root, model, "killed", steps=1))
    with pytest.warns(UserWarning, match="holds an earlier run's checkpoints"):
        trainer = Trainer(fresh, progress=False)
    with trainer:
        trainer.train()
    assert [m["step"] for m in read_rows(killed / "metrics.jsonl")] == [1]
    assert [s["step"] for s in read_rows(killed / "samples.jsonl")] == [1, 1]
    assert tensorboard_steps(killed, "reward") == [1]


# ------------------------------------------------------------ config check, keep_last
def test_resume_checks_the_config(workspace, saved_run, tmp_path):
    root, model = workspace
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    base = dict(steps=3, save_every=1)

    def resume(allow=False, **changes):
        config = load_config(None, overrides(root, model, run, **{**base, **changes}))
        return Trainer(config, resume="auto", progress=False, allow_config_change=allow)

    for key, value in (("rollout.group_size", 8), ("prompts_per_step", 2),
                       ("model.path", root / "elsewhere"), ("seed", 1), ("optim.lr", 0.5)):
        if key == "model.path":
            shutil.copytree(model, root / "elsewhere", dirs_exist_ok=True)
        with pytest.raises(ValueError, match=rf"{key}: .* -> .*--allow-config-change"):
            resume(**{key: value})
    with pytest.warns(UserWarning, match=r"steps: 2 -> 3; .*eval_samples: 2 -> 3"):
        trainer = resume(eval_samples=3)
    trainer.close()
    with pytest.warns(UserWarning, match=r"rollout.group_size: 4 -> 8"):
        with resume(allow=True, **{"rollout.group_size": 8, "checkpoint.keep_last": 1}) \
                as trainer:
            assert trainer.step == 2
            trainer.train()
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-3"]


# ------------------------------------------------------------------------------ lock
def test_a_second_trainer_on_the_same_output_dir_is_refused(workspace):
    root, model = workspace
    config = load_config(None, overrides(root, model, "locked", steps=1))
    first = Trainer(config, progress=False)
    with pytest.raises(ckpt.RunDirectoryLocked, match=rf"in use by another lambdapo run "
                                                      rf"\(pid {os.getpid()}\); close"):
        Trainer(config, progress=False)
    first.close()
    Trainer(config, progress=False).close()


HOLDER = textwrap.dedent("""
    import sys, time
    from lambdapo.config import load_config
    from lambdapo.trainer import Trainer
    trainer = Trainer(load_config(None, sys.argv[1:]), progress=False)
    print("ready", flush=True)
    time.sleep(300)
""")


@pytest.mark.slow
def test_two_processes_on_one_output_dir(workspace, tmp_path):
    """A second `lambdapo train` on a busy output_dir stops with a one-line error and
    leaves the folder alone; once the first is killed (-9), the lock is free."""
    root, model = workspace
    args = overrides(root, model, tmp_path / "run", steps=1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), str(ROOT / "python"), os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready", holder.stderr.read()
        before = sorted(p.name for p in (tmp_path / "run").iterdir())
        second = subprocess.run([sys.executable, "-m", "lambdapo.cli", "train", "--quiet",
                                 *args], env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        assert second.stderr.strip().splitlines()[-1] == (
            f"lambdapo train: error: output_dir {tmp_path / 'run'} is in use by another "
            f"lambdapo run (pid {holder.pid}); wait for it to finish or choose another "
            f"output_dir")
        assert "Traceback" not in second.stderr
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
    finally:
        holder.kill()   # SIGKILL: the holder cannot release anything itself
        holder.wait()
    ckpt.lock_run_dir(tmp_path / "run").close()
