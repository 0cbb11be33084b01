"""The command line as a careless hand uses it: --resume followed by overrides, a YAML
file with a syntax error, model.path naming a file, a reward module in the working
directory, eval of a run folder; and the curves it draws."""

import json
import shutil
import sys

import pytest

from lambdapo import cli
from lambdapo.config import TrainConfig, load_config
from lambdapo.trainer import Trainer
from test_faults import saved_run, workspace  # noqa: F401 (fixtures)
from test_loop import overrides


@pytest.mark.parametrize("argv,resume,rest", [
    (["--resume", "steps=12", "eval_every=3"], "auto", ["steps=12", "eval_every=3"]),
    (["--resume", "rollout.group_size=4"], "auto", ["rollout.group_size=4"]),
    (["steps=12", "--resume"], "auto", ["steps=12"]),
    (["--resume", "runs/a", "steps=12"], "runs/a", ["steps=12"]),
    (["--resume", "runs/lr=0.1"], "runs/lr=0.1", []),
    (["steps=12"], None, ["steps=12"]),
])
def test_resume_takes_an_optional_path_never_an_override(argv, resume, rest):
    args = cli.parse_args(["train", *argv])
    assert args.resume == resume and args.overrides == rest


def test_resume_followed_by_overrides_continues_the_latest_checkpoint(workspace, saved_run,
                                                                     tmp_path, capsys):
    root, model = workspace
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    with pytest.warns(UserWarning, match="changed config: steps: 2 -> 3"):
        code = cli.main(["train", "--quiet", "--resume", "steps=3",
                         *overrides(root, model, run, save_every=1, steps=3)])
    assert code == 0, capsys.readouterr().err
    assert json.loads((run / "summary.json").read_text())["steps"] == 3


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("steps: 10\nrollout:\n  group_size: 4\n   temperature: 1.0\n")
    assert cli.main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lambdapo train: error: config file {config}, "
                                               f"line 4, column ")
    assert cli.main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: No such file" in capsys.readouterr().err


def test_model_path_naming_a_file_or_a_run_folder_is_one_clear_error(tmp_path, capsys):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0" * 16)
    assert cli.main(["train", f"model.path={weights}", f"output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lambdapo train: error: config model.path: {weights} is a file; expected "
                   f"a model folder in transformers format (config.json, tokenizer files, "
                   f"*.safetensors) or builtin:tiny-arithmetic"]
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert cli.main(["train", f"model.path={tmp_path / 'run'}",
                     f"output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no config.json" in err[0] and "lambdapo eval" in err[0]
    assert cli.main(["eval", "--model", str(weights)]) == 2
    assert "is a file" in capsys.readouterr().err


def test_a_reward_module_in_the_working_directory_is_importable(workspace, tmp_path,
                                                                monkeypatch, capsys):
    root, model = workspace
    (tmp_path / "my_cwd_rewards.py").write_text(
        "def length(prompts, completions, completion_ids, **columns):\n"
        "    return [len(c) / 10 for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    code = cli.main(["train", "--quiet", "reward.functions=[math_verify, my_cwd_rewards:length]",
                     *overrides(root, model, tmp_path / "run", steps=1)])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert "reward/my_cwd_rewards:length" in metrics


def test_eval_of_a_run_folder_uses_its_latest_checkpoint(workspace, saved_run, tmp_path,
                                                         capsys):
    root, model = workspace
    args = ["--dataset", str(root / "data.jsonl"), "data.prompt_field=question",
            "data.num_eval=4", "eval_samples=2", "rollout.max_new_tokens=6"]
    for target in (saved_run, saved_run / "checkpoints"):
        assert cli.main(["eval", "--model", str(target), *args]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["model"] == str(saved_run / "checkpoints" / "step-2")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["eval", "--model", str(empty), *args]) == 2
    assert "expected a model folder (with config.json), a checkpoint folder" in \
        capsys.readouterr().err
    (empty / "checkpoints").mkdir()
    assert cli.main(["eval", "--model", str(empty), *args]) == 2
    assert "checkpoints/ has no 'latest'" in capsys.readouterr().err
    damaged = tmp_path / "damaged"
    shutil.copytree(saved_run, damaged)
    (damaged / "checkpoints" / "step-2" / "model.safetensors").write_bytes(b"")
    assert cli.main(["eval", "--model", str(damaged), *args]) == 2
    assert "model.safetensors has 0 bytes" in capsys.readouterr().err


def test_eval_of_a_run_folder_takes_the_runs_own_settings(workspace, saved_run, capsys):
    """No --dataset and no overrides: the run's data, prompt field and held-out size (8
    prompts, not the built-in task's 200) come from its config.yaml, which is named."""
    for target in (saved_run, saved_run / "checkpoints" / "step-1"):
        assert cli.main(["eval", "--model", str(target), "eval_samples=1",
                         "rollout.max_new_tokens=4"]) == 0
        captured = capsys.readouterr()
        assert json.loads(captured.out)["prompts"] == 8
        assert f"the run's settings from {saved_run / 'config.yaml'}, then eval_samples=1 " \
               f"rollout.max_new_tokens=4" in captured.err


def test_resume_of_a_run_folder_continues_with_its_own_config(workspace, saved_run, tmp_path,
                                                              capsys, caplog):
    """`--resume RUN` and `--resume output_dir=RUN` need no override retyped; the run says
    from which step it continues."""
    for number, argv in enumerate((["--resume", "{run}", "steps=3"],
                                   ["--resume", "output_dir={run}", "steps=3"])):
        run = tmp_path / f"run{number}"
        shutil.copytree(saved_run, run)
        # The saved config names the run folder it was trained in; a copy is still itself.
        with pytest.warns(UserWarning, match="changed config: steps: 2 -> 3"):
            code = cli.main(["train", "--quiet", *[a.format(run=run) for a in argv]])
        assert code == 0, capsys.readouterr().err
        assert json.loads((run / "summary.json").read_text())["steps"] == 3
        assert f"resuming {run} from step 2 of 3" in (run / "train.log").read_text()


def test_curves_have_titles_labels_smoothing_and_several_evaluations(workspace, monkeypatch):
    import matplotlib.figure

    root, model = workspace
    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: figures.append(fig))
    config = load_config(None, overrides(root, model, "curves", steps=4, eval_every=2))
    with Trainer(config, progress=False) as trainer:
        trainer.train()
        assert [e["step"] for e in trainer.eval_history] == [0, 2, 4]
    (fig,) = figures
    train_ax, eval_ax = fig.axes
    assert fig._suptitle.get_text()
    for ax in (train_ax, eval_ax):
        assert ax.get_title() and ax.get_xlabel() == "step" and ax.get_ylabel()
    # Each training curve twice: faint raw values and the solid moving average.
    alphas = sorted(line.get_alpha() or 1.0 for line in train_ax.get_lines())
    assert alphas == [0.25, 0.25, 1.0, 1.0]
    assert list(eval_ax.get_lines()[0].get_xdata()) == [0, 2, 4]
    # Every evaluation is inside both panels, step 0's included.
    for ax in (train_ax, eval_ax):
        lo, hi = ax.get_xlim()
        assert lo < 0 and hi > 4
    # The default run evaluates held-out accuracy at several points, not only at the ends.
    defaults = TrainConfig()
    assert 0 < defaults.eval_every and defaults.steps // defaults.eval_every >= 3


def test_ema_smooths_from_the_first_value():
    from lambdapo.metrics import ema

    assert ema([1.0, 1.0, 1.0], span=5) == [1.0, 1.0, 1.0]
    smoothed = ema([0.0, 1.0, 0.0, 1.0], span=3)
    assert smoothed == [0.0, 0.5, 0.25, 0.625]
