"""One training step, lambdapo vs TRL's GRPOTrainer, on the same model, prompts and batch.

The setting of issue 19: the built-in tiny model (or, with ``model=qwen2.5-0.5b``, a
randomly initialised model of Qwen2.5-0.5B's shape with a synthetic tokenizer of its
vocabulary size), 16 prompts x 8 samples, up to 48 new tokens (256 for the Qwen shape;
the small size: 16 and 32), temperature 1, fp32 (bf16 autocast for the Qwen shape), no KL,
one optimizer step per batch in micro-batches of 64, no evaluation, the same two rewards
(math_verify and 0.1 x semantic_density, lambdapo's reward functions, which have TRL's
signature).

    pytest benchmarks/bench_train_step.py --benchmark-only [--bench-set model=qwen2.5-0.5b]
    python benchmarks/bench_train_step.py --threads 1 --runs 3 --steps 12
    python benchmarks/bench_train_step.py --device cuda --model-config qwen2.5-0.5b

A round is one optimizer step: lambdapo's ``Trainer.train_step()``; for TRL, its own
``train()`` loop in a thread that pauses after every step (``on_step_end``), so that a
round is exactly one of its steps, from one ``on_step_end`` to the next. A step's parts are
generation, the middle (rewards, scores, advantages, bookkeeping) and training (forward,
backward, optimizer step); TRL's come from timing its ``_generate`` and
``_generate_and_score_completions``. ``cpu_s`` is the process's CPU time per step. In
TRL's thread lambdapo's reward functions run without their per-call time limit (SIGALRM
needs the main thread; it costs two system calls a call). TRL is optional: without it
its case is not run, with the reason.

The script runs each trainer in a fresh pytest process per run, alternating run by run
(so that a change of machine load hits both), and prints medians over all runs' timed
steps; each run prints a line as it starts and ends. Rows go to benchmarks/out/train_step.jsonl
(untracked; ``--out DIR``, ``--no-save``), and with ``--record`` also to the tracked history
benchmarks/results/train_step.jsonl.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

OP = "train_step"
RATIOS = ("trl",)
# The dispatcher ops the trainer reaches (token_logprobs, linear_token_logprobs,
# lambda_advantages, semantic_density).
KERNELS = ("token_logprobs_forward", "token_logprobs_backward", "linear_token_logprobs_forward",
           "linear_token_logprobs_backward", "lambda_advantages", "ngram_overlap", "lcs_length")
SETTINGS = {"model": "builtin", "seed": 0}
MODELS = ("builtin", "qwen2.5-0.5b")
PROMPTS, GROUP, MICRO_BATCH = 16, 8, 64
# max new tokens by size and model
MAX_NEW = {"small": {"builtin": 16, "qwen2.5-0.5b": 32},
           "full": {"builtin": 48, "qwen2.5-0.5b": 256}}
WARMUP = {"small": 1, "full": 3}
IMPLS = ("lambdapo", "trl")
PARTS = ("gen", "middle", "train", "step")

# Qwen2.5-0.5B's architecture (config.json of Qwen/Qwen2.5-0.5B), randomly initialised.
QWEN_05B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
    "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
    "num_key_value_heads": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "tie_word_embeddings": True, "vocab_size": 151936,
    "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151643,
    "pad_token_id": 151643, "torch_dtype": "float32", "use_sliding_window": False,
}


def size_label(size: str, model: str, threads: int) -> str:
    dtype = "bfloat16" if model == "qwen2.5-0.5b" else "float32"
    return (f"{PROMPTS}x{GROUP},max{MAX_NEW[size][model]},{model},{dtype},"
            f"{threads or 'default'}threads")


def cases(options: harness.BenchOptions, device: str) -> list[harness.Case]:
    model = options.setting(SETTINGS, "model")
    if model not in MODELS:
        raise pytest.UsageError(f"--bench-set model={model}: one of {MODELS}")
    # One thread unless asked: the trainer's recorded setting on a shared 2-core machine.
    threads = 1 if options.threads is None else options.threads
    size = size_label(options.size, model, threads)
    spec = (model, MAX_NEW[options.size][model], options.setting(SETTINGS, "seed"))
    return [harness.Case(OP, impl, size, device, spec=spec, kernels=KERNELS,
                         warmup=WARMUP[options.size], peak_memory=False, threads=threads)
            for impl in IMPLS]


def write_qwen_shaped_model(folder: Path) -> Path:
    """A randomly initialised model of Qwen2.5-0.5B's shape and a synthetic word-level
    tokenizer of its vocabulary (the characters of the arithmetic task, then fillers)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "model.safetensors").exists():
        return folder
    vocab_size = QWEN_05B["vocab_size"]
    chars = list("0123456789+=-*/,.()\\{}boxed ")
    names = ["<unk>"] + chars
    names += [f"<t{i}>" for i in range(vocab_size - len(names) - 1)] + ["<|endoftext|>"]
    vocab = {name: i for i, name in enumerate(names)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    eos = vocab["<|endoftext|>"]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(folder)
    config = AutoConfig.for_model(**{**QWEN_05B, "bos_token_id": eos, "eos_token_id": eos,
                                     "pad_token_id": eos})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, safe_serialization=True)
    return folder


def model_path(model: str) -> str:
    from lambdapo.models import resolve_model_path

    if model == "qwen2.5-0.5b":
        return str(write_qwen_shaped_model(Path(tempfile.gettempdir()) /
                                           "lambdapo-qwen2.5-0.5b-shape"))
    return resolve_model_path("builtin:tiny-arithmetic")


def task_rows(tokenizer) -> list[dict]:
    from lambdapo.tasks import arithmetic

    rows = arithmetic.generate("train", 256, seed=0)
    for row in rows:
        row["solution_ids"] = tokenizer(row["solution"], add_special_tokens=False)["input_ids"]
    return rows


# ------------------------------------------------------------------------------ trainers
def lambdapo_step(case: harness.Case, steps: int, out_dir: str, stack: contextlib.ExitStack
                  ) -> Callable[[], dict]:
    """One lambdapo training step per call; returns its parts."""
    from lambdapo.config import load_config
    from lambdapo.process import configure_process
    from lambdapo.trainer import Trainer

    model, max_new, seed = case.spec
    dtype = "bfloat16" if model == "qwen2.5-0.5b" else "float32"
    overrides = {
        "model.path": model_path(model), "model.dtype": dtype, "device": case.device,
        "prompts_per_step": PROMPTS, "rollout.group_size": GROUP,
        "rollout.max_new_tokens": max_new, "rollout.temperature": 1.0,
        "rollout.engine": "transformers", "algorithm.kl_coef": 0.0,
        "algorithm.ppo_epochs": 1, "algorithm.mini_batches": 1,
        "micro_batch_size": MICRO_BATCH, "steps": steps,   # the LR schedule's length
        # threads=0: the trainer leaves torch's setting alone; the case sets it.
        "threads": 0, "output_dir": out_dir, "log_samples": 0, "seed": seed,
        "data.max_prompt_tokens": 64,
    }
    config = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    configure_process(config)   # as `lambdapo train` does (seeds, malloc on the CPU)
    trainer = stack.enter_context(Trainer(config, progress=False))

    def step() -> dict:
        m = trainer.train_step()
        return {"gen": m["gen_time"], "middle": m["middle_time"], "train": m["train_time"],
                "tokens": m["response_length"] * PROMPTS * GROUP}
    return step


class PausedTrainLoop:
    """Runs a transformers Trainer's ``train()`` in a thread that waits after every
    optimizer step; each call lets exactly one step run and returns when it has ended.
    The first call also runs the loop's set-up."""

    def __init__(self, trainer: Any) -> None:
        from transformers import TrainerCallback

        self._go, self._done = threading.Semaphore(0), threading.Semaphore(0)
        self._stop = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._thread_done = False
        loop = self

        class Pause(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                loop._done.release()
                loop._go.acquire()
                if loop._stop:
                    control.should_training_stop = True
                return control

        trainer.add_callback(Pause())
        self.trainer = trainer

    def _run(self, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)   # OpenMP's thread count is per thread
        try:
            self.trainer.train()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            self._error = exc
        finally:
            self._thread_done = True
            self._done.release()

    def __call__(self) -> None:
        import torch

        if self._thread is None:
            self._thread = threading.Thread(target=self._run, args=(torch.get_num_threads(),),
                                            daemon=True)
            self._thread.start()
        else:
            self._go.release()
        self._done.acquire()
        if self._error is not None:
            raise RuntimeError("TRL's training loop failed") from self._error
        if self._thread_done:
            raise RuntimeError("TRL's training loop ended before the benchmark did")

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._stop = True
            self._go.release()
            self._thread.join(timeout=600)


def trl_step(case: harness.Case, steps: int, out_dir: str, stack: contextlib.ExitStack
             ) -> Callable[[], dict]:
    """One TRL GRPOTrainer step per call; returns its parts."""
    pytest.importorskip("trl", reason="trl is not installed (pip install -e '.[trl]')")
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from lambdapo.rewards import MathVerifyReward, SemanticDensityReward

    model, max_new, seed = case.spec
    path = model_path(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    math_verify, semantic_density = MathVerifyReward(), SemanticDensityReward()
    math_verify.__name__, semantic_density.__name__ = "math_verify", "semantic_density"
    current: dict = {}

    class Timed(GRPOTrainer):
        def _generate(self, prompts):
            start = time.perf_counter()
            out = super()._generate(prompts)
            current["gen"] = current.get("gen", 0.0) + time.perf_counter() - start
            current["tokens"] = current.get("tokens", 0) + sum(len(c) for c in out[1])
            return out

        def _generate_and_score_completions(self, inputs):
            start = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            current["gen_score"] = current.get("gen_score", 0.0) + time.perf_counter() - start
            return out

    config = GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=PROMPTS * GROUP // MICRO_BATCH, num_generations=GROUP,
        max_completion_length=max_new, temperature=1.0, top_p=1.0, beta=0.0,
        num_iterations=1, learning_rate=1e-4, adam_beta1=0.9, adam_beta2=0.99,
        weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="constant",
        max_steps=steps + 1, logging_steps=1, report_to="none", save_strategy="no",
        use_cpu=case.device == "cpu", bf16=model == "qwen2.5-0.5b", seed=seed,
        reward_weights=[1.0, 0.1], disable_tqdm=True, log_completions=False,
        dataloader_num_workers=0)
    trainer = Timed(model=path, reward_funcs=[math_verify, semantic_density], args=config,
                    train_dataset=Dataset.from_list(task_rows(tokenizer)),
                    processing_class=tokenizer)
    loop = PausedTrainLoop(trainer)
    stack.callback(loop.close)

    def step() -> dict:
        current.clear()
        loop()
        # "train" is filled in from the round's time: step - (generation + scoring).
        return {"gen": current["gen"], "middle": current["gen_score"] - current["gen"],
                "gen_score": current["gen_score"], "tokens": current["tokens"]}
    return step


def summarize_steps(steps: list[dict]) -> dict:
    """Medians of the parts over ``steps`` (each with gen, middle, train, step, cpu,
    tokens) and the generated tokens per second of generation time."""
    out = {f"{part}_s": round(statistics.median(s[part] for s in steps), 4) for part in PARTS}
    out["cpu_s"] = round(statistics.median(s["cpu"] for s in steps), 4)
    out["tokens_per_s"] = round(sum(s["tokens"] for s in steps) /
                                sum(s["gen"] for s in steps), 1)
    out["steps"] = len(steps)
    return out


def test_train_step(case: harness.Case, measure, benchmark, options, tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        make = lambdapo_step if case.impl == "lambdapo" else trl_step
        step = make(case, sum(harness.calls(case, options)), str(tmp_path), stack)
        steps: list[dict] = []

        def timed_step() -> None:
            cpu = time.process_time()
            parts = step()
            steps.append({**parts, "cpu": time.process_time() - cpu})
        result = measure(timed_step)
    if result.median_ms is None:
        return
    rounds = benchmark.stats.stats.data
    timed = [{**s, "step": seconds} for s, seconds in zip(steps[-len(rounds):], rounds)]
    for s in timed:
        if "gen_score" in s:
            s["train"] = s["step"] - s.pop("gen_score")
    result.extra.update(summarize_steps(timed), per_step=timed)


def targets(rows: list[harness.Result], device: str) -> list[harness.Target]:
    """Issue 19: lambdapo's middle part <= 0.1 s; its step <= 0.5x TRL's."""
    index = harness.by_impl_size(rows)
    out = []
    for size in dict.fromkeys(r.size for r in rows if r.impl == "lambdapo"):
        ours = index[("lambdapo", size)]
        out.append(harness.Target(size, "middle part", ours.extra.get("middle_s"), 0.1,
                                  at_least=False, unit=" s"))
        out.append(harness.Target(size, "step time / TRL's",
                                  harness.ratio(index, size, "lambdapo", "trl"), 0.5,
                                  at_least=False))
    return out


# ------------------------------------------------------------------------------ driver
def run_in_fresh_process(args: argparse.Namespace, impl: str, size: str) -> dict | None:
    """The row of one run of ``impl``'s case in a fresh pytest process."""
    node = f"{Path(__file__).resolve()}::test_train_step[{args.device}-{size}-{impl}]"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), str(ROOT / "python"), os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "pytest", node, "--benchmark-only",
                   "--benchmark-quiet", "-p", "no:cacheprovider", "-q",
                   f"--bench-device={args.device}", "--bench-size=full",
                   f"--bench-threads={args.threads}", f"--bench-warmup={args.warmup}",
                   f"--benchmark-min-rounds={args.steps}",
                   f"--bench-set=model={args.model_config}", f"--bench-set=seed={args.seed}",
                   f"--bench-results={out}"]
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        path = Path(out) / f"{OP}.jsonl"
        if path.exists():
            return json.loads(path.read_text().splitlines()[-1])
    sys.stderr.write(f"{impl} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n")
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: default)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--model-config", default="builtin", choices=MODELS)
    parser.add_argument("--runs", type=int, default=3, help="runs per trainer, alternated")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps per run")
    parser.add_argument("--trainers", default="lambdapo,trl")
    parser.add_argument("--seed", type=int, default=0)
    harness.add_save_arguments(parser)
    args = parser.parse_args()
    sides = [s.strip() for s in args.trainers.split(",") if s.strip()]
    size = size_label("full", args.model_config, args.threads)
    steps: dict[str, list[dict]] = {side: [] for side in sides}
    last: dict[str, dict] = {}
    start = time.perf_counter()
    for run in range(1, args.runs + 1):
        for side in sides:
            if side in last and last[side]["status"] != "ok":
                continue   # not run (trl missing) or failed: the same next time
            begun = time.perf_counter()
            head = f"[run {run}/{args.runs} {int(begun - start)} s] {OP} {size} {side}"
            print(f"{head}: {args.warmup} + {args.steps} steps...", flush=True)
            row = run_in_fresh_process(args, side, size)
            took = time.perf_counter() - begun
            outcome = ("failed" if row is None else f"{row['median_ms'] / 1e3:.3f} s a step"
                       if row.get("median_ms") else row["status"])
            print(f"{head}: {outcome}, {took:.0f} s", flush=True)
            if row is not None:
                last[side] = row
                steps[side] += row.get("extra", {}).get("per_step", [])
    env = harness.environment(args.device)
    rows = []
    for side in sides:
        if not steps[side]:
            status = last[side]["status"] if side in last else "failed"
            rows.append({**env, "op": OP, "impl": side, "size": size, "status": status})
            continue
        summary = summarize_steps(steps[side])
        rows.append({**env, "device_name": last[side]["device_name"], "op": OP, "impl": side,
                     "size": size, "median_ms": round(summary["step_s"] * 1e3, 1),
                     "status": "ok", "extra": {**summary, "threads": args.threads,
                                               "runs": args.runs}})
    base = next((r for r in rows if r["impl"] == "trl" and r["status"] == "ok"), None)
    print(f"{size} on {rows[0].get('device_name', env['device_name'])}, commit "
          f"{env['commit']}; medians over steps after {args.warmup} warm-up steps, "
          f"{args.runs} alternated runs")
    print(f"{'trainer':<10}{'step s':>9}{'gen s':>9}{'middle s':>10}{'train s':>9}"
          f"{'cpu s':>8}{'gen tok/s':>11}{'vs TRL':>8}")
    for row in rows:
        if row["status"] != "ok":
            print(f"{row['impl']:<10} {row['status']}")
            continue
        e = row["extra"]
        ratio = f"{e['step_s'] / base['extra']['step_s']:.2f}x" if base else "-"
        print(f"{row['impl']:<10}{e['step_s']:>9.3f}{e['gen_s']:>9.3f}{e['middle_s']:>10.3f}"
              f"{e['train_s']:>9.3f}{e['cpu_s']:>8.3f}{e['tokens_per_s']:>11.0f}{ratio:>8}")
    folders = [] if args.no_save else [args.out]
    if args.record and not any(harness.same_path(f, harness.RESULTS_DIR) for f in folders):
        folders.append(harness.RESULTS_DIR)
    paths = [harness.append_rows(folder, OP, rows) for folder in folders]
    for line in harness.saved_lines(paths) or ["rows not saved (--no-save)"]:
        print(line)


if __name__ == "__main__":
    main()
