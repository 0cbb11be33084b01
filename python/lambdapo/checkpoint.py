"""Checkpoints without pickle: model and tokenizer in transformers format (safetensors),
optimizer tensors and RNG states in safetensors files, everything else in JSON, and a
``manifest.json`` with the size and SHA-256 of every file, checked before a checkpoint is
loaded.

A checkpoint is written into ``checkpoints/.tmp-step-N`` and renamed to
``checkpoints/step-N`` only once complete; ``checkpoints/latest`` (a one-line file,
replaced atomically) then names it. Re-saving an existing step renames the old folder
aside (``.old-step-N``) before the new one is renamed in, and deletes it only after
``latest`` is updated: a kill at any point leaves ``latest`` naming a complete checkpoint
(between the two renames, the one put aside, which the next save renames back). Stale
``.tmp-*`` folders are removed by the next save.

The run directory is locked (``flock`` on ``output_dir/.lock``) while a trainer uses it,
so a second run on the same ``output_dir`` stops with an error; the operating system drops
the lock when the process ends, however it ends.

A run of several processes (torchrun) writes one checkpoint: rank 0 writes the model (whole,
gathered: the same files as one process), the tokenizer and the state; each rank writes its
shard of the optimizer state and its random states (``optimizer.rank<r>.safetensors``,
``rng.rank<r>.safetensors``); rank 0 then writes the manifest of all of them and renames the
folder into place. Such a checkpoint resumes with the same number of processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import LambdapoWarning
from .distributed import (SINGLE, Parallel, like_parameter, local_tensor,
                          whole_state_dict)

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".lock"
_STEP_FOLDER = re.compile(r"step-(\d+)")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or damaged; the message names the
    checkpoint folder and the file."""


class RunDirectoryLocked(RuntimeError):
    """Another process is training into the same ``output_dir``."""


# ------------------------------------------------------------------------------- lock
def lock_run_dir(run_dir: Path) -> IO[str]:
    """Takes an exclusive, non-blocking ``flock`` on ``run_dir/.lock`` and writes this
    process's id into it. Keep the returned file open for as long as the run lasts; closing
    it (or the process ending, even by ``kill -9``) releases the lock.

    Raises:
        RunDirectoryLocked: another process holds the lock (the message names its pid).
    """
    import fcntl

    path = Path(run_dir) / LOCK_FILE
    handle = open(path, "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        advice = ("close the Trainer that uses it first" if holder == str(os.getpid()) else
                  "wait for it to finish or choose another output_dir")
        raise RunDirectoryLocked(f"output_dir {run_dir} is in use by another lambdapo run "
                                 f"(pid {holder}); {advice}") from None
    except OSError as exc:   # a file system without locks (some network mounts)
        warnings.warn(f"output_dir {run_dir} cannot be locked ({exc.strerror}): a second run "
                      f"on it would not be detected", LambdapoWarning, stacklevel=2)
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def optimizer_file(parallel: Parallel) -> str:
    """The optimizer state's file of this rank (one process: ``optimizer.safetensors``)."""
    return f"optimizer.rank{parallel.rank}.safetensors" if parallel.enabled else OPTIMIZER_FILE


def rng_file(parallel: Parallel) -> str:
    """The random states' file of this rank (one process: ``rng.safetensors``)."""
    return f"rng.rank{parallel.rank}.safetensors" if parallel.enabled else RNG_FILE


def _trainer_file(name: str) -> bool:
    """Whether a safetensors file of a checkpoint holds trainer state, not model weights."""
    return name in (OPTIMIZER_FILE, RNG_FILE) or re.fullmatch(
        r"(optimizer|rng)\.rank\d+\.safetensors", name) is not None


# --------------------------------------------------------------------------- manifest
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _checkpoint_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def write_manifest(folder: Path, step: int) -> None:
    """Records the size and SHA-256 of every file of the checkpoint in ``folder``."""
    files = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size,
                                                 "sha256": _sha256(p)}
             for p in _checkpoint_files(folder)}
    (folder / MANIFEST_FILE).write_text(json.dumps({"format": 1, "step": step,
                                                    "files": files}, indent=1))


def verify_checkpoint(folder: Path) -> None:
    """Checks every file of the checkpoint in ``folder`` against its manifest (present,
    same size, same SHA-256). A checkpoint without a manifest (written by lambdapo before
    manifests existed) is loaded unverified, with a warning.

    Raises:
        CheckpointError: naming the checkpoint and the missing, truncated or changed file.
    """
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.exists():
        if not (folder / STATE_FILE).exists():
            raise CheckpointError(f"checkpoint {folder}: not a lambdapo checkpoint (no "
                                  f"{MANIFEST_FILE} and no {STATE_FILE})")
        warnings.warn(f"checkpoint {folder} has no {MANIFEST_FILE} (written by an older "
                      f"lambdapo): its files cannot be verified", LambdapoWarning, stacklevel=2)
        return
    try:
        files = json.loads(path.read_text())["files"]
        entries = [(name, int(entry["bytes"]), str(entry["sha256"]))
                   for name, entry in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint {folder}: {MANIFEST_FILE} is damaged "
                              f"({type(exc).__name__}: {exc})") from None
    for name, size, sha in entries:
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {folder}: {name} is missing")
        actual = file.stat().st_size
        if actual != size:
            raise CheckpointError(f"checkpoint {folder}: {name} has {actual} bytes, "
                                  f"{size} were written (truncated or replaced)")
        if _sha256(file) != sha:
            raise CheckpointError(f"checkpoint {folder}: {name} has changed since it was "
                                  f"written (SHA-256 mismatch: damaged on disk or edited)")


# ------------------------------------------------------------------------------- save
def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(tensors, the rest) of the optimizer state; a sharded parameter's state tensors are
    this rank's shards."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = local_tensor(value.detach()).cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        if int(index) < len(params):   # a shard back as the sharded tensor it was
            value = like_parameter(value, params[int(index)])
        state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    """Makes renames inside ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _recover(root: Path) -> None:
    """Finishes what a killed save left: drops ``.tmp-*`` folders; an ``.old-step-N`` is
    deleted when ``step-N`` made it into place, else renamed back to ``step-N``."""
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in root.glob(".old-step-*"):
        final = root / old.name.removeprefix(".old-")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(old, final)


def _step_folders(root: Path) -> list[tuple[int, Path]]:
    found = []
    for path in root.iterdir():
        match = _STEP_FOLDER.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def prune_checkpoints(root: Path, keep_last: int) -> list[Path]:
    """Deletes all but the ``keep_last`` highest-numbered ``step-N`` folders in ``root``
    (0: keep all); never the one ``latest`` names. Returns the deleted folders."""
    if keep_last <= 0:
        return []
    latest = (root / "latest").read_text().strip() if (root / "latest").exists() else None
    folders = _step_folders(root)
    doomed = [path for _, path in folders[:-keep_last] if path.name != latest]
    for path in doomed:
        # Renamed first: a kill mid-delete leaves a .tmp-* folder (removed by the next
        # save), never a step-N folder with files missing.
        trash = root / f".tmp-pruned-{path.name}"
        os.rename(path, trash)
        shutil.rmtree(trash)
    return doomed


def save_checkpoint(run_dir: Path, step: int, *, model, tokenizer,
                    optimizer: torch.optim.Optimizer, scheduler, rng: dict[str, torch.Tensor],
                    state: dict, keep_last: int = 0, parallel: Parallel = SINGLE) -> Path:
    """Writes checkpoint ``step`` (with its manifest) atomically, points ``latest`` at it,
    then keeps only the ``keep_last`` newest checkpoints (0: all). Returns its folder.

    With several processes (``parallel``) every rank calls it: the sharded ``model``'s
    weights are gathered whole, rank 0 saves them (the files of one process), the tokenizer,
    the state and the manifest, each rank its optimizer shard and random states."""
    root = run_dir / "checkpoints"
    tmp = root / f".tmp-step-{step}"
    final = root / f"step-{step}"
    weights = whole_state_dict(model, keep=parallel.is_main) if parallel.enabled else None
    if parallel.is_main:
        root.mkdir(parents=True, exist_ok=True)
        _recover(root)
        if weights is None:
            model.save_pretrained(tmp, safe_serialization=True)
        else:   # the gathered whole weights, not the modules' shards
            model.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
            del weights
        tokenizer.save_pretrained(tmp)
    parallel.barrier()   # the folder exists
    tensors, meta = _optimizer_tensors(optimizer)
    save_file(tensors, str(tmp / optimizer_file(parallel)))
    save_file({k: v.cpu().contiguous() for k, v in rng.items()}, str(tmp / rng_file(parallel)))
    parallel.barrier()   # every rank's files are in
    if parallel.is_main:
        _finish_save(root, tmp, final, step, meta, scheduler, state, keep_last,
                     parallel.world_size)
    parallel.barrier()   # latest names it before any rank goes on
    return final


def _finish_save(root: Path, tmp: Path, final: Path, step: int, meta: dict, scheduler,
                 state: dict, keep_last: int, world_size: int) -> None:
    full_state = {**state, "step": step, "optimizer": meta,
                  "scheduler": {"last_epoch": scheduler.last_epoch,
                                "_step_count": scheduler._step_count}}
    if world_size > 1:
        full_state["world_size"] = world_size
    (tmp / STATE_FILE).write_text(json.dumps(full_state, indent=1))
    write_manifest(tmp, step)
    _fsync_tree(tmp)
    old = root / f".old-step-{step}"
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(root)
    pointer = root / ".latest.tmp"
    with open(pointer, "w") as f:
        f.write(final.name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer, root / "latest")
    _fsync_dir(root)
    if old.exists():
        shutil.rmtree(old)
    prune_checkpoints(root, keep_last)


# ------------------------------------------------------------------------------- load
def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, a run directory (its latest checkpoint) or its checkpoints/.

    Raises:
        FileNotFoundError: no checkpoint there.
        CheckpointError: ``latest`` names a checkpoint that does not exist.
    """
    path = Path(path)
    for root in (path / "checkpoints", path):
        pointer = root / "latest"
        if pointer.exists():
            name = pointer.read_text().strip()
            if (root / name).is_dir():
                return root / name
            # Killed between renaming the old folder aside and the new one in: the old
            # one is complete (the next save renames it back).
            if (root / f".old-{name}").is_dir():
                return root / f".old-{name}"
            raise CheckpointError(f"{pointer} names {name!r}, which does not exist in "
                                  f"{root}")
    if (path / STATE_FILE).exists():
        return path
    for root in (path / "checkpoints", path):
        # Killed between the first checkpoint's rename and writing latest: a step-N folder
        # exists only once complete.
        if root.is_dir() and _step_folders(root):
            return _step_folders(root)[-1][1]
    if (path / "checkpoints").is_dir():
        raise FileNotFoundError(f"{path}: checkpoints/ has no 'latest' (the run stopped "
                                f"before its first checkpoint; see save_every)")
    raise FileNotFoundError(f"{path}: no checkpoint there (no checkpoints/latest "
                            f"and no {STATE_FILE})")


def _damaged(folder: Path, name: str, exc: Exception) -> CheckpointError:
    return CheckpointError(f"checkpoint {folder}: {name} is damaged "
                           f"({type(exc).__name__}: {exc})")


def read_state(folder: Path) -> dict:
    """The trainer state of the checkpoint in ``folder`` (its step, config, history ...).

    Raises:
        CheckpointError: the state file is missing or damaged.
    """
    folder = Path(folder)
    try:
        state = json.loads((folder / STATE_FILE).read_text())
        state["step"] = int(state["step"])
        schedule = state["scheduler"]
        int(schedule["last_epoch"]), int(schedule["_step_count"]), state["optimizer"]
        state["world_size"] = int(state.get("world_size", 1))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _damaged(folder, STATE_FILE, exc) from None
    return state


def check_world_size(folder: Path, state: dict, parallel: Parallel) -> None:
    """A checkpoint resumes with the number of processes that saved it (its optimizer state
    is sharded that many ways).

    Raises:
        CheckpointError: another number of processes, saying how to resume it.
    """
    saved = int(state.get("world_size", 1))
    if saved != parallel.world_size:
        how = "plain `lambdapo train`" if saved == 1 else \
            f"`torchrun --nproc-per-node={saved} -m lambdapo train`"
        raise CheckpointError(
            f"checkpoint {folder} was saved by {saved} process{'es' if saved > 1 else ''} and "
            f"this run has {parallel.world_size}: its optimizer state is split {saved} "
            f"way{'s' if saved > 1 else ''}. Resume it with {how}, or start a new run from "
            f"its weights (model.path={folder})")


def load_checkpoint(folder: Path, *, optimizer: torch.optim.Optimizer, scheduler,
                    device: torch.device, parallel: Parallel = SINGLE
                    ) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restores optimizer and scheduler (this rank's shard of the optimizer state with
    several processes); returns (trainer state, this rank's RNG tensors). The model weights
    are loaded by the caller from the same folder (transformers format).

    Raises:
        CheckpointError: a file is missing or cannot be read (naming it), or it was saved
            by another number of processes.
    """
    folder = Path(folder)
    state = read_state(folder)
    check_world_size(folder, state, parallel)
    meta = state["optimizer"]
    last_epoch = int(state["scheduler"]["last_epoch"])
    step_count = int(state["scheduler"]["_step_count"])
    try:
        tensors = load_file(str(folder / optimizer_file(parallel)), device=str(device))
    except (OSError, SafetensorError) as exc:
        raise _damaged(folder, optimizer_file(parallel), exc) from None
    try:
        _load_optimizer(optimizer, tensors, meta)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {folder}: its optimizer state does not fit this "
                              f"model ({exc})") from None
    scheduler.last_epoch = last_epoch
    scheduler._step_count = step_count
    # The optimizer's groups hold the current learning rates; the scheduler reports them.
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    try:
        rng = load_file(str(folder / rng_file(parallel)))
    except (OSError, SafetensorError) as exc:
        raise _damaged(folder, rng_file(parallel), exc) from None
    return state, rng


def load_weights_into(model, folder: Path) -> None:
    """Copies the checkpoint's safetensors weights into ``model`` (same architecture).

    Raises:
        CheckpointError: a weight file cannot be read, or weights are missing.
    """
    from safetensors import safe_open

    folder = Path(folder)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    files = sorted(folder.glob("*.safetensors"))
    files = [f for f in files if not _trainer_file(f.name)]
    if not files:
        raise CheckpointError(f"checkpoint {folder}: no model weights (*.safetensors)")
    seen = set()
    with torch.no_grad():
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():
                        target = params.get(name, buffers.get(name))
                        if target is None:
                            continue
                        target.copy_(f.get_tensor(name))
                        seen.add(name)
            except (OSError, SafetensorError) as exc:
                raise _damaged(folder, file.name, exc) from None
            except RuntimeError as exc:   # a shape that differs from the model's
                raise CheckpointError(f"checkpoint {folder}: {file.name} does not fit the "
                                      f"model ({exc})") from None
    missing = [n for n in params if n not in seen and not _tied(model, n)]
    if missing:
        raise CheckpointError(f"checkpoint {folder} lacks weights {missing[:5]}")


def _tied(model, name: str) -> bool:
    head = model.get_output_embeddings()
    return (head is not None and name.endswith("lm_head.weight")
            and head.weight is model.get_input_embeddings().weight)
