"""``lambdapo`` command line: train, eval, compare.

    lambdapo train [--config FILE] [--resume [PATH]] [section.field=value ...]
    lambdapo eval --model PATH [--dataset NAME_OR_FILE] [section.field=value ...]
    lambdapo compare [--seeds N] [--methods a,b,...] [--baseline NAME] [--jobs N]
                     [--method NAME:key=value,...] [section.field=value ...]

``lambdapo train --help`` lists every config field with its default.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from . import config as config_lib
from .compare import DEFAULT_BASELINE, DEFAULT_METHODS, METHODS
from .rewards import RewardError
from .rollout import RolloutEngineError


def _parser() -> argparse.ArgumentParser:
    fields = "\n".join(config_lib.help_lines())
    parser = argparse.ArgumentParser(prog="lambdapo", description="LambdaPO training.")
    sub = parser.add_subparsers(dest="command", required=True)
    common = dict(formatter_class=argparse.RawDescriptionHelpFormatter,
                  epilog="config fields (override as section.field=value):\n" + fields)
    train = sub.add_parser("train", help="train a policy (defaults: the built-in task and "
                                         "model)", **common)
    train.add_argument("--config", help="YAML file with any of the fields below")
    train.add_argument("--resume", nargs="?", const="auto",
                       help="continue from a checkpoint (a checkpoint folder or a run "
                            "directory; alone: output_dir's latest)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("overrides", nargs="*", metavar="section.field=value")
    ev = sub.add_parser("eval", help="held-out accuracy (pass@1 and mean@k) of a model",
                        **common)
    ev.add_argument("--model", required=True, help="model folder or builtin:tiny-arithmetic")
    ev.add_argument("--dataset", help="held-out data (sets data.eval_dataset; default: the "
                                      "built-in arithmetic eval split)")
    ev.add_argument("--config", help="YAML file")
    ev.add_argument("overrides", nargs="*", metavar="section.field=value")
    cmp = sub.add_parser("compare", help="several methods at the same budget over several "
                                         "seeds: statistics, a table and a PNG", **common)
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


def cmd_train(args) -> int:
    from .trainer import Trainer

    config = config_lib.load_config(args.config, args.overrides)
    with Trainer(config, resume=args.resume, progress=not args.quiet) as trainer:
        summary = trainer.train()
    print(_summary_line(summary))
    print(f"outputs: {config.output_dir}")
    return 0


def cmd_eval(args) -> int:
    from .trainer import Trainer

    # The trainer writes its config into output_dir: a scratch folder, not a run's.
    with tempfile.TemporaryDirectory(prefix="lambdapo-eval-") as scratch:
        overrides = list(args.overrides) + [f"model.path={args.model}", "steps=1",
                                             f"output_dir={scratch}"]
        if args.dataset:
            overrides.append(f"data.eval_dataset={args.dataset}")
        config = config_lib.load_config(args.config, overrides)
        if args.dataset:   # the training data is not needed: point it at the eval data
            config.data.dataset = args.dataset
        with Trainer(config, progress=False) as trainer:
            start = time.perf_counter()
            sampled_temperature = config.eval_temperature
            trainer.config.eval_temperature = 0.0
            pass1 = trainer.evaluate()
            trainer.config.eval_temperature = sampled_temperature
            sampled = trainer.evaluate()
    k = config.eval_samples
    temperature = config.rollout.temperature if config.eval_temperature < 0 else config.eval_temperature
    result = {"model": args.model, "engine": trainer.engine.name,
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"train": cmd_train, "eval": cmd_eval, "compare": cmd_compare}[args.command](args)
    except (ValueError, FileNotFoundError, RewardError, RolloutEngineError) as exc:
        print(f"lambdapo {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
