"""One training step, lambdapo vs TRL's GRPOTrainer, on the same model, prompts and batch.

The setting of issue 19: the built-in tiny model (or, with ``--model-config qwen2.5-0.5b``,
a randomly initialised model of Qwen2.5-0.5B's shape with a synthetic tokenizer of its
vocabulary size), 16 prompts x 8 samples, up to 48 new tokens (256 for the Qwen shape),
temperature 1, fp32 (bf16 autocast for the Qwen shape), no KL, one optimizer step per
batch in micro-batches of 64, no evaluation, the same two rewards (math_verify and 0.1 x
semantic_density, lambdapo's reward functions, which have TRL's signature).

    python benchmarks/bench_train_step.py --threads 1 --runs 3 --steps 12
    python benchmarks/bench_train_step.py --device cuda --model-config qwen2.5-0.5b

Each run is a fresh process per trainer (lambdapo and TRL alternate run by run, so that a
change of machine load hits both); a step's parts are generation, the middle (rewards,
scores, advantages, bookkeeping) and training (forward, backward, optimizer step), wall
time; the table shows medians over all runs' steps after ``--warmup``. TRL's parts come
from timing its ``_generate`` and ``_generate_and_score_completions``; its whole step is
the time between two ``on_step_end`` callbacks. TRL is optional: without it the row says
not run. Rows go to benchmarks/results/train_step.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

OP = "train_step"
PROMPTS, GROUP, MICRO_BATCH = 16, 8, 64
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


def write_qwen_shaped_model(folder: Path) -> Path:
    """A randomly initialised model of Qwen2.5-0.5B's shape and a synthetic word-level
    tokenizer of its vocabulary (the characters of the arithmetic task, then fillers)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "model.safetensors").exists():
        return folder
    vocab_size = QWEN_05B["vocab_size"]
    chars = list("0123456789+=-*/,.()\\{}boxed ")
    specials = ["<unk>"]
    names = specials + chars
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


def task_rows(tokenizer) -> list[dict]:
    from lambdapo.tasks import arithmetic
    rows = arithmetic.generate("train", 256, seed=0)
    for row in rows:
        row["solution_ids"] = tokenizer(row["solution"], add_special_tokens=False)["input_ids"]
    return rows


# ------------------------------------------------------------------------------ workers
def run_lambdapo(args, model_path: str, out_dir: str) -> list[dict]:
    from lambdapo.config import load_config
    from lambdapo.trainer import Trainer

    overrides = {
        "model.path": model_path, "model.dtype": args.dtype, "device": args.device,
        "prompts_per_step": PROMPTS, "rollout.group_size": GROUP,
        "rollout.max_new_tokens": args.max_new_tokens, "rollout.temperature": 1.0,
        "rollout.engine": "transformers", "algorithm.kl_coef": 0.0,
        "algorithm.ppo_epochs": 1, "algorithm.mini_batches": 1,
        "micro_batch_size": MICRO_BATCH, "steps": args.steps, "threads": args.threads,
        "output_dir": out_dir, "log_samples": 0, "seed": args.seed,
        "data.max_prompt_tokens": 64,
    }
    trainer = Trainer(load_config(None, [f"{k}={v}" for k, v in overrides.items()]),
                      progress=False)
    steps = []
    for _ in range(args.steps):
        cpu = time.process_time()
        m = trainer.train_step()
        steps.append({"gen": m["gen_time"], "middle": m["middle_time"],
                      "train": m["train_time"], "step": m["step_time"],
                      "cpu": time.process_time() - cpu,
                      "tokens": m["response_length"] * PROMPTS * GROUP})
    return steps


def run_trl(args, model_path: str, out_dir: str) -> list[dict]:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from lambdapo.rewards import MathVerifyReward, SemanticDensityReward

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = task_rows(tokenizer)
    math_verify, semantic_density = MathVerifyReward(), SemanticDensityReward()
    math_verify.__name__, semantic_density.__name__ = "math_verify", "semantic_density"
    timings: list[dict] = []
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

    class StepClock(TrainerCallback):
        last = None
        cpu = None

        def on_step_end(self, *unused, **kwargs):
            now, cpu = time.perf_counter(), time.process_time()
            if self.last is not None:
                step = now - self.last
                timings.append({"gen": current["gen"],
                                "middle": current["gen_score"] - current["gen"],
                                "train": step - current["gen_score"], "step": step,
                                "cpu": cpu - self.cpu, "tokens": current["tokens"]})
            self.last, self.cpu = time.perf_counter(), time.process_time()
            current.clear()

    config = GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=PROMPTS * GROUP // MICRO_BATCH, num_generations=GROUP,
        max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, beta=0.0,
        num_iterations=1, learning_rate=1e-4, adam_beta1=0.9, adam_beta2=0.99,
        weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="constant",
        max_steps=args.steps + 1, logging_steps=1, report_to="none", save_strategy="no",
        use_cpu=args.device == "cpu", bf16=args.dtype == "bfloat16", seed=args.seed,
        reward_weights=[1.0, 0.1], disable_tqdm=True, log_completions=False,
        dataloader_num_workers=0)
    trainer = Timed(model=model_path, reward_funcs=[math_verify, semantic_density],
                    args=config, train_dataset=Dataset.from_list(rows),
                    processing_class=tokenizer, callbacks=[StepClock()])
    trainer.train()
    return timings


def worker(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model_path = args.model_path
    with tempfile.TemporaryDirectory() as out_dir:
        run = run_lambdapo if args.worker == "lambdapo" else run_trl
        steps = run(args, model_path, out_dir)
    print("RESULT " + json.dumps({"steps": steps, "threads": torch.get_num_threads()}))


# ------------------------------------------------------------------------------ driver
def spawn(args, side: str, model_path: str) -> dict | None:
    command = [sys.executable, __file__, "--worker", side, "--model-path", model_path,
               "--threads", str(args.threads), "--steps", str(args.steps + args.warmup),
               "--device", args.device, "--dtype", args.dtype,
               "--max-new-tokens", str(args.max_new_tokens), "--seed", str(args.seed)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), str(ROOT / "python"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    sys.stderr.write(f"{side} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n")
    return None


def summarize(steps: list[dict]) -> dict:
    out = {f"{part}_s": round(statistics.median(s[part] for s in steps), 4) for part in PARTS}
    out["cpu_s"] = round(statistics.median(s["cpu"] for s in steps), 4)
    out["tokens_per_s"] = round(sum(s["tokens"] for s in steps) /
                                sum(s["gen"] for s in steps), 1)
    out["steps"] = len(steps)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: default)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--model-config", default="builtin", choices=("builtin", "qwen2.5-0.5b"))
    parser.add_argument("--runs", type=int, default=3, help="runs per trainer, alternated")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps per run")
    parser.add_argument("--trainers", default="lambdapo,trl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-save", action="store_true")
    # worker-only options
    parser.add_argument("--worker", choices=("lambdapo", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--max-new-tokens", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    qwen = args.model_config == "qwen2.5-0.5b"
    args.dtype = args.dtype or ("bfloat16" if qwen else "float32")
    args.max_new_tokens = args.max_new_tokens or (256 if qwen else 48)
    if args.worker:
        worker(args)
        return

    import torch

    import harness
    from lambdapo.policy import resolve_model_path

    if args.threads:
        torch.set_num_threads(args.threads)   # so that the recorded device names them

    if qwen:
        model_path = str(write_qwen_shaped_model(Path(tempfile.gettempdir()) /
                                                 "lambdapo-qwen2.5-0.5b-shape"))
    else:
        model_path = resolve_model_path("builtin:tiny-arithmetic")
    sides = [s.strip() for s in args.trainers.split(",") if s.strip()]
    have_trl = True
    try:
        import trl  # noqa: F401
    except ImportError:
        have_trl = False
    steps: dict[str, list[dict]] = {side: [] for side in sides}
    threads = {}
    for _ in range(args.runs):
        for side in sides:
            if side == "trl" and not have_trl:
                continue
            result = spawn(args, side, model_path)
            if result is not None:
                steps[side] += result["steps"][args.warmup:]
                threads[side] = result["threads"]
    size = (f"{PROMPTS}x{GROUP},max{args.max_new_tokens},{args.model_config},{args.dtype},"
            f"{args.threads or 'default'}threads")
    env = harness.environment(args.device)
    rows = []
    for side in sides:
        if not steps[side]:
            status = "not run: trl is not installed" if side == "trl" and not have_trl \
                else "failed"
            rows.append({**env, "op": OP, "impl": side, "size": size, "status": status})
            continue
        summary = summarize(steps[side])
        rows.append({**env, "op": OP, "impl": side, "size": size, "median_ms":
                     round(summary["step_s"] * 1e3, 1), "status": "ok",
                     "extra": {**summary, "threads": threads[side], "runs": args.runs}})
    base = next((r for r in rows if r["impl"] == "trl" and r["status"] == "ok"), None)
    print(f"{size} on {env['device_name']}, commit {env['commit']}; medians over steps "
          f"after {args.warmup} warm-up steps, {args.runs} alternated runs")
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
    if not args.no_save:
        harness.RESULTS_DIR.mkdir(exist_ok=True)
        with open(harness.RESULTS_DIR / f"{OP}.jsonl", "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
