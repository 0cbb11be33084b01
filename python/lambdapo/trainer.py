"""The LambdaPO training loop.

One step is collect -> score -> update:

* collect: take ``prompts_per_step`` prompts, sample ``group_size`` responses each with the
  rollout engine (transformers or vLLM) into one :class:`~lambdapo.batch.RolloutBatch` on
  the policy's device;
* score: rewards, confidence scores and advantages (and, when the update cannot be its own
  behaviour forward, the trainer's log-probs of the responses with their importance
  weights over the engine's: rollout correction);
* update: ``ppo_epochs`` passes of PPO-clip over ``mini_batches`` optimizer steps, each
  accumulated over micro-batches of similar response lengths that share their prompts'
  forward; then the engine serves the new weights.

Outputs go to one run directory:
``config.yaml``, ``metrics.jsonl``, ``samples.jsonl``, TensorBoard events, ``curves.png``,
``checkpoints/``.
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from . import advantages as adv_lib
from . import checkpoint as ckpt
from .config import LambdapoWarning, TrainConfig, config_changes, save_config, to_dict
from .batch import MicroBatch, RolloutBatch, plan_micro_batches
from .data import PromptEncoder, PromptSampler, load_split
from .loss import BatchTotals, policy_loss, rollout_is_weights
from .policy import (autocast_dtype, load_policy, pick_device, prompt_sharing_agrees,
                     resolve_model_path, response_logprobs)
from .rewards import MathVerifyReward, RewardManager
from .rollout import SamplingParams, build_engine


@dataclass
class EvalResult:
    accuracy: float      # mean over prompts and samples of the math_verify reward
    reward: float        # mean total reward
    samples: int


@dataclass
class Scored:
    """What scoring a step's batch gives besides the tensors it sets on the batch."""
    texts: list[str]                      # decoded responses
    total: list[float]                    # total reward per response
    per_function: dict[str, list[float]]  # each reward function's values
    correct: list[float]                  # math_verify reward per response


class Trainer:
    """Builds everything a run needs from a :class:`TrainConfig`; :meth:`train` runs it.

    ``resume``: a checkpoint folder or run directory to continue from (``"auto"``:
    ``output_dir``'s latest checkpoint). A resumed run whose config differs from the
    checkpoint's in a field outside :data:`lambdapo.config.RESUMABLE_CHANGES` raises
    ValueError unless ``allow_config_change``; the other differences are warned about.
    The trainer holds a lock on ``output_dir`` until :meth:`close`
    (:class:`lambdapo.checkpoint.RunDirectoryLocked` if another run holds it)."""

    def __init__(self, config: TrainConfig, *, resume: str | None = None,
                 progress: bool = True, allow_config_change: bool = False):
        self.config = config
        self.progress = progress
        self.run_dir = Path(config.output_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Held from before the model loads (a second run fails at once) until close();
        # released here if __init__ fails.
        self._lock = ckpt.lock_run_dir(self.run_dir)
        try:
            if config.threads:
                torch.set_num_threads(config.threads)
            random.seed(config.seed)
            torch.manual_seed(config.seed)
            self.device = pick_device(config.device)
            if self.device.type == "cpu":
                _keep_freed_memory()
            self.autocast = autocast_dtype(config.model)
            self.model, self.tokenizer = load_policy(config.model, self.device)
            self.model.train()
            self.ref_model = None
            if config.algorithm.kl_coef > 0:
                self.ref_model, _ = load_policy(config.model, self.device)
                self.ref_model.eval().requires_grad_(False)
            self.pad = self.tokenizer.pad_token_id
            self.encoder = PromptEncoder(self.tokenizer, config.data)
            self.share_prompts: bool | None = None   # decided on the first micro-batch
            self.rewards = RewardManager.from_config(config.reward)
            self.accuracy_reward = MathVerifyReward(config.reward.answer_marker,
                                                    config.reward.timeout_s,
                                                    config.reward.workers)
            self.train_rows = load_split(config.data, "train", config.seed)
            self.eval_rows = load_split(config.data, "eval", config.seed)
            self.sampler = PromptSampler(self.train_rows, config.seed)
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.optim.lr,
                                               betas=tuple(config.optim.betas),
                                               weight_decay=config.optim.weight_decay)
            total = config.steps * config.algorithm.ppo_epochs * config.algorithm.mini_batches
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, _schedule(config.optim.schedule, config.optim.warmup_steps, total))
            self.shuffle = torch.Generator().manual_seed(config.seed + 1)
            self.step = 0
            self.history: list[dict] = []
            self.eval_history: list[dict] = []
            self.elapsed_before = 0.0
            self.engine = build_engine(config, self.model, self.tokenizer,
                                       resolve_model_path(config.model.path))
            if resume:
                self._resume(resume, allow_config_change)
                self.engine.sync_weights()
            elif (self.run_dir / "checkpoints" / "latest").exists():
                warnings.warn(f"output_dir {self.run_dir} holds an earlier run's checkpoints; "
                              f"this run starts over and replaces them as it saves (--resume "
                              f"continues that run instead)", LambdapoWarning, stacklevel=2)
            save_config(config, self.run_dir / "config.yaml")
        except BaseException:
            self._lock.close()
            raise

    # ----------------------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self, temperature: float | None = None) -> EvalResult:
        """Held-out accuracy: the math_verify reward averaged over ``eval_samples`` samples
        per prompt at ``temperature`` (None: ``eval_temperature``, whose negative values
        mean the rollout temperature; 0: greedy, one sample). Sampling is seeded apart from
        training's, so evaluating does not change what training draws next."""
        cfg = self.config
        if temperature is None:
            temperature = cfg.eval_temperature
        if temperature < 0:
            temperature = cfg.rollout.temperature
        n = 1 if temperature == 0 else cfg.eval_samples
        params = SamplingParams(n=n, temperature=temperature, top_p=cfg.rollout.top_p,
                                top_k=cfg.rollout.top_k, max_new_tokens=cfg.rollout.max_new_tokens)
        with self.engine.reseeded(cfg.seed + 12345):
            rollout = self.engine.generate(
                [self.encoder.prompt_ids(r) for r in self.eval_rows], params)
        texts = self._decode(rollout.completion_ids)
        columns = self.encoder.columns(self.eval_rows, n)
        prompts = [row["prompt"] for row in self.eval_rows for _ in range(n)]
        total, per_function = self.rewards.score(prompts, texts, rollout.completion_ids, columns)
        correct = self._correct(per_function, prompts, texts, rollout.completion_ids, columns)
        return EvalResult(sum(correct) / len(correct), sum(total) / len(total), len(correct))

    def _decode(self, ids: list[list[int]]) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def _correct(self, per_function, prompts, texts, completion_ids, columns) -> list[float]:
        """The math_verify reward per completion: reused when it is one of the rewards."""
        if "math_verify" in per_function:
            return per_function["math_verify"]
        return self.accuracy_reward(prompts, texts, completion_ids, **columns)

    # ----------------------------------------------------------------------------- train
    def train_step(self) -> dict:
        """One step: :meth:`collect` -> :meth:`score` -> :meth:`update`, then the engine
        serves the new weights. Scoring overlaps the update: the rewards start in the
        background (math_verify with ``reward.workers``) and are waited for after the first
        micro-batch's forward. Returns the step's metrics; ``middle_time`` is the time the
        step spent on scoring and waiting for it, ``train_time`` the rest of the update."""
        cfg = self.config
        t0 = time.perf_counter()
        rows = self.sampler.take(cfg.prompts_per_step)
        batch = self.collect(rows)
        gen_time = time.perf_counter() - t0
        finish_scoring = self.start_scoring(batch, rows)
        # On a CPU, torch leaves the reward workers their cores while they verify (its
        # threads would otherwise wait on each other's descheduled ones at every op).
        threads = torch.get_num_threads()
        if self.device.type == "cpu" and self.rewards.workers > 0:
            torch.set_num_threads(max(1, threads - self.rewards.workers))
        t1 = time.perf_counter()
        middle_time = t1 - t0 - gen_time
        done: list[Scored] = []

        def before_loss() -> None:
            nonlocal middle_time
            start = time.perf_counter()
            try:
                done.append(finish_scoring())
            finally:
                torch.set_num_threads(threads)
            middle_time += time.perf_counter() - start

        try:
            update = self.update(batch, before_loss=before_loss)
        finally:
            torch.set_num_threads(threads)
        scored = done[0]
        self.engine.sync_weights()
        self.step += 1
        mask = batch.response_mask
        tokens = batch.num_tokens
        total = scored.total
        metrics = {
            "step": self.step,
            "reward": sum(total) / len(total),
            **{f"reward/{k}": sum(v) / len(v) for k, v in scored.per_function.items()},
            "accuracy": sum(scored.correct) / len(scored.correct),
            "advantage/mean": float(batch.advantages.mean()),
            "advantage/std": float(batch.advantages.std()),
            "advantage/abs_mean": float(batch.advantages.abs().mean()),
            "score/mean": float(batch.scores.mean()),
            "entropy": float((batch.entropy * mask).sum() / max(tokens, 1)),
            "response_length": tokens / batch.size,
            "finished": sum(batch.finished) / batch.size,
            **update,
            **batch.mismatch,
            "lr": self.scheduler.get_last_lr()[0],
            "tokens_per_s": tokens / max(gen_time, 1e-9),
            "gen_time": gen_time,
            "middle_time": middle_time,
            "train_time": time.perf_counter() - t0 - gen_time - middle_time,
            "step_time": time.perf_counter() - t0,
        }
        if self.rewards.errors:
            metrics["reward_errors"] = sum(self.rewards.errors.values())
        self._log_samples(rows[0]["prompt"], scored.texts[:cfg.log_samples],
                          total[:cfg.log_samples])
        return metrics

    def collect(self, rows: list[dict]) -> RolloutBatch:
        """Samples ``rollout.group_size`` responses per row with the engine."""
        cfg = self.config
        prompts = [self.encoder.prompt_ids(r) for r in rows]
        params = SamplingParams(n=cfg.rollout.group_size, temperature=cfg.rollout.temperature,
                                top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
                                max_new_tokens=cfg.rollout.max_new_tokens)
        rollout = self.engine.generate(prompts, params)
        return RolloutBatch.from_rollout(prompts, rollout, params.n, self.pad, self.device)

    def score(self, batch: RolloutBatch, rows: list[dict]) -> Scored:
        """Rewards, confidence scores and advantages of ``batch`` (set on it, on the
        device). When the update cannot serve as its own behaviour forward
        (:meth:`_behaviour_from_update`), pi_old, the reference's log-probs, the
        rollout-correction weights and the entropy are computed here first."""
        return self.start_scoring(batch, rows)()

    def start_scoring(self, batch: RolloutBatch, rows: list[dict]) -> Callable[[], Scored]:
        """:meth:`score` in two halves: the rewards start (in the background where they
        can) and any behaviour forward runs meanwhile; the returned call waits for the
        rewards, sets the scores and advantages on ``batch`` and returns the Scored."""
        algo = self.config.algorithm
        g = batch.group_size
        texts = self._decode(batch.completion_ids)
        prompts = [row["prompt"] for row in rows for _ in range(g)]
        columns = self.encoder.columns(rows, g)
        rewards = self.rewards.start(prompts, texts, batch.completion_ids, columns)
        mask = batch.response_mask.float()
        if self._behaviour_from_update():
            # pi_old is the training forward's own (detached) log-probs; the scores need
            # them before it, and the engine's are the same numbers (see
            # _behaviour_from_update), so they serve.
            batch.scores = adv_lib.sequence_scores(batch.engine_logprobs, mask,
                                                   algo.lambda_score)
        else:
            self._behaviour_logprobs(batch)
            batch.is_weights, batch.mismatch = rollout_is_weights(
                batch.old_logprobs, batch.engine_logprobs, batch.response_mask,
                level=algo.rollout_is, cap=algo.rollout_is_cap)
            batch.scores = adv_lib.sequence_scores(batch.old_logprobs, mask, algo.lambda_score)

        def finish() -> Scored:
            total, per_function = rewards()
            correct = self._correct(per_function, prompts, texts, batch.completion_ids,
                                    columns)
            batch.rewards = torch.tensor(total, dtype=torch.float32, device=self.device)
            batch.advantages = adv_lib.compute_advantages(
                batch.rewards.view(-1, g), batch.scores.view(-1, g), algo).view(-1)
            return Scored(texts, total, per_function, correct)
        return finish

    def _behaviour_from_update(self) -> bool:
        """Whether pi_old can be the training forward's detached log-probs (no forward of
        its own): one PPO epoch of one mini-batch (on-policy, as TRL does without vLLM), and
        the scores, which are needed before that forward, either unused or computable from
        the engine's log-probs because those equal the trainer's: the transformers engine
        runs the same fp32 model on the unprocessed distribution (no top-k / top-p)."""
        cfg, algo = self.config, self.config.algorithm
        if algo.ppo_epochs != 1 or algo.mini_batches != 1:
            return False
        engine_exact = (self.engine.name == "transformers" and self.autocast is None
                        and cfg.rollout.top_k == 0 and cfg.rollout.top_p == 1.0)
        return engine_exact or not adv_lib.ESTIMATORS[algo.adv_estimator].uses_scores

    def _micro_batches(self, batch: RolloutBatch, rows: list[int]) -> list[MicroBatch]:
        lengths = [batch.response_length(r) for r in range(batch.size)]
        parts = plan_micro_batches(lengths, rows, self.config.micro_batch_size)
        return [batch.micro_batch(part) for part in parts]

    def _logprobs(self, model, micro: MicroBatch) -> tuple[Tensor, Tensor]:
        if self.share_prompts is None:   # checked once, on the first real micro-batch
            was_training = self.model.training
            self.model.eval()
            self.share_prompts = prompt_sharing_agrees(
                self.model, micro, self.config.rollout.temperature, autocast=self.autocast)
            self.model.train(was_training)
            if not self.share_prompts:
                warnings.warn("this model's key-value cache cannot be shared between the "
                              "responses of a prompt; every response runs with its prompt",
                              LambdapoWarning, stacklevel=3)
        return response_logprobs(model, micro, self.config.rollout.temperature,
                                 autocast=self.autocast, share_prompts=self.share_prompts)

    @torch.no_grad()
    def _behaviour_logprobs(self, batch: RolloutBatch) -> None:
        """pi_old, its entropy and the reference's log-probs of every row, set on ``batch``."""
        old = torch.zeros_like(batch.engine_logprobs)
        entropy = torch.zeros_like(old)
        ref = torch.zeros_like(old) if self.ref_model is not None else None
        self.model.eval()
        for micro in self._micro_batches(batch, list(range(batch.size))):
            lp, h = self._logprobs(self.model, micro)
            old[micro.rows, :micro.width] = lp
            entropy[micro.rows, :micro.width] = h
            if ref is not None:
                ref[micro.rows, :micro.width] = self._logprobs(self.ref_model, micro)[0]
        self.model.train()
        batch.old_logprobs, batch.entropy, batch.ref_logprobs = old, entropy, ref

    def update(self, batch: RolloutBatch,
               before_loss: Callable[[], None] | None = None) -> dict:
        """PPO-clip passes over ``batch``: ``ppo_epochs`` x ``mini_batches`` optimizer steps,
        each accumulated over micro-batches. ``before_loss`` runs once, after the first
        micro-batch's forward and before its loss (which needs ``batch.advantages``): the
        step's scoring finishes there, overlapped with that forward. Without a separate
        behaviour forward (``batch.old_logprobs`` None) pi_old is each micro-batch's own
        detached log-probs, and the rollout-correction weights, the reference's log-probs,
        the entropy and the mismatch metrics are computed here (set on ``batch``). Returns
        the update's metrics."""
        cfg, algo = self.config, self.config.algorithm
        sums = {"clipped": 0.0, "ratio": 0.0, "tokens": 0.0, "kl": 0.0}
        losses, grad_norms = [], []
        count = batch.size
        fused = batch.old_logprobs is None
        if fused:
            seen_lp = torch.zeros_like(batch.engine_logprobs)
            seen_h = torch.zeros_like(batch.engine_logprobs)
        for _ in range(algo.ppo_epochs):
            order = torch.randperm(count, generator=self.shuffle).tolist()
            for part in range(algo.mini_batches):
                mini = order[part * count // algo.mini_batches:(part + 1) * count // algo.mini_batches]
                if not mini:
                    continue
                totals = BatchTotals(tokens=sum(batch.response_length(r) for r in mini),
                                     sequences=len(mini),
                                     max_new_tokens=cfg.rollout.max_new_tokens)
                self.optimizer.zero_grad(set_to_none=True)
                mini_loss = 0.0
                for micro in self._micro_batches(batch, mini):
                    lp, h = self._logprobs(self.model, micro)
                    rows, width, mask = micro.rows, micro.width, micro.response_mask
                    if fused:
                        old = lp.detach()
                        seen_lp[rows, :width] = old
                        seen_h[rows, :width] = h.detach()
                        weights, _ = rollout_is_weights(old, batch.engine_logprobs[rows, :width],
                                                        mask, level=algo.rollout_is,
                                                        cap=algo.rollout_is_cap)
                        ref = None
                        if self.ref_model is not None:
                            with torch.no_grad():
                                ref = self._logprobs(self.ref_model, micro)[0]
                    else:
                        old = batch.old_logprobs[rows, :width]
                        weights = (None if batch.is_weights is None
                                   else batch.is_weights[rows, :width])
                        ref = (None if batch.ref_logprobs is None
                               else batch.ref_logprobs[rows, :width])
                    if before_loss is not None:
                        before_loss()
                        before_loss = None
                    loss, m = policy_loss(
                        lp, old, batch.advantages[rows], mask,
                        clip_low=algo.clip_low, clip_high=algo.clip_high,
                        agg_mode=algo.loss_agg_mode, totals=totals, ref_logprobs=ref,
                        kl_coef=algo.kl_coef, is_weights=weights)
                    loss.backward()
                    mini_loss += float(loss.detach())
                    for k, v in m.items():
                        sums[k] += v
                if cfg.optim.max_grad_norm > 0:
                    norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                          cfg.optim.max_grad_norm)
                else:
                    norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in
                                          self.model.parameters() if p.grad is not None))
                self.optimizer.step()
                self.scheduler.step()
                losses.append(mini_loss)
                grad_norms.append(float(norm))
        if before_loss is not None:   # no micro-batch ran
            before_loss()
        tokens = max(sums["tokens"], 1.0)
        out = {"loss": sum(losses) / len(losses), "grad_norm": sum(grad_norms) / len(grad_norms),
               "clip_frac": sums["clipped"] / tokens, "ratio": sums["ratio"] / tokens}
        if algo.kl_coef > 0:
            out["kl"] = sums["kl"] / tokens
        if fused:
            _, batch.mismatch = rollout_is_weights(seen_lp, batch.engine_logprobs,
                                                   batch.response_mask, level=algo.rollout_is,
                                                   cap=algo.rollout_is_cap)
            batch.entropy = seen_h
        return out

    # ----------------------------------------------------------------------------- outputs
    def _log_samples(self, prompt: str, texts: list[str], rewards: list[float]) -> None:
        if not texts:
            return
        with (self.run_dir / "samples.jsonl").open("a") as f:
            for text, reward in zip(texts, rewards):
                f.write(json.dumps({"step": self.step, "prompt": prompt, "completion": text,
                                    "reward": reward}) + "\n")

    def save(self) -> Path:
        state = {"sampler": self.sampler.state(), "history": self.history,
                 "eval_history": self.eval_history, "config": to_dict(self.config),
                 "elapsed": self.elapsed_before + self._elapsed()}
        rng = {"engine": self.engine.generator_state(), "shuffle": self.shuffle.get_state(),
               "torch": torch.get_rng_state()}
        return ckpt.save_checkpoint(self.run_dir, self.step, model=self.model,
                                    tokenizer=self.tokenizer, optimizer=self.optimizer,
                                    scheduler=self.scheduler, rng=rng, state=state,
                                    keep_last=self.config.checkpoint.keep_last)

    def _resume(self, where: str, allow_config_change: bool = False) -> None:
        folder = ckpt.find_checkpoint(self.run_dir if where == "auto" else where)
        ckpt.verify_checkpoint(folder)
        state, rng = ckpt.load_checkpoint(folder, optimizer=self.optimizer,
                                          scheduler=self.scheduler, device=self.device)
        breaking, harmless = config_changes(state.get("config", {}), to_dict(self.config))
        if breaking and not allow_config_change:
            raise ValueError(f"--resume {folder}: the config differs from the checkpoint's "
                             f"in {'; '.join(breaking)}. Undo the change, start a new run "
                             f"(another output_dir), or allow it (--allow-config-change)")
        if breaking or harmless:
            warnings.warn(f"resuming {folder} with a changed config: "
                          f"{'; '.join(breaking + harmless)}", LambdapoWarning, stacklevel=3)
        ckpt.load_weights_into(self.model, folder)
        self.step = int(state["step"])
        self.sampler.load_state(state["sampler"])
        self.history = state["history"]
        self.eval_history = state["eval_history"]
        self.elapsed_before = float(state.get("elapsed", 0.0))
        self.engine.set_generator_state(rng["engine"])
        self.shuffle.set_state(rng["shuffle"])
        torch.set_rng_state(rng["torch"])

    def _elapsed(self) -> float:
        return time.perf_counter() - self._start if hasattr(self, "_start") else 0.0

    def train(self) -> dict:
        """Runs the remaining steps; returns a summary (accuracy before/after, time)."""
        from tqdm.auto import tqdm

        from .metrics import MetricsWriter, plot_curves, truncate_jsonl

        cfg = self.config
        self._start = time.perf_counter()
        writer = MetricsWriter(self.run_dir, last_step=self.step)
        truncate_jsonl(self.run_dir / "samples.jsonl", self.step)
        if not self.eval_history:
            before = self.evaluate()
            self.eval_history.append({"step": 0, "accuracy": before.accuracy,
                                      "reward": before.reward})
            writer.scalars({"eval/accuracy": before.accuracy, "eval/reward": before.reward}, 0)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress,
                   desc="lambdapo", unit="step", dynamic_ncols=True)
        while self.step < cfg.steps:
            metrics = self.train_step()
            self.history.append(metrics)
            writer.write(metrics)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['accuracy']:.2f}")
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                result = self.evaluate()
                self.eval_history.append({"step": self.step, "accuracy": result.accuracy,
                                          "reward": result.reward})
                writer.scalars({"eval/accuracy": result.accuracy,
                                "eval/reward": result.reward}, self.step)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                writer.flush()   # the events up to a checkpoint survive a kill after it
                self.save()
        bar.close()
        after = self.evaluate()
        self.eval_history.append({"step": self.step, "accuracy": after.accuracy,
                                  "reward": after.reward})
        writer.scalars({"eval/accuracy": after.accuracy, "eval/reward": after.reward}, self.step)
        self.save()
        elapsed = self.elapsed_before + self._elapsed()
        summary = {"engine": self.engine.name,
                   "accuracy_before": self.eval_history[0]["accuracy"],
                   "accuracy_after": after.accuracy, "seconds": elapsed, "steps": self.step,
                   "eval_samples": after.samples, "eval_history": self.eval_history}
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        plot_curves(self.history, self.eval_history, self.run_dir / "curves.png",
                    title=f"{self.run_dir} (adv_estimator={cfg.algorithm.adv_estimator}, "
                          f"seed {cfg.seed})")
        writer.close()
        return summary


    def close(self) -> None:
        """Shuts the rollout engine down (a vLLM engine holds memory until then), stops the
        reward worker processes and releases the lock on ``output_dir``."""
        self.engine.close()
        self.rewards.close()
        self.accuracy_reward.close()
        self._lock.close()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _keep_freed_memory() -> None:
    """Asks glibc's malloc to keep freed memory for reuse instead of returning it to the
    system: a CPU step allocates activations of the same sizes again and again, and each
    one returned (every block of 128 KiB or more by default) is page-faulted and zeroed anew
    on its next use (~8k faults a step on the built-in model, ~5% of a step at 2 threads).
    The process keeps its peak memory until it exits. Nothing happens off glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        libc = None
    if libc is None or not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)       # glibc's largest: blocks below come from the heap
    libc.mallopt(m_trim_threshold, (1 << 31) - 1)  # and stay there once freed (an int)
    libc.mallopt(m_top_pad, 256 << 20)             # grown 256 MiB at a time


def _schedule(kind: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return factor
