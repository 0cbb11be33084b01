"""LambdaPO with TRL on GSM8K-style data: JSON lines with ``question`` and a worked
``answer`` whose last line is ``#### <number>`` (GSM8K's format; ``openai/gsm8k`` on the Hub).
The rewards are math-verify accuracy on the number after ``####`` plus 0.1 x semantic density
against the worked answer; the advantages are LambdaPO's.

    pip install --no-build-isolation -e ".[trl]"
    python examples/trl/train_gsm8k.py --model Qwen/Qwen2.5-0.5B-Instruct \\
        --data ../shared/data/gsm8k/train.jsonl --use-vllm

Switching a GRPO script is the import and the two class names.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from lambdapo.integrations.trl import LambdaPOConfig, LambdaPOTrainer
from lambdapo.rewards import MathVerifyReward

INSTRUCTION = "Let's think step by step and output the final answer after \"####\"."


def load_rows(path: str, limit: int) -> list[dict]:
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines()[:limit or None]):
        row = json.loads(line)
        gold = re.search(r"####\s*(.+?)\s*$", row["answer"])
        if gold is None:
            raise ValueError(f"{path} line {i + 1}: the answer has no '#### <number>' line")
        rows.append({"question": row["question"], "solution": row["answer"],
                     "answer": gold.group(1).replace(",", "")})
    return rows


def accuracy_reward():
    """math-verify on the text after ``####`` against the ``answer`` column (TRL reward)."""
    verify = MathVerifyReward(answer_marker="####")

    def accuracy(prompts, completions, completion_ids, **columns) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return verify(prompts, texts, completion_ids, **columns)
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder or Hub name")
    parser.add_argument("--data", required=True, help="GSM8K-style .jsonl")
    parser.add_argument("--output-dir", default="runs/trl-lambdapo")
    parser.add_argument("--limit", type=int, default=0, help="first N rows only (0: all)")
    parser.add_argument("--max-steps", type=int, default=500)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--max-completion-length", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=1e-6)
    parser.add_argument("--use-vllm", action="store_true", help="TRL's colocated vLLM")
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()

    from datasets import Dataset
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    chat = tokenizer.chat_template is not None
    rows = load_rows(args.data, args.limit)
    for row in rows:
        text = f"{row['question']} {INSTRUCTION}"
        row["prompt"] = [{"role": "user", "content": text}] if chat else text
    config = LambdaPOConfig(
        output_dir=args.output_dir, max_steps=args.max_steps, learning_rate=args.learning_rate,
        num_generations=args.num_generations,
        per_device_train_batch_size=args.num_generations * args.prompts_per_step,
        max_completion_length=args.max_completion_length, logging_steps=1, report_to="none",
        use_vllm=args.use_vllm, vllm_mode="colocate", use_cpu=args.cpu,
        lambda_beta=1.0, lambda_score="mean", lambda_normalize="mean",
        semantic_density_weight=0.1, solution_column="solution")
    trainer = LambdaPOTrainer(model=args.model, reward_funcs=[accuracy_reward()], args=config,
                              train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.train()
    trainer.save_model(args.output_dir)


if __name__ == "__main__":
    main()
