"""``lambdapo`` command line: train, eval, compare.

    lambdapo train [--config FILE] [--resume [PATH]] [--allow-config-change]
                   [section.field=value ...]
    lambdapo eval --model PATH [--dataset NAME_OR_FILE] [section.field=value ...]
    lambdapo compare [--seeds N] [--methods a,b,...] [--baseline NAME] [--jobs N]
                     [--method NAME:key=value,...] [section.field=value ...]

``lambdapo train --help`` lists every config field with its default. The working
directory is importable (searched after the installed packages), so reward modules there
work as ``reward.functions=module:function``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

from . import config as config_lib
from .checkpoint import RunDirectoryLocked
from .compare import DEFAULT_BASELINE, DEFAULT_METHODS, METHODS
from .rewards import RewardError
from .rollout import RolloutEngineError

# ``section.field=value``: what --resume's optional argument is taken for when it looks so.
_OVERRIDE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*=")


def _parser() -> argparse.ArgumentParser:
    fields = "\n".join(config_lib.help_lines())
    parser = argparse.ArgumentParser(prog="lambdapo", description="LambdaPO training.")
    sub = parser.add_subparsers(dest="command", required=True)
    raw = dict(formatter_class=argparse.RawDescriptionHelpFormatter)
    pointer = ("section.field=value overrides take any field of the training config; "
               "`lambdapo train --help` lists them with their defaults.")
    train = sub.add_parser("train", help="train a policy (defaults: the built-in task and "
                                         "model)", epilog="config fields (override as "
                           "section.field=value):\n" + fields, **raw)
    train.add_argument("--config", help="YAML file with any of the fields below")
    train.add_argument("--resume", nargs="?", const="auto", metavar="RUN",
                       help="continue a run: RUN is its folder (or one of its checkpoint "
                            "folders); alone, output_dir's run. The run's own config.yaml "
                            "is the base, --config and overrides go on top")
    train.add_argument("--allow-config-change", action="store_true",
                       help="resume even when the config differs from the checkpoint's in "
                            "fields that change the experiment (model, data, sampling, "
                            "algorithm, rewards, optimizer, seed)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("overrides", nargs="*", metavar="section.field=value")
    ev = sub.add_parser("eval", help="held-out accuracy (pass@1 and mean@k) of a model",
                        epilog=pointer + " A training run's folder brings its own config.yaml "
                        "(task, data, model settings), with the overrides on top.", **raw)
    ev.add_argument("--model", required=True,
                    help="model folder, checkpoint folder, training run folder (its latest "
                         "checkpoint) or builtin:tiny-arithmetic")
    ev.add_argument("--dataset", help="held-out data (sets data.eval_dataset; default: the "
                                      "built-in arithmetic eval split)")
    ev.add_argument("--config", help="YAML file")
    ev.add_argument("overrides", nargs="*", metavar="section.field=value")
    cmp = sub.add_parser("compare", help="several methods at the same budget over several "
                                         "seeds: statistics, a table and a PNG",
                         epilog=pointer, **raw)
    cmp.add_argument("--config", help="YAML file (the base of every method)")
    cmp.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per method; runs "
                     "already in --output are reused, so raising N extends a comparison")
    cmp.add_argument("--methods", "--estimators", dest="methods",
                     default=",".join(DEFAULT_METHODS),
                     help=f"comma-separated method names; built in: {', '.join(METHODS)}")
    cmp.add_argument("--method", action="append", default=[], metavar="NAME:key=value,...",
                     help="define a method by its overrides (repeatable); list it in --methods "
                          "or it is appended")
    cmp.add_argument("--baseline", default=DEFAULT_BASELINE,
                     help="method the paired differences are taken against")
    cmp.add_argument("--jobs", type=int, default=0,
                     help="training processes at a time, one torch thread each (0: one per core)")
    cmp.add_argument("--output", default="runs/compare", help="folder for the runs and report")
    cmp.add_argument("overrides", nargs="*", metavar="section.field=value")
    return parser


def _summary_line(summary: dict) -> str:
    return (f"held-out accuracy {summary['accuracy_before']:.2f} -> "
            f"{summary['accuracy_after']:.2f} in {summary['seconds']:.0f} s "
            f"({summary['steps']} steps, {summary['eval_samples']} held-out samples)")


def train_config(args) -> tuple[config_lib.TrainConfig, str | None]:
    """The config of ``lambdapo train`` and what to resume (None: a new run). With
    ``--resume [RUN]`` the run's own config.yaml is the base (``output_dir``'s run when RUN
    is not given; RUN may be the run's folder or a checkpoint folder in it), then
    ``--config``, then the overrides; ``output_dir`` stays the run's unless overridden."""
    if not args.resume:
        return config_lib.load_config(args.config, args.overrides), None
    overrides = list(args.overrides)
    if args.resume == "auto":
        run = Path(config_lib.load_config(args.config, overrides).output_dir)
    else:
        run = run_folder(Path(args.resume))
        if not any(item.startswith("output_dir=") for item in overrides):
            overrides.append(f"output_dir={run}")
    saved = run / "config.yaml"
    config = config_lib.load_config(args.config, overrides,
                                    base=saved if saved.is_file() else None)
    return config, args.resume


def run_folder(path: Path) -> Path:
    """The training run folder that ``path`` (a run folder, its checkpoints/, a checkpoint
    folder in it, or a LoRA run's merged/ model) belongs to; ``path`` itself when it is none
    of these."""
    from . import checkpoint as ckpt

    if path.name in ("checkpoints", "merged") and (path.parent / "config.yaml").is_file():
        return path.parent
    if (path / ckpt.STATE_FILE).exists() and path.parent.name == "checkpoints":
        return path.parent.parent
    return path


def cmd_train(args) -> int:
    from .process import configure_process
    from .stopping import GracefulStop, StopNow
    from .trainer import Trainer

    config, resume = train_config(args)
    configure_process(config)
    try:
        with GracefulStop() as stop:
            with Trainer(config, resume=resume, progress=not args.quiet,
                         allow_config_change=args.allow_config_change) as trainer:
                summary = trainer.train(stop=stop)
    except (StopNow, KeyboardInterrupt) as exc:
        signum = exc.signum if isinstance(exc, StopNow) else signal.SIGINT
        print(f"lambdapo train: stopped by {signal.Signals(signum).name} before the step in "
              f"progress finished; {_resume_hint(Path(config.output_dir))}", file=sys.stderr)
        return 128 + signum
    if summary.get("stopped"):
        return 128 + signal.Signals[summary["stopped"]]
    print(_summary_line(summary))
    print(f"outputs: {config.output_dir}")
    return 0


def _resume_hint(run: Path) -> str:
    """Where a stopped run can continue from, in one clause."""
    from . import checkpoint as ckpt

    try:
        latest = ckpt.find_checkpoint(run)
    except (FileNotFoundError, ValueError):
        return "it has no checkpoint to continue from"
    return f"latest checkpoint {latest}; continue with: lambdapo train --resume {run}"


def eval_model_folder(path: str) -> str:
    """``lambdapo eval --model``: a run folder (or its checkpoints/) becomes its latest
    checkpoint; a checkpoint is verified against its manifest; a model folder or
    ``builtin:NAME`` is used as it is.

    Raises:
        FileNotFoundError: ``path`` does not exist, or is a run folder without checkpoints.
        ValueError: ``path`` is neither a model folder nor a run folder, or a checkpoint
            is damaged.
    """
    from . import checkpoint as ckpt

    if path.startswith("builtin:"):
        return path
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"--model {path}: does not exist")
    if (folder / "checkpoints").is_dir() or (folder / "latest").is_file():
        folder = ckpt.find_checkpoint(folder)
    if folder.is_dir() and (folder / ckpt.STATE_FILE).exists():
        ckpt.verify_checkpoint(folder)
        return str(folder)
    if folder.is_dir() and not (folder / "config.json").exists() and \
            not (folder / "adapter_config.json").exists():
        raise ValueError(f"--model {path}: expected a model folder (with config.json), a "
                         f"checkpoint folder (checkpoints/step-N) or a training run folder "
                         f"(with checkpoints/latest)")
    return str(folder)


def cmd_eval(args) -> int:
    from .process import configure_process
    from .trainer import Trainer

    model = eval_model_folder(args.model)
    if model != args.model:
        print(f"lambdapo eval: model {model}", file=sys.stderr)
    saved = None if args.model.startswith("builtin:") else \
        run_folder(Path(args.model)) / "config.yaml"
    if saved is not None and not saved.is_file():
        saved = None
    # The trainer writes its config into output_dir: a scratch folder, not a run's.
    with tempfile.TemporaryDirectory(prefix="lambdapo-eval-") as scratch:
        own = list(args.overrides) + ([f"data.eval_dataset={args.dataset}"] if args.dataset
                                      else [])
        if saved is not None:
            print(f"lambdapo eval: the run's settings from {saved}"
                  + (f", then {' '.join(own)}" if own else ""), file=sys.stderr)
        # A LoRA run's checkpoint loads as its base with the adapter merged: no new adapter.
        overrides = own + [f"model.path={model}", "steps=1", f"output_dir={scratch}",
                           "model.lora_rank=0"]
        config = config_lib.load_config(args.config, overrides, base=saved)
        if args.dataset:   # the training data is not needed: point it at the eval data
            config.data.dataset = args.dataset
        configure_process(config)
        with Trainer(config, progress=False) as trainer:
            start = time.perf_counter()
            pass1 = trainer.evaluate(temperature=0.0)
            sampled = trainer.evaluate()
    k = config.eval_samples
    temperature = config.rollout.temperature if config.eval_temperature < 0 else config.eval_temperature
    result = {"model": model, "engine": trainer.engine.name,
              "prompts": len(trainer.eval_rows),
              "pass@1_greedy": pass1.accuracy, f"mean@{k}": sampled.accuracy,
              "temperature": temperature, "mean_reward": sampled.reward,
              "seconds": time.perf_counter() - start}
    print(json.dumps(result, indent=1))
    return 0


def cmd_compare(args) -> int:
    from .compare import parse_method, run_comparison

    custom = dict(parse_method(text) for text in args.method)
    methods = [m for m in args.methods.split(",") if m]
    methods += [name for name in custom if name not in methods]
    run_comparison(args.config, args.overrides, methods=methods, seeds=args.seeds,
                   output=Path(args.output), baseline=args.baseline, jobs=args.jobs or None,
                   custom_methods=custom)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line. ``--resume`` takes an optional path; a following
    ``section.field=value`` is an override, not the path (``--resume steps=12`` resumes
    output_dir's latest checkpoint with steps=12)."""
    args = _parser().parse_args(argv)
    if getattr(args, "resume", None) and _OVERRIDE.match(args.resume):
        args.overrides = [args.resume] + args.overrides
        args.resume = "auto"
    return args


def _importable_working_directory() -> None:
    """Reward functions given as ``module:function`` may live in the working directory
    (``python -m`` would find them there). It is searched last, so a file there never
    shadows an installed package."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


class _ConsoleLog(logging.Handler):
    """The ``lambdapo`` log on stderr, one line per record, written past a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        level = "warning: " if record.levelno >= logging.WARNING else ""
        try:
            tqdm.write(f"lambdapo: {level}{record.getMessage()}", file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must not end the run
            self.handleError(record)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _importable_working_directory()
    root = logging.getLogger("lambdapo")
    console = _ConsoleLog(logging.INFO)
    root.addHandler(console)
    root.setLevel(logging.INFO)
    shown_as = warnings.formatwarning

    def one_line(message, category, *args, **kwargs) -> str:
        if issubclass(category, config_lib.LambdapoWarning):
            return f"lambdapo: warning: {message}\n"
        return shown_as(message, category, *args, **kwargs)
    warnings.formatwarning = one_line
    try:
        return {"train": cmd_train, "eval": cmd_eval, "compare": cmd_compare}[args.command](args)
    except (ValueError, FileNotFoundError, RewardError, RolloutEngineError,
            RunDirectoryLocked) as exc:
        print(f"lambdapo {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lambdapo {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        warnings.formatwarning = shown_as
        root.removeHandler(console)


if __name__ == "__main__":
    sys.exit(main())
