"""``lambdapo compare``: the same training budget with several advantage estimators over
several seeds; writes ``compare.md`` (held-out accuracy before/after, mean and spread over
seeds, time) and ``compare.png`` (training accuracy per step, mean over seeds)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from . import config as config_lib
from .metrics import read_metrics


def run_comparison(config_path: str | None, overrides: list[str], *, estimators: list[str],
                   seeds: int, output: Path) -> Path:
    """Trains every (estimator, seed) into ``output/<estimator>-seed<k>`` (runs already
    finished are reused) and writes the report; returns the report's path."""
    from .trainer import Trainer

    output.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    for estimator in estimators:
        for seed in range(seeds):
            run_dir = output / f"{estimator}-seed{seed}"
            summary_path = run_dir / "summary.json"
            if not summary_path.exists():
                config = config_lib.load_config(config_path, list(overrides) + [
                    f"algorithm.adv_estimator={estimator}", f"seed={seed}",
                    f"output_dir={run_dir}"])
                with Trainer(config, progress=True) as trainer:
                    trainer.train()
            summary = json.loads(summary_path.read_text())
            summary["curve"] = [(m["step"], m["accuracy"]) for m in read_metrics(run_dir)]
            results.setdefault(estimator, []).append(summary)
    report = output / "compare.md"
    report.write_text(_table(results))
    _plot(results, output / "compare.png")
    print(report.read_text())
    return report


def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}"


def _table(results: dict[str, list[dict]]) -> str:
    lines = ["| estimator | seeds | held-out before | held-out after | gain | seconds |",
             "|---|---:|---:|---:|---:|---:|"]
    for estimator, runs in results.items():
        gains = [r["accuracy_after"] - r["accuracy_before"] for r in runs]
        lines.append(f"| {estimator} | {len(runs)} | "
                     f"{_spread([r['accuracy_before'] for r in runs])} | "
                     f"{_spread([r['accuracy_after'] for r in runs])} | {_spread(gains)} | "
                     f"{statistics.fmean(r['seconds'] for r in runs):.0f} |")
    return "\n".join(lines) + "\n"


def _plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for estimator, runs in results.items():
        steps = [s for s, _ in runs[0]["curve"]]
        curves = [[a for _, a in r["curve"]][:len(steps)] for r in runs]
        mean = [statistics.fmean(values) for values in zip(*curves)]
        ax.plot(steps[:len(mean)], mean, label=estimator)
    ax.set_xlabel("step")
    ax.set_ylabel("training accuracy (mean over seeds)")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
