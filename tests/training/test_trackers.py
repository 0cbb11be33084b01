"""The experiment trackers of ``logger`` (lambdapo.trackers), all offline: the fan-out and
its failure rules on fakes; console and TensorBoard always; W&B in offline mode, MLflow
with its local stores (the SQLite default in the run folder, and a ``file:`` store) and
Trackio in a local folder, each on a real short run that is then resumed. A test whose
tracker package is missing is skipped with the reason (``pytest -rs`` prints it), unless
LAMBDAPO_REQUIRE_TRACKERS=1 (CI), where that is a failure."""

import importlib.util
import json
import logging
import os
import struct
from pathlib import Path

import pytest

from lambdapo import cli, trackers
from lambdapo.config import config_changes, load_config, to_dict
from lambdapo.metrics import MetricsWriter
from lambdapo.trackers import (BACKENDS, FILE_ONLY, Backend, ConsoleTracker, RunInfo, Tracker,
                               TrackerError, Trackers, check_installed)
from lambdapo.trainer import Trainer
from test_loop import overrides, workspace  # noqa: F401 - the shared model and data

REQUIRED = os.environ.get("LAMBDAPO_REQUIRE_TRACKERS") == "1"
PROJECT = "lambdapo-tests"


def need(package: str) -> None:
    if importlib.util.find_spec(package) is None:
        message = (f"{package} is not installed (pip install {package}, or "
                   f"pip install 'lambdapo[trackers]')")
        if REQUIRED:
            pytest.fail(message + " and LAMBDAPO_REQUIRE_TRACKERS=1")
        pytest.skip(message)


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def messages(self, level=logging.INFO):
        return [r.getMessage() for r in self.records if r.levelno == level]


@pytest.fixture
def lambdapo_log():
    handler = Records()
    root = logging.getLogger("lambdapo")
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield handler
    root.removeHandler(handler)
    root.setLevel(level)


# ------------------------------------------------------------------------ fakes
class Fake(Tracker):
    """Records its calls; raises in ``log`` from step ``fail_from`` on."""
    made: list["Fake"] = []

    def __init__(self, info, name="fake", fail_from=None):
        self.name, self.fail_from = name, fail_from
        self.logged, self.finished = [], None
        Fake.made.append(self)

    def log(self, values, step):
        if self.fail_from is not None and step >= self.fail_from:
            raise RuntimeError("the tracker's server went away")
        self.logged.append((step, dict(values)))

    def finish(self, failed=False):
        self.finished = failed


def info_for(tmp_path, last_step=0, **kwargs):
    return RunInfo(tmp_path, PROJECT, "test-run", {"steps": 3, "rollout": {"group_size": 4}},
                   last_step=last_step, total_steps=3, **kwargs)


def test_logger_field_is_checked_and_may_change_on_resume():
    assert load_config(None, []).logger == ["console", "tensorboard"]
    assert load_config(None, ["logger=[console,wandb]"]).logger == ["console", "wandb"]
    assert load_config(None, ["logger=mlflow"]).logger == ["mlflow"]
    assert load_config(None, ["logger=[]"]).logger == []
    with pytest.raises(ValueError, match=r"config logger: 'nope' is not one of"):
        load_config(None, ["logger=[console,nope]"])
    with pytest.raises(ValueError, match=r"logger=\[console,wandb\]"):
        load_config(None, ["logger=console,wandb"])
    before = to_dict(load_config(None, []))
    after = to_dict(load_config(None, ["logger=[wandb]", "project_name=p", "console_every=5"]))
    breaking, harmless = config_changes(before, after)
    assert not breaking and len(harmless) == 3


def test_a_missing_package_names_logger_and_the_pip_package(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("wandb", "trackio") else real(name, *a))
    with pytest.raises(ValueError) as error:
        check_installed(["console", "wandb", "trackio"])
    assert "config logger: wandb, trackio" in str(error.value)
    assert "pip install wandb trackio" in str(error.value)
    check_installed(["console", "tensorboard"])
    # The command line says so before it loads a model, in one line.
    run = tmp_path / "run"
    assert cli.main(["train", "logger=[console,wandb]", f"output_dir={run}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config logger: wandb" in err[0] and "pip install wandb" in err[0]
    assert not run.exists()


def test_a_tracker_that_cannot_start_fails_the_start_and_finishes_the_others(monkeypatch,
                                                                             tmp_path):
    Fake.made = []

    def broken(info):
        raise ConnectionError("no route to the tracking server")
    monkeypatch.setitem(BACKENDS, "fake", Backend(Fake, None, None))
    monkeypatch.setitem(BACKENDS, "broken", Backend(broken, None, None))
    with pytest.raises(TrackerError, match="logger broken: could not start: ConnectionError"):
        Trackers(["fake", "broken"], info_for(tmp_path))
    assert Fake.made[0].finished is True   # finished, as failed


def test_a_tracker_failing_midway_is_warned_about_once_and_left_out(monkeypatch, tmp_path,
                                                                   lambdapo_log):
    Fake.made = []
    monkeypatch.setitem(BACKENDS, "fake", Backend(Fake, None, None))
    monkeypatch.setitem(BACKENDS, "flaky", Backend(
        lambda info: Fake(info, "flaky", fail_from=2), None, None))
    group = Trackers(["fake", "flaky", "fake"], info_for(tmp_path))
    good, flaky = Fake.made   # a name listed twice makes one tracker
    for step in (1, 2, 3):
        group.log({"reward": 0.5}, step)
    group.finish()
    assert [step for step, _ in good.logged] == [1, 2, 3] and good.finished is False
    assert [step for step, _ in flaky.logged] == [1] and flaky.finished is None
    warnings = lambdapo_log.messages(logging.WARNING)
    assert len(warnings) == 1
    assert "logger flaky failed at step 2 (RuntimeError: the tracker's server went away)" in \
        warnings[0] and "the other loggers and metrics.jsonl go on" in warnings[0]


def test_console_lines_come_at_their_cadence(tmp_path, lambdapo_log):
    now = [100.0]
    console = ConsoleTracker(info_for(tmp_path), clock=lambda: now[0])
    row = {"reward": 0.25, "accuracy": 0.5, "loss": 0.01, "step_time": 2.0,
           "response_length": 7.0}
    console.log({"eval/accuracy": 0.4, "eval/reward": 0.45}, 0)
    for step, at in ((1, 100.0), (2, 110.0), (3, 131.0)):
        now[0] = at
        console.log(row, step)
    assert lambdapo_log.messages() == [
        "eval at step 0: accuracy 0.400, reward 0.450",
        "step 1/3: reward 0.250, accuracy 0.500, loss 0.01, length 7.0, 2.00 s/step, 4 s left",
        "step 3/3: reward 0.250, accuracy 0.500, loss 0.01, length 7.0, 2.00 s/step"]
    assert not any(getattr(r, FILE_ONLY) for r in lambdapo_log.records
                   if r.getMessage().startswith("step"))
    # Every N steps (and the last); with a progress bar the step lines go to train.log only.
    lambdapo_log.records.clear()
    console = ConsoleTracker(info_for(tmp_path, console_every=2, progress_bar=True))
    for step in (1, 2, 3):
        console.log(row, step)
    lines = [r for r in lambdapo_log.records]
    assert [r.getMessage().split(":")[0] for r in lines] == ["step 2/3", "step 3/3"]
    assert all(getattr(r, FILE_ONLY) for r in lines)


def test_the_command_lines_stderr_leaves_out_what_the_progress_bar_shows(capsys):
    handler = cli._ConsoleLog(logging.INFO)
    shown = logging.LogRecord("lambdapo", logging.INFO, "", 0, "eval at step 0", None, None)
    hidden = logging.LogRecord("lambdapo", logging.INFO, "", 0, "step 1/3", None, None)
    setattr(hidden, FILE_ONLY, True)
    handler.emit(shown)
    handler.emit(hidden)
    assert capsys.readouterr().err == "lambdapo: eval at step 0\n"


def test_with_no_logger_metrics_jsonl_is_still_written(tmp_path):
    config = load_config(None, ["logger=[]", f"output_dir={tmp_path}"])
    writer = MetricsWriter(tmp_path, config=config)
    writer.write({"step": 1, "reward": 0.5})
    writer.scalars({"eval/accuracy": 0.25}, 1)
    writer.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "reward": 0.5}]
    assert not (tmp_path / "tensorboard").exists()
    assert not (tmp_path / trackers.STATE_FILE).exists()


def test_mlflow_file_store_run_is_continued_on_resume(tmp_path, monkeypatch, lambdapo_log):
    need("mlflow")
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")   # MLflow 3.x: opt in to it
    group = Trackers(["mlflow"], info_for(tmp_path))
    for step in (1, 2):
        group.log({"reward": 0.1 * step}, step)
    group.log({"eval/accuracy": 0.5}, 2)
    group.finish()
    run_id = json.loads((tmp_path / "trackers.json").read_text())["mlflow"]["run_id"]
    client = MlflowClient(tracking_uri=store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "test-run"
    assert run.data.params == {"steps": "3", "rollout.group_size": "4"}
    # Resumed after step 2: the same run, its changed parameter kept as first logged.
    info = info_for(tmp_path, last_step=2)
    info.params = {"steps": 5, "rollout": {"group_size": 4}, "console_every": 3}
    group = Trackers(["mlflow"], info)
    group.log({"reward": 0.3}, 3)
    group.finish(failed=True)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.params == {"steps": "3", "rollout.group_size": "4", "console_every": "3"}
    assert [m.step for m in client.get_metric_history(run_id, "reward")] == [1, 2, 3]
    assert [m.step for m in client.get_metric_history(run_id, "eval/accuracy")] == [2]
    assert any(f"logger mlflow: continuing run {run_id}" in m for m in lambdapo_log.messages())
    # A resumed run with no MLflow run to continue starts one and says so.
    (tmp_path / "trackers.json").write_text("{}")
    group = Trackers(["mlflow"], info_for(tmp_path, last_step=3))
    group.finish()
    assert json.loads((tmp_path / "trackers.json").read_text())["mlflow"]["run_id"] != run_id
    assert any("no MLflow run" in m and "starting a new one" in m
               for m in lambdapo_log.messages())


# ------------------------------------------------------------------------ real runs
INSTALLED = [name for name in ("wandb", "mlflow", "trackio")
             if importlib.util.find_spec(name) is not None]


@pytest.fixture(scope="module")
def tracked(workspace):  # noqa: F811
    """A 2-step run with every installed tracker, then resumed to step 3; a tracker that
    fails from step 2 on rides along. Returns the run folder, the log records of each
    part and the config's project."""
    root, model = workspace
    run = root / "tracked"
    handler = Records()
    logging.getLogger("lambdapo").addHandler(handler)
    parts = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_CONSOLE", "off")
        mp.setenv("WANDB_SILENT", "true")
        for name in ("WANDB_DIR", "MLFLOW_TRACKING_URI", "TRACKIO_SPACE_ID",
                     "TRACKIO_SERVER_URL"):
            mp.delenv(name, raising=False)
        mp.setenv("TRACKIO_DIR", str(root / "trackio"))   # read when trackio is imported
        mp.setitem(BACKENDS, "flaky", Backend(
            lambda info: Fake(info, "flaky", fail_from=2), None, None))
        logger = "[" + ",".join(["console", "tensorboard", "flaky"] + INSTALLED) + "]"
        for steps, resume in ((2, None), (3, "auto")):
            config = load_config(None, overrides(root, model, "tracked", steps=steps,
                                                 eval_every=0, logger=logger,
                                                 project_name=PROJECT))
            handler.records = []
            with Trainer(config, resume=resume, progress=False) as trainer:
                trainer.train()
            parts.append(list(handler.records))
    logging.getLogger("lambdapo").removeHandler(handler)
    return run, parts


def messages(records, level=logging.INFO):
    return [r.getMessage() for r in records if r.levelno == level]


def test_the_run_goes_on_past_a_failing_tracker(tracked):
    run, parts = tracked
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    for records, step in zip(parts, (2, 3)):
        warnings = messages(records, logging.WARNING)
        assert sum("logger flaky failed" in w for w in warnings) == 1, warnings
        assert any(f"logger flaky failed at step {step}" in w for w in warnings)


def test_tensorboard_has_each_step_the_evaluations_and_the_config(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = tracked
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("reward")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("eval/accuracy")] == [0, 2, 3]
    assert [e.step for e in events.Scalars("eval/reward")] == [0, 2, 3]
    assert any(tag.startswith("config") for tag in events.Tags()["tensors"])


def test_console_lines_reach_the_run_log(tracked):
    run, parts = tracked
    first, resumed = (messages(records) for records in parts)
    assert "eval at step 0" in " ".join(first) and "step 1/2: reward" in " ".join(first)
    assert any(m.startswith("step 2/2: reward") for m in first)
    assert any(m.startswith("step 3/3: reward") for m in resumed)
    log = (run / "train.log").read_text()
    assert "lambdapo: step 3/3: reward" in log and "lambdapo: eval at step 3: accuracy" in log


def wandb_records(path: Path):
    """The records of a W&B run file (``run-<id>.wandb``: LevelDB's log format with W&B's
    7-byte header, each record a protobuf)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, chunks = 32768, 7, []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:   # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunks.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):   # FULL or LAST
            record = pb.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def test_wandb_offline_run_is_continued_on_resume(tracked):
    need("wandb")
    run, parts = tracked
    state = json.loads((run / "trackers.json").read_text())["wandb"]
    folders = sorted((run / "wandb").glob(f"offline-run-*-{state['id']}"))
    assert len(folders) == 2   # the first part and the resumed one, under one id
    history, exits, configs = [], [], []
    for folder in folders:
        for record in wandb_records(folder / f"run-{state['id']}.wandb"):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                history.append({item.key or "/".join(item.nested_key):
                                json.loads(item.value_json) for item in record.history.item})
            elif kind == "exit":
                exits.append(record.exit.exit_code)
            elif kind == "run":
                assert record.run.run_id == state["id"] and record.run.project == PROJECT
                configs.append({item.key: json.loads(item.value_json)
                                for item in record.run.config.update})
    assert [row["step"] for row in history if "reward" in row] == [1, 2, 3]
    assert [row["step"] for row in history if "eval/accuracy" in row] == [0, 2, 3]
    assert exits == [0, 0]
    assert all(c["rollout"]["group_size"] == 4 and c["logger"][0] == "console"
               for c in configs)
    assert any(f"logger wandb: continuing run {state['id']}" in m
               for m in messages(parts[1]))


def test_mlflow_run_in_the_run_folder_is_continued_on_resume(tracked):
    need("mlflow")
    from mlflow.tracking import MlflowClient

    run, _ = tracked
    state = json.loads((run / "trackers.json").read_text())["mlflow"]
    assert state["tracking_uri"] == f"sqlite:///{(run / 'mlflow.db').resolve()}"
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    result = client.get_run(state["run_id"])
    assert result.info.status == "FINISHED" and result.info.run_name == str(run)
    assert client.get_experiment(result.info.experiment_id).name == PROJECT
    assert result.data.params["rollout.group_size"] == "4"
    assert result.data.params["steps"] == "2"   # as first logged; a parameter never changes
    history = lambda key: [m.step for m in client.get_metric_history(state["run_id"], key)]  # noqa
    assert history("reward") == [1, 2, 3] and history("eval/accuracy") == [0, 2, 3]
    assert len(client.search_runs([result.info.experiment_id])) == 1


def test_trackio_local_run_is_continued_on_resume(tracked):
    need("trackio")
    import trackio.utils
    from trackio.sqlite_storage import SQLiteStorage

    run, parts = tracked
    state = json.loads((run / "trackers.json").read_text())["trackio"]
    assert state == {"project": PROJECT, "name": str(run)}
    logs = SQLiteStorage.get_logs(PROJECT, str(run))
    assert [row["step"] for row in logs if "reward" in row] == [1, 2, 3]
    assert [row["step"] for row in logs if "eval/accuracy" in row] == [0, 2, 3]
    assert SQLiteStorage.get_runs(PROJECT) == [str(run)]
    assert SQLiteStorage.get_run_config(PROJECT, str(run))["rollout"]["group_size"] == 4
    if Path(trackio.utils.TRACKIO_DIR) == run.parent / "trackio":   # imported here first
        assert list((run.parent / "trackio").glob("*.db"))
    assert any("logger trackio: continuing run" in m for m in messages(parts[1]))
