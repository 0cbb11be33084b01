"""Run outputs: ``metrics.jsonl`` (one object per step), TensorBoard events and the PNG of
the curves."""

from __future__ import annotations

import json
from pathlib import Path


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keeps the rows of a per-step JSONL file (``metrics.jsonl``, ``samples.jsonl``) with
    ``step <= last_step``: a resumed run then appends each later step exactly once, and a
    fresh run (``last_step=0``) starts the file empty. A row cut short by a kill is
    dropped."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and \
                row["step"] <= last_step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


class MetricsWriter:
    """Appends step metrics to ``metrics.jsonl`` and TensorBoard (``tensorboard/``).
    A run that starts at ``last_step`` (0: a fresh run) first drops the rows and events of
    later steps (those of a run it resumes, or of an earlier run in the same folder), so
    each step appears once."""

    def __init__(self, run_dir: Path, *, last_step: int = 0):
        self.path = run_dir / "metrics.jsonl"
        truncate_jsonl(self.path, last_step)
        from torch.utils.tensorboard import SummaryWriter

        events = run_dir / "tensorboard"
        if last_step == 0:
            for old in events.glob("events.out.tfevents.*"):
                old.unlink()
        # purge_step: TensorBoard discards the earlier files' events from this step on.
        self.tb = SummaryWriter(str(events), purge_step=last_step + 1 if last_step else None)

    def write(self, metrics: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        self.scalars({k: v for k, v in metrics.items() if k != "step"}, metrics["step"])

    def scalars(self, values: dict, step: int) -> None:
        for key, value in values.items():
            self.tb.add_scalar(key, value, step)

    def flush(self) -> None:
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def ema(values: list[float], span: float) -> list[float]:
    """Exponential moving average with weight ``2 / (span + 1)`` on the newest value,
    started at the first value."""
    alpha = 2.0 / (span + 1.0)
    out, current = [], None
    for value in values:
        current = value if current is None else alpha * value + (1 - alpha) * current
        out.append(current)
    return out


def plot_curves(history: list[dict], eval_history: list[dict], path: Path,
                title: str = "") -> None:
    """Two panels: the training reward and accuracy per step (raw values faint, their
    moving average solid) and the held-out accuracy at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (train_ax, eval_ax) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [m["step"] for m in history]
    span = max(1, round(len(history) / 10))
    for key, label, color in (("reward", "reward", "tab:blue"),
                              ("accuracy", "training accuracy", "tab:orange")):
        values = [m[key] for m in history]
        train_ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        train_ax.plot(steps, ema(values, span), color=color, linewidth=2,
                      label=f"{label} (EMA, span {span})" if span > 1 else label)
    train_ax.set_title("Training batches (faint: per step)")
    train_ax.set_xlabel("step")
    train_ax.set_ylabel("mean over the step's samples")
    train_ax.grid(alpha=0.3)
    train_ax.legend(loc="lower right")
    eval_steps = [e["step"] for e in eval_history]
    accuracy = [e["accuracy"] for e in eval_history]
    eval_ax.plot(eval_steps, accuracy, marker="o", color="tab:green", label="held-out accuracy")
    for x, y in zip(eval_steps, accuracy):
        eval_ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(0, 7),
                         ha="center", fontsize=8)
    eval_ax.set_title("Held-out accuracy")
    eval_ax.set_xlabel("step")
    eval_ax.set_ylabel("accuracy (math_verify, mean over samples)")
    eval_ax.set_ylim(0, 1.05)
    shown = steps + eval_steps   # both panels over the same steps, step 0's evaluation included
    if shown:
        lo, hi = min(shown), max(shown)
        pad = max(0.5, 0.03 * (hi - lo))
        for ax in (train_ax, eval_ax):
            ax.set_xlim(lo - pad, hi + pad)
    eval_ax.grid(alpha=0.3)
    eval_ax.legend(loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
