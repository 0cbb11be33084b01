"""Checkpoints without pickle: model and tokenizer in transformers format (safetensors),
optimizer tensors and RNG states in safetensors files, everything else in JSON.

A checkpoint is written into ``checkpoints/.tmp-step-N`` and renamed to
``checkpoints/step-N`` only once complete; ``checkpoints/latest`` (a one-line file,
replaced atomically) then names it. A save killed half-way leaves the previous latest
checkpoint untouched and only a ``.tmp-*`` folder behind, removed by the next save.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
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


def save_checkpoint(run_dir: Path, step: int, *, model, tokenizer,
                    optimizer: torch.optim.Optimizer, scheduler, rng: dict[str, torch.Tensor],
                    state: dict) -> Path:
    """Writes checkpoint ``step`` atomically and points ``latest`` at it."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-step-{step}"
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tensors, meta = _optimizer_tensors(optimizer)
    save_file(tensors, str(tmp / OPTIMIZER_FILE))
    save_file({k: v.cpu().contiguous() for k, v in rng.items()}, str(tmp / RNG_FILE))
    full_state = {**state, "step": step, "optimizer": meta,
                  "scheduler": {"last_epoch": scheduler.last_epoch,
                                "_step_count": scheduler._step_count}}
    (tmp / STATE_FILE).write_text(json.dumps(full_state, indent=1))
    _fsync_tree(tmp)
    final = root / f"step-{step}"
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    pointer = root / ".latest.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, root / "latest")
    return final


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, a run directory (its latest checkpoint) or its checkpoints/."""
    path = Path(path)
    for root in (path / "checkpoints", path):
        if (root / "latest").exists():
            return root / (root / "latest").read_text().strip()
    if (path / STATE_FILE).exists():
        return path
    raise FileNotFoundError(f"--resume {path}: no checkpoint there (no checkpoints/latest "
                            f"and no {STATE_FILE})")


def load_checkpoint(folder: Path, *, optimizer: torch.optim.Optimizer, scheduler,
                    device: torch.device) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restores optimizer and scheduler; returns (trainer state, RNG tensors). The model
    weights are loaded by the caller from the same folder (transformers format)."""
    state = json.loads((folder / STATE_FILE).read_text())
    tensors = load_file(str(folder / OPTIMIZER_FILE), device=str(device))
    _load_optimizer(optimizer, tensors, state["optimizer"])
    scheduler.last_epoch = state["scheduler"]["last_epoch"]
    scheduler._step_count = state["scheduler"]["_step_count"]
    # The optimizer's groups hold the current learning rates; the scheduler reports them.
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return state, load_file(str(folder / RNG_FILE))


def load_weights_into(model, folder: Path) -> None:
    """Copies the checkpoint's safetensors weights into ``model`` (same architecture)."""
    from safetensors import safe_open

    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    files = sorted(folder.glob("*.safetensors"))
    files = [f for f in files if f.name not in (OPTIMIZER_FILE, RNG_FILE)]
    seen = set()
    with torch.no_grad():
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    target = params.get(name, buffers.get(name))
                    if target is None:
                        continue
                    target.copy_(f.get_tensor(name))
                    seen.add(name)
    missing = [n for n in params if n not in seen and not _tied(model, n)]
    if missing:
        raise ValueError(f"checkpoint {folder} lacks weights {missing[:5]}")


def _tied(model, name: str) -> bool:
    head = model.get_output_embeddings()
    return (head is not None and name.endswith("lm_head.weight")
            and head.weight is model.get_input_embeddings().weight)
