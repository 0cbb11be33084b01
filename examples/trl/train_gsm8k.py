"""LambdaPO with TRL: a GRPO script whose trainer and config classes are LambdaPO's.

Runs from a clone with nothing downloaded: by default it trains the built-in model on the
built-in arithmetic task (answers in ``\\boxed{}``) on the CPU. With GSM8K-style data (JSON
lines with ``question`` and a worked ``answer`` whose last line is ``#### <number>``:
GSM8K's format, ``openai/gsm8k`` on the Hub) and a real model it is the GSM8K recipe:

    pip install --no-build-isolation -e ".[trl]"
    python examples/trl/train_gsm8k.py --max-steps 20              # built-in, offline, CPU
    python examples/trl/train_gsm8k.py --model Qwen/Qwen2.5-0.5B-Instruct \\
        --data ../shared/data/gsm8k/train.jsonl --use-vllm         # GSM8K on a GPU

The rewards are math-verify accuracy (on the number after ``####`` for GSM8K data, in
``\\boxed{}`` for the built-in task) plus 0.1 x semantic density against the worked
solution; the advantages are LambdaPO's. Switching a GRPO script is the import and the two
class names.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from lambdapo.integrations.trl import LambdaPOConfig, LambdaPOTrainer
from lambdapo.models import resolve_model_path
from lambdapo.rewards import MathVerifyReward
from lambdapo.tasks import arithmetic

GSM8K_INSTRUCTION = "Let's think step by step and output the final answer after \"####\"."


def gsm8k_rows(path: str, limit: int) -> list[dict]:
    """GSM8K-style JSON lines as rows ``{"question", "solution", "answer"}``.

    Raises:
        ValueError: a row whose answer has no ``#### <number>`` line (names the line).
    """
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines()[:limit or None]):
        row = json.loads(line)
        gold = re.search(r"####\s*(.+?)\s*$", row["answer"])
        if gold is None:
            raise ValueError(f"{path} line {i + 1}: the answer has no '#### <number>' line")
        rows.append({"question": f"{row['question']} {GSM8K_INSTRUCTION}",
                     "solution": row["answer"], "answer": gold.group(1).replace(",", "")})
    return rows


def builtin_rows(limit: int) -> list[dict]:
    """The built-in arithmetic task's training rows (its prompts end in ``=``)."""
    return [{"question": row["prompt"], "solution": row["solution"], "answer": row["answer"]}
            for row in arithmetic.generate("train", limit or 2000, seed=0)]


def accuracy_reward(answer_marker: str):
    """math-verify of the final answer (after ``answer_marker``, or boxed when it is empty)
    against the ``answer`` column: a TRL reward function."""
    verify = MathVerifyReward(answer_marker=answer_marker)

    def accuracy(prompts, completions, completion_ids, **columns) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return verify(prompts, texts, completion_ids, **columns)
    return accuracy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:tiny-arithmetic",
                        help="model folder, Hub name or builtin:NAME (default: the built-in "
                             "model)")
    parser.add_argument("--data", default="builtin:arithmetic",
                        help="GSM8K-style .jsonl, or builtin:arithmetic (default)")
    parser.add_argument("--output-dir", default="runs/trl-lambdapo")
    parser.add_argument("--limit", type=int, default=0, help="first N rows only (0: all)")
    parser.add_argument("--max-steps", type=int, default=500)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--max-completion-length", type=int, default=0,
                        help="0: 64 for the built-in task, 256 for GSM8K data")
    parser.add_argument("--learning-rate", type=float, default=0.0,
                        help="0: 1e-4 for the built-in model, 1e-6 for another")
    parser.add_argument("--use-vllm", action="store_true", help="TRL's colocated vLLM")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even with a GPU")
    args = parser.parse_args(argv)

    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer

    builtin_data = args.data == "builtin:arithmetic"
    builtin_model = args.model.startswith("builtin:")
    model = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = builtin_rows(args.limit) if builtin_data else gsm8k_rows(args.data, args.limit)
    chat = tokenizer.chat_template is not None
    for row in rows:
        row["prompt"] = [{"role": "user", "content": row["question"]}] if chat else row["question"]
    config = LambdaPOConfig(
        output_dir=args.output_dir, max_steps=args.max_steps,
        learning_rate=args.learning_rate or (1e-4 if builtin_model else 1e-6),
        num_generations=args.num_generations,
        per_device_train_batch_size=args.num_generations * args.prompts_per_step,
        max_completion_length=args.max_completion_length or (64 if builtin_data else 256),
        logging_steps=1, report_to="none", save_strategy="no",
        use_vllm=args.use_vllm, vllm_mode="colocate",
        use_cpu=args.cpu or not torch.cuda.is_available(),
        lambda_beta=1.0, lambda_score="mean", lambda_normalize="mean",
        semantic_density_weight=0.1, solution_column="solution")
    trainer = LambdaPOTrainer(model=model, reward_funcs=[accuracy_reward(
        "" if builtin_data else "####")], args=config, train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer)
    trainer.train()
    trainer.save_model(args.output_dir)


if __name__ == "__main__":
    main()
