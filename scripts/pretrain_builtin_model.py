#!/usr/bin/env python
"""Pre-trains a built-in tiny model on a built-in task to *partial* competence.

``--task`` names the task (``lambdapo.tasks.TASKS``: ``arithmetic``, the default, or
``chain``). What it makes (``--out``, default ``python/lambdapo/assets/tiny-<task>/``):

* a character-level tokenizer (``tokenizers`` WordLevel over single characters, with
  ``<pad>``/``<s>``/``</s>``/``<unk>``) saved as a ``PreTrainedTokenizerFast``: it
  prepends ``<s>`` to every text and never appends ``</s>``; decoding joins characters;
* a tiny ``LlamaForCausalLM`` (head_dim 64 so vLLM can serve it), trained with plain
  cross-entropy on ``prompt + solution + </s>`` rows of the train split, the loss on the
  solution tokens and ``</s>`` only;
* ``README.md`` with held-out accuracies and the exact command that made the checkpoint.

Why it stops early: the built-in ``lambdapo train`` run has to *show* RL learning, so
the checkpoint must leave room. Every ``--eval-every`` steps the script samples (T=1)
one completion per problem of a dev set (train-split problems of another seed, not in
the training pool) and stops once that pass@1 reaches ``--target-sampled-acc``, or at
``--max-steps``. ``--steps N`` instead trains exactly N steps (no early stop). The
target is per task (``TASK_DEFAULTS``): the multi-step ``chain`` model stops weaker, so
that RL on it keeps improving for longer than on ``arithmetic``.

Reproducible: everything is seeded (``--seed``) and CPU training with a fixed
``--threads`` (default 1) is deterministic, so the same command on the same torch gives
the same checkpoint. It takes a few minutes on one CPU core. Run from the repository root::

    PYTHONPATH=python python scripts/pretrain_builtin_model.py               # tiny-arithmetic
    PYTHONPATH=python python scripts/pretrain_builtin_model.py --task chain  # tiny-chain
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import shlex
import sys
import time
from pathlib import Path

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))
from lambdapo.tasks import TASKS  # noqa: E402

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
# Per-task defaults of the options left unset on the command line, and the README's
# description of the model.
TASK_DEFAULTS = {
    "arithmetic": {"target_sampled_acc": 0.4, "role": "the built-in model of `lambdapo train`"},
    "chain": {"target_sampled_acc": 0.2,
              "role": "the built-in model of `data.dataset=chain`"},
}
BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def build_tokenizer(chars: str, max_length: int) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per character of ``chars``, ids 0..3 special."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + sorted(set(chars)))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    # [\s\S] rather than "." so a newline is its own (unknown) token too.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    # <s> starts every sequence; </s> is the model's to write (generation stops there).
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", padding_side="left", model_max_length=max_length)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    tokenizer.save_pretrained(out)
    # transformers 5 writes its internal class name; "PreTrainedTokenizerFast" loads with
    # both transformers 4.x (e.g. the one vLLM pins) and 5.x.
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.pop("backend", None)
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def build_model(args, tokenizer) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.heads, head_dim=args.hidden // args.heads,
        max_position_embeddings=args.max_positions, rope_theta=10000.0,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32")
    return LlamaForCausalLM(config)


def encode_rows(tokenizer, rows) -> list[tuple[list[int], int]]:
    """(token ids of <s> prompt solution </s>, number of prompt tokens incl. <s>) per row."""
    prompts = tokenizer([r["prompt"] for r in rows])["input_ids"]
    sols = tokenizer([r["solution"] for r in rows], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [(p + s + [eos], len(p)) for p, s in zip(prompts, sols)]


def collate(batch, pad_id: int):
    """Right-padded input_ids/attention_mask/labels; labels -100 on prompt and padding."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(batch):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, n_prompt:len(ids)] = torch.tensor(ids[n_prompt:])
        mask[i, :len(ids)] = 1
    return input_ids, mask, labels


def boxed_answer(text: str) -> str | None:
    found = BOXED.findall(text)
    return found[-1].strip() if found else None


@torch.no_grad()
def accuracy(model, tokenizer, rows, *, sample: bool, num_samples: int = 1,
             max_new_tokens: int = 64, batch_size: int = 256) -> float:
    """pass@1 of the last ``\\boxed{}`` against the gold answer (exact string match).

    Sampling is at temperature 1.0 with no top-k/top-p, averaged over ``num_samples``
    samples per problem; greedy when ``sample`` is False.
    """
    model.eval()
    tokenizer.padding_side = "left"
    correct = total = 0
    for _ in range(num_samples if sample else 1):
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            enc = tokenizer([r["prompt"] for r in chunk], return_tensors="pt", padding=True)
            out = model.generate(
                **enc, do_sample=sample, temperature=1.0 if sample else None, top_k=0 if sample else None,
                top_p=1.0 if sample else None, max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            correct += sum(boxed_answer(t) == r["answer"] for t, r in zip(texts, chunk))
            total += len(chunk)
    model.train()
    return correct / total


def write_readme(out: Path, args, command: str, model, tokenizer, result: dict) -> None:
    n_params = sum(p.numel() for p in model.parameters())
    c = model.config
    task = TASKS[args.task]
    example = task.generate("eval", 2, seed=0, **difficulty(args))
    text = f"""# tiny-{args.task}: {TASK_DEFAULTS[args.task]['role']}

A {n_params / 1e6:.2f}M-parameter `LlamaForCausalLM` with a character-level tokenizer,
pre-trained with cross-entropy on the `{args.task}` task (`lambdapo.tasks.{args.task}`,
difficulty {difficulty(args)}) and stopped at partial competence, so that RL has
room to show learning. Made by `scripts/pretrain_builtin_model.py`; do not edit by hand.

Produced by (from the repository root):

    {command}

| | |
|---|---|
| architecture | Llama, {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} heads (head_dim {c.head_dim}), MLP {c.intermediate_size}, untied embeddings, RoPE, max_position_embeddings {c.max_position_embeddings} |
| tokenizer | {len(tokenizer)} tokens: `<pad>`=0 `<s>`=1 `</s>`=2 `<unk>`=3 and one token per character of `{task.CHARS}`; `<s>` is prepended to every text, `</s>` ends a completion |
| pre-training | {result['steps']} steps x {args.batch_size} sequences, AdamW lr {args.lr} (warmup {args.warmup}), seed {args.seed}, {result['train_seconds']:.0f} s on {args.threads} CPU thread(s) |
| stop rule | dev pass@1 sampled at T=1 >= {args.target_sampled_acc} (checked every {args.eval_every} steps) or {args.max_steps} steps |
| torch / transformers | {torch.__version__} / {result['transformers']} |

Held-out accuracy on the first {args.eval_size} problems of `{args.task}.generate("eval", {args.eval_size}, seed=0)`
(exact match of the last `\\boxed{{}}` with the gold answer, max {args.max_new_tokens} new tokens):

| decoding | pass@1 |
|---|---|
| greedy | {result['eval_greedy']:.3f} |
| sampled, T=1.0 (no top-k/top-p), mean of {args.eval_samples} samples | {result['eval_sampled']:.3f} |

Example (prompt -> completion the model is trained to write):

    {example[0]['prompt']}  ->  {example[0]['solution']}</s>
    {example[1]['prompt']}  ->  {example[1]['solution']}</s>
"""
    (out / "README.md").write_text(text)


def difficulty(args) -> dict:
    """The task's default difficulty with the ``--difficulty`` overrides applied."""
    return {**TASKS[args.task].DEFAULT_DIFFICULTY, **dict(args.difficulty)}


def difficulty_item(text: str) -> tuple[str, int | str]:
    """``"max_digits=4"`` -> ``("max_digits", 4)``; a non-integer value stays a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--difficulty wants KEY=VALUE, got {text!r}")
    return key, int(value) if value.lstrip("-").isdigit() else value


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS), default="arithmetic",
                   help="built-in task to pre-train on")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (model, tokenizer, README.md); default "
                        "python/lambdapo/assets/tiny-<task>")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the data order, init and sampling")
    # One thread: on a shared 2-vCPU machine a busy neighbour makes 2-thread OpenMP
    # barriers stall (measured 3.4 s vs 0.22 s per step); results also depend on it.
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads")
    p.add_argument("--difficulty", type=difficulty_item, action="append", default=[],
                   metavar="KEY=VALUE",
                   help="task difficulty argument (repeatable; see the task's generate(), "
                        "e.g. max_digits=4); unset keys keep the task's DEFAULT_DIFFICULTY")
    p.add_argument("--train-rows", type=int, default=200_000, help="size of the training pool")
    # Model.
    p.add_argument("--layers", type=int, default=3,
                   help="decoder layers")
    p.add_argument("--hidden", type=int, default=128,
                   help="hidden size")
    p.add_argument("--heads", type=int, default=2,
                   help="attention heads (head_dim = hidden / heads, keep >= 32)")
    p.add_argument("--intermediate", type=int, default=384,
                   help="MLP size")
    p.add_argument("--max-positions", type=int, default=256,
                   help="max_position_embeddings (prompt + completion)")
    # Optimisation and the stop rule.
    p.add_argument("--batch-size", type=int, default=64,
                   help="sequences per step")
    p.add_argument("--lr", type=float, default=2e-3,
                   help="AdamW learning rate")
    p.add_argument("--warmup", type=int, default=100,
                   help="linear warmup steps, constant after")
    p.add_argument("--max-steps", type=int, default=20_000,
                   help="give up on the stop rule after this many steps")
    p.add_argument("--steps", type=int, default=None,
                   help="train exactly this many steps (no early stop)")
    p.add_argument("--target-sampled-acc", type=float, default=None,
                   help="stop once dev pass@1 sampled at T=1 reaches this (default: per "
                        "task, TASK_DEFAULTS)")
    p.add_argument("--eval-every", type=int, default=50,
                   help="steps between dev checks")
    p.add_argument("--dev-size", type=int, default=512,
                   help="dev problems per check")
    # Final held-out evaluation.
    p.add_argument("--eval-size", type=int, default=500,
                   help="held-out eval problems for the final report")
    p.add_argument("--eval-samples", type=int, default=8,
                   help="samples per eval problem for sampled pass@1")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="generation limit in evaluation (saved in generation_config.json)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = REPO / "python/lambdapo/assets" / f"tiny-{args.task}"
    if args.target_sampled_acc is None:
        args.target_sampled_acc = TASK_DEFAULTS[args.task]["target_sampled_acc"]
    task = TASKS[args.task]
    try:
        task.generate("train", 0, **difficulty(args))
    except ValueError as exc:
        p.error(f"--difficulty: {exc}")

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    t0 = time.time()

    tokenizer = build_tokenizer(task.CHARS, args.max_positions)
    model = build_model(args, tokenizer)
    print(f"model: {sum(q.numel() for q in model.parameters()):,} parameters, "
          f"vocab {len(tokenizer)}", flush=True)

    train_rows = task.generate("train", args.train_rows, seed=args.seed, **difficulty(args))
    seen = {r["prompt"] for r in train_rows}
    # Dev problems: train split (eval stays untouched until the end), another seed, unseen.
    dev_rows = [r for r in task.generate("train", args.dev_size + 64, seed=args.seed + 10_000,
                                         **difficulty(args)) if r["prompt"] not in seen]
    dev_rows = dev_rows[:args.dev_size]
    eval_rows = task.generate("eval", args.eval_size, seed=0, **difficulty(args))
    encoded = encode_rows(tokenizer, train_rows)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup))
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(encoded), generator=gen).tolist()
    pos, step, dev_sampled = 0, 0, 0.0
    total_steps = args.steps if args.steps is not None else args.max_steps
    model.train()
    while step < total_steps:
        if pos + args.batch_size > len(order):
            order, pos = torch.randperm(len(encoded), generator=gen).tolist(), 0
        batch = [encoded[i] for i in order[pos:pos + args.batch_size]]
        pos += args.batch_size
        input_ids, mask, labels = collate(batch, tokenizer.pad_token_id)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        if step % args.eval_every == 0:
            dev_sampled = accuracy(model, tokenizer, dev_rows, sample=True,
                                   max_new_tokens=args.max_new_tokens)
            print(f"step {step:5d}  loss {loss.item():.4f}  dev sampled pass@1 {dev_sampled:.3f}  "
                  f"({time.time() - t0:.0f} s)", flush=True)
            if args.steps is None and dev_sampled >= args.target_sampled_acc:
                break
    train_seconds = time.time() - t0

    result = {
        "steps": step, "train_seconds": train_seconds, "dev_sampled": dev_sampled,
        "transformers": transformers.__version__,
        "eval_greedy": accuracy(model, tokenizer, eval_rows, sample=False,
                                max_new_tokens=args.max_new_tokens),
        "eval_sampled": accuracy(model, tokenizer, eval_rows, sample=True,
                                 num_samples=args.eval_samples, max_new_tokens=args.max_new_tokens),
    }
    print(f"held-out ({args.eval_size} eval problems): greedy pass@1 {result['eval_greedy']:.3f}, "
          f"sampled T=1 pass@1 {result['eval_sampled']:.3f} (mean of {args.eval_samples})", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, max_new_tokens=args.max_new_tokens)
    model.save_pretrained(args.out, safe_serialization=True)
    save_tokenizer(tokenizer, args.out)
    try:
        shown_out = args.out.resolve().relative_to(REPO)
    except ValueError:
        shown_out = args.out
    cli = list(sys.argv[1:] if argv is None else argv)
    command = ("PYTHONPATH=python python scripts/pretrain_builtin_model.py "
               + " ".join(shlex.quote(a) for a in cli)).rstrip()
    write_readme(args.out, args, command, model, tokenizer, result)
    print(f"saved to {shown_out} ({time.time() - t0:.0f} s, python {platform.python_version()})")
    return result


if __name__ == "__main__":
    main()
