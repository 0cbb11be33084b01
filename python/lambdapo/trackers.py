"""Experiment trackers a run reports to: the config's ``logger`` list (verl's
``trainer.logger``), any of

* ``console``: a line of key metrics through the ``lambdapo`` log (stderr and
  ``train.log``) every ``console_every`` steps, and one per held-out evaluation;
* ``tensorboard``: event files in ``<run>/tensorboard``;
* ``wandb``: a Weights & Biases run (its files in ``<run>/wandb``; ``WANDB_MODE=offline``
  and W&B's other variables apply);
* ``mlflow``: an MLflow run at ``MLFLOW_TRACKING_URI``, else in a SQLite store in
  ``<run>/mlflow.db``;
* ``trackio``: a Trackio run, stored locally (Trackio's own folder, ``TRACKIO_DIR``).

``metrics.jsonl`` is written whatever the list holds (:class:`lambdapo.metrics.MetricsWriter`,
which fans each row out to these). Each backend's package is imported only when the backend
is selected. Every tracker gets every step's metrics, the held-out evaluations
(``eval/accuracy``, ``eval/reward``) and the config as the run's parameters. A resumed run
continues the same W&B, MLflow and Trackio run: their ids are kept in ``<run>/trackers.json``.
A tracker that fails in the middle of a run is switched off with one warning and the run
goes on; one that cannot start fails the run before its first step.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("lambdapo")

STATE_FILE = "trackers.json"
# The lambdapo log's stderr handler (lambdapo.cli) leaves out records carrying this
# attribute: the console logger's step lines while the progress bar shows the same numbers.
FILE_ONLY = "lambdapo_file_only"
CONSOLE_SECONDS = 30.0


class TrackerError(RuntimeError):
    """A selected tracker could not start."""


@dataclass
class RunInfo:
    """What a tracker needs to know about the run it reports."""
    run_dir: Path
    project: str
    name: str
    params: dict                 # the config, as lambdapo.config.to_dict gives it
    last_step: int = 0           # the step the run starts after (0: a fresh run)
    total_steps: int = 0
    console_every: int = 0
    progress_bar: bool = False   # a progress bar shows each step's reward and accuracy
    state: dict = field(default_factory=dict)   # trackers.json: what earlier starts stored

    @property
    def resuming(self) -> bool:
        return self.last_step > 0

    def stored(self, name: str) -> dict | None:
        """What the backend ``name`` stored when this run started before (None on a fresh
        run, or when it was not used then)."""
        return self.state.get(name) if self.resuming else None

    def store(self, name: str, values: dict) -> None:
        self.state[name] = values
        path = self.run_dir / STATE_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.state, indent=1) + "\n")
        tmp.replace(path)


class Tracker:
    """One backend: ``log`` a step's scalars, ``flush``, ``finish``."""
    name = ""

    def log(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def finish(self, failed: bool = False) -> None:
        pass


def flat_params(tree: dict) -> dict[str, Any]:
    """The config (as :func:`lambdapo.config.to_dict` gives it) as ``section.field``
    parameters: ``{"rollout": {"group_size": 8}}`` -> ``{"rollout.group_size": 8}``; a
    field's list or dict value becomes its JSON text."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for name, item in items:
            flat[key if name is None else f"{key}.{name}"] = \
                json.dumps(item) if isinstance(item, (list, dict)) else item
    return flat


# ------------------------------------------------------------------------------ console
class ConsoleTracker(Tracker):
    """Key metrics as one line through the ``lambdapo`` log: each held-out evaluation, and
    training steps every ``console_every`` steps (0: the first step, the last, and one
    whenever 30 s passed since the last line). While a progress bar shows the steps, the
    step lines go to ``train.log`` only."""
    name = "console"
    KEYS = (("reward", "reward", "{:.3f}"), ("accuracy", "accuracy", "{:.3f}"),
            ("loss", "loss", "{:.4g}"), ("kl", "kl", "{:.4g}"),
            ("entropy", "entropy", "{:.3f}"), ("grad_norm", "grad_norm", "{:.3g}"),
            ("response_length", "length", "{:.1f}"))

    def __init__(self, info: RunInfo, clock: Callable[[], float] = time.monotonic):
        self.total = info.total_steps
        self.every = info.console_every
        self.file_only = info.progress_bar
        self.clock = clock
        self.last_line: float | None = None
        self.step_times: list[float] = []   # of the steps since the last line

    def _due(self, step: int) -> bool:
        if self.every:
            return step % self.every == 0 or step == self.total
        now = self.clock()
        return (self.last_line is None or step >= self.total
                or now - self.last_line >= CONSOLE_SECONDS)

    def log(self, values: dict[str, float], step: int) -> None:
        if "eval/accuracy" in values:
            parts = [f"{key.removeprefix('eval/')} {value:.3f}"
                     for key, value in values.items() if key.startswith("eval/")]
            log.info("eval at step %d: %s", step, ", ".join(parts))
            return
        if "step_time" in values:
            self.step_times.append(values["step_time"])
        if not self._due(step):
            return
        self.last_line = self.clock()
        parts = [f"{label} {fmt.format(values[key])}" for key, label, fmt in self.KEYS
                 if key in values and isinstance(values[key], (int, float))]
        if self.step_times:
            mean = sum(self.step_times) / len(self.step_times)
            parts.append(f"{mean:.2f} s/step")
            left = max(self.total - step, 0)
            if left:
                parts.append(f"{_duration(mean * left)} left")
            self.step_times = []
        log.info("step %d/%d: %s", step, self.total, ", ".join(parts),
                 extra={FILE_ONLY: self.file_only})


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


# ------------------------------------------------------------------------------ tensorboard
class TensorBoardTracker(Tracker):
    """Event files in ``<run>/tensorboard``. A fresh run removes the folder's earlier
    event files; a resumed one has TensorBoard discard the earlier files' events from the
    step it continues at (``purge_step``), so each step appears once."""
    name = "tensorboard"

    def __init__(self, info: RunInfo):
        from torch.utils.tensorboard import SummaryWriter

        events = info.run_dir / "tensorboard"
        if not info.resuming:
            for old in events.glob("events.out.tfevents.*"):
                old.unlink()
        self.writer = SummaryWriter(str(events),
                                    purge_step=info.last_step + 1 if info.resuming else None)
        if not info.resuming:
            self.writer.add_text("config", "```\n" + json.dumps(info.params, indent=1) +
                                 "\n```", 0)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def finish(self, failed: bool = False) -> None:
        self.writer.close()


# ------------------------------------------------------------------------------ wandb
class WandbTracker(Tracker):
    """A W&B run in project ``project_name`` named ``experiment_name``, its local files in
    ``<run>/wandb`` unless ``WANDB_DIR`` says otherwise. W&B's own variables apply
    (``WANDB_MODE=offline``, ``WANDB_ENTITY``, ``WANDB_API_KEY`` ...). Metrics are plotted
    against ``step`` (W&B's x-axis for every key), so steps that a resumed run repeats
    after a kill are not dropped. A resumed run continues the W&B run of the same id."""
    name = "wandb"

    def __init__(self, info: RunInfo):
        import wandb

        stored = info.stored(self.name) or {}
        run_id = stored.get("id") or uuid.uuid4().hex[:12]
        directory = os.environ.get("WANDB_DIR") or str(info.run_dir)
        Path(directory).mkdir(parents=True, exist_ok=True)
        if info.resuming and not stored:
            log.info("logger wandb: the run had no W&B run to continue; starting a new one")
        self.run = wandb.init(project=info.project, name=info.name, id=run_id,
                              resume="allow" if stored else None, dir=directory,
                              config=info.params, allow_val_change=bool(stored),
                              reinit="create_new")
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        info.store(self.name, {"id": self.run.id, "project": info.project})
        where = (f"offline, upload it with `wandb sync {self.run.settings.sync_dir}`"
                 if self.run.offline else self.run.url or f"mode {self.run.settings.mode}")
        log.info("logger wandb: %s run %s (%s)", "continuing" if stored else "started",
                 self.run.id, where)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log({**values, "step": step})

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


# ------------------------------------------------------------------------------ mlflow
class MlflowTracker(Tracker):
    """An MLflow run in experiment ``project_name`` named ``experiment_name``, at
    ``MLFLOW_TRACKING_URI``, else in a SQLite store in the run folder
    (``sqlite:///<run>/mlflow.db``, MLflow's local backend since its file store went into
    maintenance; nothing leaves the machine unless asked). The config's fields are the
    run's parameters. A resumed run continues the MLflow run of the stored id when the
    tracking URI is the same."""
    name = "mlflow"
    BATCH = 1000    # MLflow's limit of metrics per log_batch call
    PARAM_BATCH = 100

    def __init__(self, info: RunInfo):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        own = not os.environ.get("MLFLOW_TRACKING_URI")
        uri = os.environ.get("MLFLOW_TRACKING_URI") or \
            f"sqlite:///{(info.run_dir / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        stored = info.stored(self.name) or {}
        continuing = bool(stored.get("run_id")) and stored.get("tracking_uri") == uri
        if continuing:
            run = self.client.get_run(stored["run_id"])
            self.client.update_run(run.info.run_id, status="RUNNING")
        else:
            if info.resuming:
                log.info("logger mlflow: the run had no MLflow run at %s to continue; "
                         "starting a new one", uri)
            experiment = self.client.get_experiment_by_name(info.project)
            if experiment is not None:
                experiment_id = experiment.experiment_id
            else:   # artifacts beside the run's own store, not in the working directory
                artifacts = (info.run_dir / "mlartifacts").resolve().as_uri() if own else None
                experiment_id = self.client.create_experiment(info.project,
                                                              artifact_location=artifacts)
            run = self.client.create_run(experiment_id, run_name=info.name,
                                         tags={"lambdapo.output_dir": str(info.run_dir)})
        self.run_id = run.info.run_id
        # A parameter cannot change its value: a resumed run logs only the new ones.
        known = run.data.params
        params = [Param(key, _param_text(value))
                  for key, value in flat_params(info.params).items() if key not in known]
        for start in range(0, len(params), self.PARAM_BATCH):
            self.client.log_batch(self.run_id, params=params[start:start + self.PARAM_BATCH])
        info.store(self.name, {"run_id": self.run_id, "tracking_uri": uri})
        log.info("logger mlflow: %s run %s at %s", "continuing" if continuing else "started",
                 self.run_id, uri)

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_MLFLOW_KEY.sub("_", key), float(value), now, step)
                   for key, value in values.items()]
        for start in range(0, len(metrics), self.BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + self.BATCH])

    def finish(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


# What MLflow accepts in a metric name (a reward function's name may hold other characters).
_MLFLOW_KEY = re.compile(r"[^/\w.\- :]")


def _param_text(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


# ------------------------------------------------------------------------------ trackio
class TrackioTracker(Tracker):
    """A Trackio run in project ``project_name`` named ``experiment_name``, stored on this
    machine (Trackio's folder; ``TRACKIO_DIR`` moves it). A resumed run continues the
    Trackio run of the same name."""
    name = "trackio"

    def __init__(self, info: RunInfo):
        import trackio

        stored = info.stored(self.name) or {}
        if info.resuming and not stored:
            log.info("logger trackio: the run had no Trackio run to continue; starting a new "
                     "one")
        self.trackio = trackio
        self.run = trackio.init(project=info.project, name=stored.get("name", info.name),
                                config=info.params, resume="allow" if stored else "never")
        info.store(self.name, {"project": info.project, "name": self.run.name})
        log.info("logger trackio: %s run %s in project %s (see it with `trackio show "
                 "--project %s`)", "continuing" if stored else "started", self.run.name,
                 info.project, info.project)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def finish(self, failed: bool = False) -> None:
        # trackio.finish() also forgets the run (else Trackio finishes it again at exit).
        current = getattr(getattr(self.trackio, "context_vars", None), "current_run", None)
        if current is not None and current.get() is self.run:
            self.trackio.finish()
        else:
            self.run.finish()


# ------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class Backend:
    make: Callable[[RunInfo], Tracker]
    module: str | None      # imported only when the backend is selected
    package: str | None     # what pip installs it as


BACKENDS: dict[str, Backend] = {
    "console": Backend(ConsoleTracker, None, None),
    "tensorboard": Backend(TensorBoardTracker, "tensorboard", "tensorboard"),
    "wandb": Backend(WandbTracker, "wandb", "wandb"),
    "mlflow": Backend(MlflowTracker, "mlflow", "mlflow"),
    "trackio": Backend(TrackioTracker, "trackio", "trackio"),
}


def selected(names: list[str]) -> list[str]:
    """``names`` in order, each once."""
    return list(dict.fromkeys(names))


def check_installed(names: list[str]) -> None:
    """Raises ValueError naming ``logger`` and the pip package for each selected backend
    whose package is not installed."""
    missing = [name for name in selected(names)
               if BACKENDS[name].module and importlib.util.find_spec(BACKENDS[name].module) is None]
    if missing:
        packages = " ".join(BACKENDS[name].package for name in missing)
        raise ValueError(f"config logger: {', '.join(missing)} selected but not installed: "
                         f"pip install {packages} (or pip install 'lambdapo[trackers]'), or "
                         f"leave {'it' if len(missing) == 1 else 'them'} out of logger")


class Trackers:
    """The run's trackers: each call goes to every one still working. A tracker that
    raises is reported once (a warning naming it and the step) and left out from then on;
    the others and ``metrics.jsonl`` go on."""

    def __init__(self, names: list[str], info: RunInfo):
        check_installed(names)
        state = info.run_dir / STATE_FILE
        info.state = {}
        if state.exists() and info.resuming:
            try:
                info.state = json.loads(state.read_text())
            except ValueError:
                log.warning("%s cannot be read; the trackers start new runs", state)
        elif state.exists():   # an earlier run's, in the folder a fresh run starts over in
            state.unlink()
        self.active: list[Tracker] = []
        for name in selected(names):
            try:
                self.active.append(BACKENDS[name].make(info))
            except Exception as exc:
                self.finish(failed=True)
                raise TrackerError(f"logger {name}: could not start: "
                                   f"{type(exc).__name__}: {exc}".rstrip()) from exc

    @property
    def names(self) -> list[str]:
        return [tracker.name for tracker in self.active]

    def _each(self, what: str, call: Callable[[Tracker], None]) -> None:
        for tracker in list(self.active):
            try:
                call(tracker)
            except Exception as exc:  # noqa: BLE001 - a tracker must not end the run
                self.active.remove(tracker)
                log.warning("logger %s failed %s (%s: %s); it is off for the rest of this "
                            "run, the other loggers and metrics.jsonl go on", tracker.name,
                            what, type(exc).__name__, exc)

    def log(self, values: dict[str, float], step: int) -> None:
        self._each(f"at step {step}", lambda tracker: tracker.log(values, step))

    def flush(self) -> None:
        self._each("flushing", lambda tracker: tracker.flush())

    def finish(self, failed: bool = False) -> None:
        self._each("finishing", lambda tracker: tracker.finish(failed))
        self.active = []


__all__ = ["BACKENDS", "RunInfo", "Tracker", "Trackers", "TrackerError", "check_installed",
           "flat_params"]
