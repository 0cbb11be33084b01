"""The worker of tests/training/test_distributed.py, run under
``python -m torch.distributed.run --nproc-per-node=2`` (two gloo processes on the CPU); the
test runs :func:`run_update` itself for the one-process side.

    distributed_worker.py OUT JOB [JOB ...]
        Each JOB in turn, in the same two processes:
        CASE (a name in CASES): a Trainer on the built-in model whose engine returns canned
            responses (a function of the prompt alone, so one process and two sample the same
            global batch), the case's steps; then rank 0 writes OUT/CASE.json (the step
            metrics and every rank's row counts per optimizer step) and OUT/CASE.safetensors
            (the whole gradient left by the last optimizer step and the whole trained
            parameters after it).
        early-finish: two steps of real sampling in which rank 0's responses end after one
            token and rank 1's run to max_new_tokens; writes OUT/early-finish.json.
        rank-fails: rank 1 raises before the first step: rank 0 must fail soon after (never
            wait).
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

import torch

from lambdapo import distributed
from lambdapo.config import load_config
from lambdapo.process import configure_process
from lambdapo.rollout.base import Rollout
from lambdapo.trainer import Trainer

BASE = {"prompts_per_step": 4, "rollout.group_size": 4, "rollout.max_new_tokens": 12,
        "micro_batch_size": 3, "device": "cpu", "threads": 1, "data.num_train": 64,
        "data.num_eval": 4, "eval_samples": 1, "reward.workers": 0, "optim.lr": 0.0,
        "dist_timeout_s": 60, "seed": 3}
# name -> (overrides, steps). lr 0 keeps the weights, so the last step's gradient is
# compared; the cases with a learning rate compare the parameters after several optimizer
# steps (the sharded AdamW state, the parameters of every shard unit).
CASES = {
    # Several optimizer steps per batch: the separate behaviour forward, global mini-batches
    # shared unevenly by the ranks (micro_batch_size 1: a count per row).
    "token-mean": ({"algorithm.mini_batches": 2, "algorithm.ppo_epochs": 2,
                    "micro_batch_size": 1, "optim.lr": 1e-3}, 2),
    # The KL reference (a second sharded model) without clipping.
    "seq-mean-token-mean": ({"algorithm.loss_agg_mode": "seq-mean-token-mean",
                             "algorithm.adv_estimator": "grpo", "algorithm.kl_coef": 0.1,
                             "optim.max_grad_norm": 0.0}, 1),
    # One response per mini-batch: in each, one rank has no rows (padding copies only);
    # gradient checkpointing.
    "seq-mean-token-sum-norm": ({"algorithm.loss_agg_mode": "seq-mean-token-sum-norm",
                                 "model.enable_gradient_checkpointing": True,
                                 "prompts_per_step": 2, "rollout.group_size": 2,
                                 "algorithm.mini_batches": 4, "optim.lr": 1e-3}, 2),
    "lora": ({"model.lora_rank": 4, "model.lora_alpha": 16, "algorithm.kl_coef": 0.05,
              "optim.lr": 1e-3}, 2),
    # A whole copy per process (DDP), several optimizer steps per batch.
    "ddp": ({"data_parallel": "ddp", "algorithm.mini_batches": 2, "micro_batch_size": 2,
             "optim.lr": 1e-3}, 2),
}


def canned_generate(vocab: int, eos: int):
    """An engine's ``generate`` whose responses and log-probs depend on the prompt alone."""
    def generate(prompt_ids, params):
        completions, logprobs, finished = [], [], []
        for prompt in prompt_ids:
            seed = zlib.crc32(json.dumps(prompt).encode())
            for k in range(params.n):
                g = torch.Generator().manual_seed(seed * 64 + k)
                length = int(torch.randint(1, params.max_new_tokens + 1, (1,), generator=g))
                ids = torch.randint(3, vocab, (length,), generator=g).tolist()
                done = bool(torch.rand((), generator=g) < 0.5) or length < params.max_new_tokens
                if done:
                    ids[-1] = eos
                completions.append(ids)
                logprobs.append((-0.5 - 2.5 * torch.rand(length, generator=g)).tolist())
                finished.append(done)
        return Rollout(completions, logprobs, finished)
    return generate


def overrides(out: Path, name: str, extra: dict) -> list[str]:
    values = {**BASE, **extra, "output_dir": out / f"run-{name}"}
    return [f"{k}={v}" for k, v in values.items()]


def whole(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def run_update(out: Path, names: list[str]) -> None:
    from safetensors.torch import save_file

    for name in names:
        extra, steps = CASES[name]
        config = load_config(None, overrides(out, f"{name}-{distributed._launched_world_size()}",
                                             extra))
        configure_process(config)
        parallel = distributed.current()
        with Trainer(config, progress=False) as trainer:
            trainer.engine.generate = canned_generate(trainer.model.config.vocab_size,
                                                      trainer.tokenizer.eos_token_id)
            counts: list[int] = []   # this rank's rows of each optimizer step (and behaviour)
            plan = trainer._padded_micro_batches
            trainer._padded_micro_batches = lambda batch, rows: counts.append(len(rows)) or \
                plan(batch, rows)
            metrics = [trainer.train_step() for _ in range(steps)]
            grads = {f"grad.{n}": whole(p.grad).detach().clone()
                     for n, p in trainer.model.named_parameters() if p.grad is not None}
            with trainer.policy.full_weights():
                params = {f"param.{n}": p.detach().clone()
                          for n, p in trainer.model.named_parameters() if p.requires_grad}
            every_rank = parallel.all_gather_objects(counts)
            fused = trainer.micro_loss.fused
        if parallel.is_main:
            save_file({k: v.contiguous() for k, v in {**grads, **params}.items()},
                      str(out / f"{name}.safetensors"))
            (out / f"{name}.json").write_text(json.dumps(
                {"metrics": metrics, "rows_per_rank": every_rank,
                 "world_size": parallel.world_size, "fused_policy_loss": fused}))


def run_early_finish(out: Path) -> None:
    config = load_config(None, overrides(out, "early", {"rollout.max_new_tokens": 24,
                                                        "optim.lr": 1e-3}))
    configure_process(config)
    parallel = distributed.current()
    with Trainer(config, progress=False) as trainer:
        generate = trainer.engine.generate
        lengths = []

        def capped(prompts, params):
            if parallel.rank == 0:   # every response of rank 0 ends after its first token
                params = type(params)(**{**vars(params), "max_new_tokens": 1})
            rollout = generate(prompts, params)
            lengths.append(max(len(c) for c in rollout.completion_ids))
            return rollout
        trainer.engine.generate = capped
        metrics = [trainer.train_step() for _ in range(2)]
        every_rank = parallel.all_gather_objects(lengths)
    if parallel.is_main:
        (out / "early-finish.json").write_text(json.dumps(
            {"metrics": metrics, "longest_per_rank": every_rank}))


def run_rank_fails(out: Path) -> None:
    config = load_config(None, overrides(out, "fails", {}))
    configure_process(config)
    with Trainer(config, progress=False) as trainer:
        if distributed.current().rank == 1:
            raise RuntimeError("rank 1 fails on purpose")
        trainer.train_step()


def main() -> None:
    out, jobs = Path(sys.argv[1]), sys.argv[2:]
    out.mkdir(parents=True, exist_ok=True)
    try:
        for job in jobs:
            if job in CASES:
                run_update(out, [job])
            elif job == "early-finish":
                run_early_finish(out)
            elif job == "rank-fails":
                run_rank_fails(out)
            else:
                raise SystemExit(f"unknown job {job}")
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
