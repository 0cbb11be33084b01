"""``lambdapo compare``: several methods at the same training budget over several seeds.

A *method* is a named set of config overrides (:data:`METHODS`). Every (method, seed) run is
a ``lambdapo train`` process of its own with one torch thread, several at a time (default:
one per core), trained into ``<output>/<method>/seed<k>``; a run whose ``summary.json``
exists is never rerun, so a comparison can be resumed, or extended with more seeds or
methods. The report (``compare.md``, ``compare.json``) gives per method the mean held-out
gain over seeds with its standard deviation and 95% confidence interval, and a paired
comparison against a baseline method on the seeds both ran; ``compare.png`` draws the
held-out accuracy curves (mean and 95% band over seeds).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from . import config as config_lib

# Overrides of each method; a callable receives the base config (for methods whose overrides
# depend on it). 2-GRPO ("It Takes Two: Your GRPO Is Secretly DPO", arXiv 2510.00977) is
# GRPO with groups of 2 and proportionally more prompts, so that every method samples the
# same number of completions per step.
MethodOverrides = list[str] | Callable[[config_lib.TrainConfig], list[str]]


def _two_grpo(base: config_lib.TrainConfig) -> list[str]:
    completions = base.prompts_per_step * base.rollout.group_size
    return ["algorithm.adv_estimator=grpo", "rollout.group_size=2",
            f"prompts_per_step={max(1, completions // 2)}"]


METHODS: dict[str, MethodOverrides] = {
    "lambdapo-b0.5": ["algorithm.adv_estimator=lambdapo", "algorithm.lambda_beta=0.5"],
    "lambdapo": ["algorithm.adv_estimator=lambdapo", "algorithm.lambda_beta=1.0"],
    "lambdapo-b2": ["algorithm.adv_estimator=lambdapo", "algorithm.lambda_beta=2.0"],
    "lambdapo-sd0": ["algorithm.adv_estimator=lambdapo", "reward.lambda_sd=0"],
    "grpo": ["algorithm.adv_estimator=grpo"],
    "dr_grpo": ["algorithm.adv_estimator=dr_grpo"],
    "rloo": ["algorithm.adv_estimator=rloo"],
    "2-grpo": _two_grpo,
}
DEFAULT_METHODS = ["lambdapo-b0.5", "lambdapo", "lambdapo-b2", "grpo", "dr_grpo", "rloo",
                   "2-grpo"]
DEFAULT_BASELINE = "grpo"


# ------------------------------------------------------------------------------ statistics

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, for 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t distribution with ``df`` degrees of freedom."""
    tail = 0.5 * _incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on the
    CDF; exact to ~1e-12).

    Raises:
        ValueError: ``p`` not in (0, 1) or ``df`` <= 0.
    """
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"t_quantile: need 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass
class Estimate:
    """Mean of ``n`` values with its sample standard deviation and the half-width of its
    two-sided 95% Student-t confidence interval (NaN for n < 2)."""

    n: int
    mean: float
    std: float
    ci95: float

    @property
    def low(self) -> float:
        return self.mean - self.ci95

    @property
    def high(self) -> float:
        return self.mean + self.ci95

    @property
    def significant(self) -> bool:
        """Whether the 95% interval excludes 0."""
        return self.n >= 2 and (self.low > 0 or self.high < 0)


def estimate(values: list[float]) -> Estimate:
    """:class:`Estimate` of ``values`` (at least one).

    Raises:
        ValueError: ``values`` is empty.
    """
    if not values:
        raise ValueError("estimate: no values")
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return Estimate(n, mean, 0.0, math.nan)
    std = statistics.stdev(values)
    return Estimate(n, mean, std, t_quantile(0.975, n - 1) * std / math.sqrt(n))


# ------------------------------------------------------------------------------ runs

@dataclass
class Run:
    method: str
    seed: int
    directory: Path

    @property
    def summary_path(self) -> Path:
        return self.directory / "summary.json"

    @property
    def done(self) -> bool:
        return self.summary_path.exists()


def method_overrides(name: str, base: config_lib.TrainConfig,
                     custom: dict[str, list[str]] | None = None) -> list[str]:
    """The config overrides of method ``name`` (a custom one, or one of :data:`METHODS`).

    Raises:
        ValueError: unknown method name.
    """
    custom = custom or {}
    if name in custom:
        return list(custom[name])
    if name not in METHODS:
        raise ValueError(f"compare: unknown method {name!r}; built-in methods: "
                         f"{', '.join(METHODS)} (or define one with --method NAME:key=value,...)")
    overrides = METHODS[name]
    return overrides(base) if callable(overrides) else list(overrides)


def parse_method(text: str) -> tuple[str, list[str]]:
    """``NAME:key=value,key=value`` -> (NAME, [key=value, ...]).

    Raises:
        ValueError: malformed text (the message quotes it).
    """
    name, sep, body = text.partition(":")
    overrides = [item.strip() for item in body.split(",") if item.strip()]
    if not sep or not name.strip() or not overrides or any("=" not in o for o in overrides):
        raise ValueError(f"--method must look like NAME:section.field=value,..., got {text!r}")
    return name.strip(), overrides


def _train_command(run: Run, config_path: str | None, overrides: list[str]) -> list[str]:
    command = [sys.executable, "-m", "lambdapo.cli", "train", "--quiet"]
    if config_path:
        command += ["--config", config_path]
    if (run.directory / "checkpoints" / "latest").exists():
        command += ["--resume", str(run.directory)]
    return command + overrides + ["threads=1", f"seed={run.seed}", f"output_dir={run.directory}"]


CONSOLE_LOG = "console.log"


def _execute(run: Run, command: list[str]) -> str | None:
    """Runs one training process (its output in the run's ``console.log``; the run's own
    log is its ``train.log``); returns None on success, else the error to report."""
    run.directory.mkdir(parents=True, exist_ok=True)
    log = run.directory / CONSOLE_LOG
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with log.open("a") as out:
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                               stdin=subprocess.DEVNULL)
    if code != 0 or not run.done:
        tail = log.read_text().strip().splitlines()[-3:]
        return f"{run.method} seed {run.seed} failed (exit {code}; {log}): " + " | ".join(tail)
    return None


def run_comparison(config_path: str | None, overrides: list[str], *, methods: list[str],
                   seeds: int, output: Path, baseline: str = DEFAULT_BASELINE,
                   jobs: int | None = None, custom_methods: dict[str, list[str]] | None = None,
                   ) -> Path:
    """Trains every missing (method, seed) run, then writes and prints the report.

    Args:
        config_path: YAML base config (or None for the defaults).
        overrides: base ``section.field=value`` overrides shared by all methods.
        methods: method names (built-in or in ``custom_methods``).
        seeds: seeds 0..seeds-1 per method.
        output: folder of the runs and the report.
        baseline: method the paired differences are taken against (if among ``methods``).
        jobs: training processes at a time (default: the number of cores).
        custom_methods: extra methods, name -> overrides.

    Returns:
        The path of ``compare.md``.

    Raises:
        ValueError: unknown method, seeds < 1, an output folder holding a comparison with
            other base settings, or failed runs (after all others finished).
    """
    if seeds < 1:
        raise ValueError(f"compare: --seeds must be >= 1, got {seeds}")
    base = config_lib.load_config(config_path, list(overrides))
    plan = {name: method_overrides(name, base, custom_methods) for name in methods}
    for name, extra in plan.items():  # fail fast on a bad override, before any training
        config_lib.load_config(config_path, list(overrides) + extra)
    output.mkdir(parents=True, exist_ok=True)
    settings = {"config": config_path, "overrides": list(overrides)}
    settings_path = output / "settings.json"
    if settings_path.exists():
        previous = json.loads(settings_path.read_text())
        if previous != settings:
            raise ValueError(f"compare: {output} holds a comparison with other base settings "
                             f"({previous}); use another --output")
    else:
        settings_path.write_text(json.dumps(settings, indent=1))

    runs = [Run(name, seed, output / name / f"seed{seed}") for name in methods
            for seed in range(seeds)]
    todo = [run for run in runs if not run.done]
    jobs = max(1, jobs or os.cpu_count() or 1)
    if todo:
        print(f"compare: {len(todo)} of {len(runs)} runs to train, {jobs} at a time; each "
              f"run's folder is {output}/<method>/seed<k>", flush=True)
    errors = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(_execute, run, _train_command(
            run, config_path, list(overrides) + plan[run.method])): run for run in todo}
        for finished, future in enumerate(as_completed(futures), 1):
            run, error = futures[future], future.result()
            if error:
                errors.append(error)
            print(f"compare: [{finished}/{len(todo)}] {_progress_line(run, error)}",
                  flush=True)
    results = {name: [json.loads(run.summary_path.read_text()) | {"seed": run.seed}
                      for run in runs if run.method == name and run.done] for name in methods}
    report = write_report(results, output, baseline=baseline)
    print(report.read_text())
    if errors:
        raise ValueError("compare: " + "; ".join(errors))
    return report


def _progress_line(run: Run, error: str | None) -> str:
    """One finished run: its held-out accuracy before and after, time and logs."""
    logs = f"{run.directory / 'train.log'}, {run.directory / CONSOLE_LOG}"
    if error:
        return f"{run.method} seed {run.seed}: FAILED (logs: {logs})"
    summary = json.loads(run.summary_path.read_text())
    return (f"{run.method} seed {run.seed}: held-out accuracy {summary['accuracy_before']:.2f}"
            f" -> {summary['accuracy_after']:.2f} in {summary['seconds']:.0f} s (logs: {logs})")


# ------------------------------------------------------------------------------ report

def _gain(summary: dict) -> float:
    return summary["accuracy_after"] - summary["accuracy_before"]


def summarize(results: dict[str, list[dict]], baseline: str) -> dict:
    """Per-method statistics (gain, before, after, seconds) and paired differences of the
    gain against ``baseline`` on the seeds both have, as plain numbers."""
    table = {}
    base_gain = {s["seed"]: _gain(s) for s in results.get(baseline, [])}
    for name, runs in results.items():
        if not runs:
            continue
        entry = {key: vars(estimate([f(r) for r in runs])) for key, f in (
            ("gain", _gain), ("before", lambda r: r["accuracy_before"]),
            ("after", lambda r: r["accuracy_after"]), ("seconds", lambda r: r["seconds"]))}
        entry["seeds"] = sorted(r["seed"] for r in runs)
        paired = [_gain(r) - base_gain[r["seed"]] for r in runs if r["seed"] in base_gain]
        if name != baseline and paired:
            diff = estimate(paired)
            entry["vs_baseline"] = vars(diff) | {"significant": diff.significant}
        table[name] = entry
    return {"baseline": baseline, "methods": table}


def _fmt(e: dict, digits: int = 3) -> str:
    return f"{e['mean']:.{digits}f} ± {e['std']:.{digits}f}"


def _interval(e: dict) -> str:
    if math.isnan(e["ci95"]):
        return "n/a (1 seed)"
    return f"[{e['mean'] - e['ci95']:+.3f}, {e['mean'] + e['ci95']:+.3f}]"


def report_markdown(summary: dict) -> str:
    """The comparison table: mean ± std over seeds, 95% interval of the gain, paired
    difference to the baseline with its interval and whether it excludes 0."""
    baseline = summary["baseline"]
    lines = [f"| method | seeds | held-out before | held-out after | gain | gain 95% CI | "
             f"gain - {baseline} (paired) | 95% CI | significant | seconds |",
             "|---|---:|---:|---:|---:|---|---:|---|---|---:|"]
    for name, e in summary["methods"].items():
        paired = e.get("vs_baseline")
        versus = ("(baseline)", "", "") if name == baseline else (
            (f"{paired['mean']:+.3f}", _interval(paired), "yes" if paired["significant"] else "no")
            if paired else ("n/a", "", ""))
        lines.append(f"| {name} | {e['gain']['n']} | {_fmt(e['before'])} | {_fmt(e['after'])} | "
                     f"{_fmt(e['gain'])} | {_interval(e['gain'])} | {' | '.join(versus)} | "
                     f"{e['seconds']['mean']:.0f} |")
    return "\n".join(lines) + "\n"


def write_report(results: dict[str, list[dict]], output: Path, *, baseline: str) -> Path:
    """Writes compare.md, compare.json and compare.png into ``output``; returns compare.md."""
    summary = summarize(results, baseline)
    (output / "compare.json").write_text(json.dumps(summary, indent=1))
    report = output / "compare.md"
    report.write_text(report_markdown(summary))
    plot_comparison(results, output / "compare.png")
    return report


def _held_out_curve(summary: dict) -> list[tuple[int, float]]:
    history = summary.get("eval_history") or [
        {"step": 0, "accuracy": summary["accuracy_before"]},
        {"step": summary["steps"], "accuracy": summary["accuracy_after"]}]
    return [(int(e["step"]), float(e["accuracy"])) for e in history]


def plot_comparison(results: dict[str, list[dict]], path: Path) -> None:
    """Held-out accuracy against training step per method: the mean over seeds and a 95%
    band (at the steps every seed evaluated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, runs in results.items():
        if not runs:
            continue
        curves = [dict(_held_out_curve(r)) for r in runs]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        stats = [estimate([c[s] for c in curves]) for s in steps]
        mean = [e.mean for e in stats]
        line, = ax.plot(steps, mean, marker="o", markersize=3, label=f"{name} ({len(runs)} seeds)")
        if len(runs) > 1:
            ax.fill_between(steps, [e.low for e in stats], [e.high for e in stats],
                            color=line.get_color(), alpha=0.15)
    ax.set_title("Held-out accuracy during training (mean over seeds, 95% band)")
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    if any(results.values()):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
