"""Run outputs: ``metrics.jsonl`` (one object per step), TensorBoard events and the PNG of
the curves."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsWriter:
    """Appends step metrics to ``metrics.jsonl`` and TensorBoard (``tensorboard/``).
    A resumed run first drops rows after its checkpoint, so the file stays one row per
    step."""

    def __init__(self, run_dir: Path, *, resume: bool, last_step: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        if not resume and self.path.exists():
            self.path.unlink()
        if resume and last_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= last_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, metrics: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        self.scalars({k: v for k, v in metrics.items() if k != "step"}, metrics["step"])

    def scalars(self, values: dict, step: int) -> None:
        for key, value in values.items():
            self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        self.tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def plot_curves(history: list[dict], eval_history: list[dict], path: Path) -> None:
    """Training reward and accuracy per step, held-out accuracy at its evaluations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [m["step"] for m in history]
    axes[0].plot(steps, [m["reward"] for m in history], label="reward")
    axes[0].plot(steps, [m["accuracy"] for m in history], label="train accuracy")
    axes[0].set_xlabel("step")
    axes[0].legend()
    axes[1].plot([e["step"] for e in eval_history], [e["accuracy"] for e in eval_history],
                 marker="o", label="held-out accuracy")
    axes[1].set_xlabel("step")
    axes[1].set_ylim(0, 1)
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
