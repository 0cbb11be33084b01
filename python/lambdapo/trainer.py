"""The LambdaPO training loop.

One step is collect -> score -> update:

* collect: take ``prompts_per_step`` prompts, sample ``group_size`` responses each with the
  rollout engine (transformers or vLLM) into one immutable
  :class:`~lambdapo.batch.RolloutBatch` on the policy's device;
* score: rewards, confidence scores and advantages into an immutable
  :class:`~lambdapo.scoring.ScoredBatch` (:mod:`lambdapo.scoring`), the scores taken from
  the step's behaviour log-probs (:mod:`lambdapo.behaviour`: a separate forward, or the
  update's own);
* update: ``ppo_epochs`` passes of PPO-clip over ``mini_batches`` optimizer steps, each
  accumulated over micro-batches of similar response lengths; the rewards finish while the
  first micro-batch's forward runs. Then the engine serves the new weights.

Outputs go to one run directory: ``config.yaml``, ``train.log``, ``metrics.jsonl``,
``samples.jsonl``, TensorBoard events, ``curves.png``, ``checkpoints/``. Process-wide
settings (threads, seeds, malloc, the process group under torchrun) are the caller's:
:func:`lambdapo.process.configure_process`.

With several processes (torchrun, :mod:`lambdapo.distributed`) every rank runs this loop on
its share of each step's prompts (whole groups), with its own engine and the policy sharded
over the ranks; the update is the one-process update of the global batch, and rank 0 alone
writes the outputs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from . import checkpoint as ckpt
from . import distributed
from .advantages import ESTIMATORS
from .batch import MicroBatch, RolloutBatch, plan_micro_batches
from .behaviour import (CorrectionSettings, SeparateForward, StepBehaviour, UpdateForward,
                        log_choice, update_can_be_behaviour)
from .config import (LambdapoWarning, TrainConfig, config_changes, lambda_settings,
                     save_config, to_dict)
from .data import PromptEncoder, PromptSampler, load_split
from .logprobs import PredictionStates, response_logprobs
from .lora import adapter_disabled, apply_lora, load_adapter_weights, save_merged
from .loss import BatchTotals
from .micro_loss import MicroBatchLoss
from .models import autocast_dtype, load_policy, pick_device, resolve_model_path
from .prompt_sharing import PromptSharing
from .rewards import MathVerifyReward, RewardManager
from .rollout.base import SamplingParams
from .rollout.engines import build_engine
from .process import CpuContention
from .scoring import PendingScores, ScoredBatch, Scorer
from .stopping import GracefulStop

log = logging.getLogger("lambdapo")


@dataclass
class EvalResult:
    accuracy: float      # mean over prompts and samples of the math_verify reward
    reward: float        # mean total reward
    samples: int


class Trainer:
    """Builds everything a run needs from a :class:`TrainConfig`; :meth:`train` runs it.

    ``resume``: a checkpoint folder or run directory to continue from (``"auto"``:
    ``output_dir``'s latest checkpoint). A resumed run whose config differs from the
    checkpoint's in a field outside :data:`lambdapo.config.RESUMABLE_CHANGES` raises
    ValueError unless ``allow_config_change``; the other differences are warned about.
    The trainer holds a lock on ``output_dir`` until :meth:`close`
    (:class:`lambdapo.checkpoint.RunDirectoryLocked` if another run holds it) and writes the
    ``lambdapo`` log to ``output_dir/train.log`` meanwhile."""

    def __init__(self, config: TrainConfig, *, resume: str | None = None,
                 progress: bool = True, allow_config_change: bool = False):
        self.config = config
        self.progress = progress
        self.run_dir = Path(config.output_dir)
        # One process, or this rank of several (lambdapo.distributed); rank 0 writes.
        self.parallel = distributed.current()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Held (by rank 0) from before the model loads (a second run fails at once) until
        # close(); released here if __init__ fails.
        self._lock = self._lock_run_dir()
        self._log_file = (_attach_run_log(self.run_dir / "train.log") if self.parallel.is_main
                          else None)
        try:
            folder = state = None
            if resume:   # checked before the model loads; its weights load before sharding
                folder, state = self._resume_checks(resume, allow_config_change)
            self._build(config, weights=folder)
            if resume:
                self._resume(folder, state)
                self._sync_engine()
            elif (self.run_dir / "checkpoints" / "latest").exists() and self.parallel.is_main:
                warnings.warn(f"output_dir {self.run_dir} holds an earlier run's checkpoints; "
                              f"this run starts over and replaces them as it saves (--resume "
                              f"continues that run instead)", LambdapoWarning, stacklevel=2)
            if self.parallel.is_main:
                save_config(config, self.run_dir / "config.yaml")
        except BaseException:
            self._detach_log()
            if self._lock is not None:
                self._lock.close()
            raise

    def _lock_run_dir(self):
        """Rank 0's lock on ``output_dir`` (:func:`lambdapo.checkpoint.lock_run_dir`); with
        several processes every rank learns whether it was taken, and all raise if not."""
        lock, refusal = None, None
        if self.parallel.is_main:
            try:
                lock = ckpt.lock_run_dir(self.run_dir)
            except ckpt.RunDirectoryLocked as exc:
                refusal = str(exc)
        refusal = self.parallel.broadcast_object(refusal)
        if refusal is not None:
            raise ckpt.RunDirectoryLocked(refusal)
        return lock

    def _build(self, config: TrainConfig, weights: Path | None = None) -> None:
        """Everything a run needs; ``weights``: a checkpoint whose model (or adapter) weights
        are loaded into the policy before it is sharded."""
        algo = config.algorithm
        parallel = self.parallel
        self.device = parallel.device(pick_device(config.device))
        self.autocast = autocast_dtype(config.model)
        self.model, self.tokenizer = load_policy(config.model, self.device)
        # With LoRA, self.model keeps peft's layers injected in place (every forward runs on
        # it) and self.peft saves, loads and switches off the adapter.
        self.peft = None
        if config.model.lora_rank > 0:
            self.peft = apply_lora(self.model, config.model.lora_rank, config.model.lora_alpha,
                                   config.model.target_modules)
            trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            log.info("LoRA rank %d on %s: %d trainable parameters of %d",
                     config.model.lora_rank, config.model.target_modules, trainable,
                     sum(p.numel() for p in self.model.parameters()))
        if weights is not None:
            if self.peft is not None:
                load_adapter_weights(self.peft, weights)
            else:
                ckpt.load_weights_into(self.model, weights)
        if config.model.enable_gradient_checkpointing:
            self.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()
        # Every forward of the policy runs through self.policy (sharded over the processes
        # with FSDP2, replicated with DDP, or direct in one process; lambdapo.distributed).
        self.policy = distributed.shard_policy(self.model, parallel, config.data_parallel)
        self.ref_model = self.reference = None
        if algo.kl_coef > 0 and self.peft is None:   # with LoRA: the base, adapter off
            self.ref_model, _ = load_policy(config.model, self.device)
            self.ref_model.eval().requires_grad_(False)
            # Sharded as the policy is; with DDP a frozen copy per rank needs no collective.
            self.reference = (distributed.shard_policy(self.ref_model, parallel, "fsdp")
                              if self.policy.sharded else distributed.LocalModel(self.ref_model))
        if parallel.enabled:
            log.info("%d processes (%s): the policy is %s, each takes %d of the %d prompts "
                     "of a step", parallel.world_size, parallel.backend,
                     "sharded over them with FSDP2" if self.policy.sharded else
                     "replicated on each with DDP",
                     config.prompts_per_step // parallel.world_size, config.prompts_per_step)
        self.pad = self.tokenizer.pad_token_id
        self.encoder = PromptEncoder(self.tokenizer, config.data)
        self.prompt_sharing = PromptSharing(
            algo.share_prompt_forward,
            gradient_checkpointing=config.model.enable_gradient_checkpointing,
            agree=parallel.all_true, uniform_passes=parallel.enabled)
        self.rewards = RewardManager.from_config(config.reward)
        self.accuracy_reward = MathVerifyReward(config.reward.answer_marker,
                                                config.reward.timeout_s, config.reward.workers)
        self.scorer = Scorer(self.rewards, self._correct, self._decode, self.encoder.columns,
                             estimator=algo.adv_estimator, settings=lambda_settings(config),
                             background_workers=self.rewards.workers)
        self.train_rows = load_split(config.data, "train", config.seed)
        self.eval_rows = load_split(config.data, "eval", config.seed)
        self.sampler = PromptSampler(self.train_rows, config.seed)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                           lr=config.optim.lr,
                                           betas=tuple(config.optim.betas),
                                           weight_decay=config.optim.weight_decay)
        total = config.steps * algo.ppo_epochs * algo.mini_batches
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _schedule(config.optim.schedule, config.optim.warmup_steps, total))
        self.shuffle = torch.Generator().manual_seed(config.seed + 1)
        self.step = 0
        self._saved_step: int | None = None
        self.cpu_watch = CpuContention(torch.get_num_threads(), active=self.device.type == "cpu")
        self.history: list[dict] = []
        self.eval_history: list[dict] = []
        self.elapsed_before = 0.0
        # Each rank samples from a generator of its own (rank 0's is one process's).
        with self.policy.full_weights():
            self.engine = build_engine(config, self.model, self.tokenizer,
                                       resolve_model_path(config.model.path),
                                       seed=config.seed + 1_000_003 * parallel.rank,
                                       gather_weights=self.policy.full_weights,
                                       several_processes=parallel.enabled)
        self.behaviour = self._behaviour_source()
        self.micro_loss = MicroBatchLoss.for_run(
            self.model, config, self.behaviour, autocast=self.autocast, policy=self.policy,
            prediction_states=self._prediction_states, policy_logprobs=self._policy_logprobs)

    def _behaviour_source(self) -> SeparateForward | UpdateForward:
        """The run's source of pi_old (:mod:`lambdapo.behaviour`), logged with its reason."""
        cfg, algo = self.config, self.config.algorithm
        correction = CorrectionSettings(algo.rollout_is, algo.rollout_is_cap)
        reference = None if algo.kl_coef == 0 else self._reference_logprobs
        # The transformers engine samples with the trainer's own float32 model from the
        # unprocessed distribution: its log-probs are the trainer's numbers.
        engine_exact = (self.engine.name == "transformers" and self.autocast is None
                        and cfg.rollout.top_k == 0 and cfg.rollout.top_p == 1.0)
        from_update, reason = update_can_be_behaviour(
            single_step=algo.ppo_epochs == 1 and algo.mini_batches == 1,
            uses_scores=ESTIMATORS[algo.adv_estimator].uses_scores, engine_exact=engine_exact)
        # Its micro-batches padded as the update's are: every rank runs as many forwards.
        behaviour_micro_batches = lambda batch, rows: [  # noqa: E731
            micro for micro, _ in self._padded_micro_batches(batch, rows)]
        source = (UpdateForward(reference, correction) if from_update else
                  SeparateForward(self.model, self._policy_logprobs, reference,
                                  behaviour_micro_batches, correction))
        log_choice(source, reason)
        return source

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
        rows = self.parallel.share(self.eval_rows)   # all of them in one process
        correct, total = [], []
        with self._generating(), self.engine.reseeded(cfg.seed + 12345 + self.parallel.rank):
            rollout = self.engine.generate([self.encoder.prompt_ids(r) for r in rows],
                                           params) if rows else None
        if rows:
            texts = self._decode(rollout.completion_ids)
            columns = self.encoder.columns(rows, n)
            prompts = [row["prompt"] for row in rows for _ in range(n)]
            total, per_function = self.rewards.score(prompts, texts, rollout.completion_ids,
                                                     columns)
            correct = self._correct(per_function, prompts, texts, rollout.completion_ids,
                                    columns)
        right, reward, count = self.parallel.sum([sum(correct), sum(total), len(correct)])
        return EvalResult(right / count, reward / count, int(count))

    def _decode(self, ids: list[list[int]]) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def _correct(self, per_function, prompts, texts, completion_ids, columns) -> list[float]:
        """The math_verify reward per completion: reused when it is one of the rewards."""
        if "math_verify" in per_function:
            return per_function["math_verify"]
        return self.accuracy_reward(prompts, texts, completion_ids, **columns)

    # ----------------------------------------------------------------------------- train
    def train_step(self) -> dict:
        """One step: :meth:`collect` -> score (:mod:`lambdapo.scoring`) -> :meth:`update`, then the
        engine serves the new weights. Returns the step's metrics; ``middle_time`` is the
        time the step spent scoring outside the update and waiting for the rewards in it,
        ``train_time`` the rest of the update."""
        cfg = self.config
        t0 = time.perf_counter()
        # Every rank draws the step's prompts and takes its share of whole groups.
        rows = self.parallel.prompt_share(self.sampler.take(cfg.prompts_per_step))
        batch = self.collect(rows)
        gen_time = time.perf_counter() - t0
        with self.scorer.start(batch, rows) as pending:
            behaviour = self.behaviour.prepare(batch)   # while the rewards are computed
            scoring_time = time.perf_counter() - t0 - gen_time
            update = self.update(batch, behaviour, pending)
        scored = pending.result(behaviour.scoring_logprobs)
        self._sync_engine()
        self.step += 1
        middle_time = scoring_time + pending.wait_time
        tokens = batch.num_tokens
        metrics = {
            "step": self.step,
            **_reward_metrics(scored),
            "advantage/mean": float(scored.advantages.mean()),
            "advantage/std": float(scored.advantages.std()),
            "advantage/abs_mean": float(scored.advantages.abs().mean()),
            "score/mean": float(scored.scores.mean()),
            "response_length": tokens / batch.size,
            "finished": sum(batch.finished) / batch.size,
            **update,
            **behaviour.metrics(),
            "lr": self.scheduler.get_last_lr()[0],
            "tokens_per_s": tokens / max(gen_time, 1e-9),
            "gen_time": gen_time,
            "middle_time": middle_time,
            "train_time": time.perf_counter() - t0 - gen_time - middle_time,
            "step_time": time.perf_counter() - t0,
        }
        if self.rewards.errors:
            metrics["reward_errors"] = sum(self.rewards.errors.values())
        # Over the global batch (the same on every rank; one process: as they are).
        metrics = distributed.reduce_step_metrics(
            metrics, self.parallel, sequences=batch.size, tokens=tokens,
            advantages=scored.advantages,
            clipped_per="sequences" if cfg.algorithm.rollout_is == "sequence" else "tokens")
        if self.parallel.is_main:   # rank 0's first prompt is the step's first
            self._log_samples(rows[0]["prompt"], scored.texts[:cfg.log_samples],
                              [float(r) for r in scored.rewards[:cfg.log_samples]])
        return metrics

    def collect(self, rows: list[dict]) -> RolloutBatch:
        """Samples ``rollout.group_size`` responses per row with the engine."""
        cfg = self.config
        prompts = [self.encoder.prompt_ids(r) for r in rows]
        params = SamplingParams(n=cfg.rollout.group_size, temperature=cfg.rollout.temperature,
                                top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
                                max_new_tokens=cfg.rollout.max_new_tokens)
        with self._generating():
            rollout = self.engine.generate(prompts, params)
        return RolloutBatch.from_rollout(prompts, rollout, params.n, self.pad, self.device)

    def _generating(self):
        """The context generation runs in: an engine that generates with the trainer's model
        needs its whole weights (several processes: gathered on every rank, so that a rank
        whose responses end sooner waits for no collective)."""
        if self.engine.generates_with_trainer_model:
            return self.policy.full_weights()
        return contextlib.nullcontext()

    def _sync_engine(self) -> None:
        """The engine serves the current weights (an engine of its own: pushed to it)."""
        if not self.engine.generates_with_trainer_model:
            self.engine.sync_weights()

    def score(self, batch: RolloutBatch, rows: list[dict]) -> ScoredBatch:
        """Rewards, confidence scores and advantages of ``batch`` (the responses to
        ``rows``), with the step's behaviour log-probs (a separate forward where the run
        uses one)."""
        with self.scorer.start(batch, rows) as pending:
            return pending.result(self.behaviour.prepare(batch).scoring_logprobs)

    def _micro_batches(self, batch: RolloutBatch, rows: list[int]) -> list[MicroBatch]:
        lengths = [batch.response_length(r) for r in range(batch.size)]
        parts = plan_micro_batches(lengths, rows, self.config.micro_batch_size)
        return [batch.micro_batch(part) for part in parts]

    def _padded_micro_batches(self, batch: RolloutBatch, rows: list[int]
                              ) -> list[tuple[MicroBatch, float]]:
        """(micro-batch, weight) covering ``rows``, weight 1; with several processes,
        followed by zero-weight copies up to the largest count of any rank (every rank then
        runs as many forwards and backwards; :func:`lambdapo.distributed.padded`)."""
        micros = self._micro_batches(batch, rows) if rows else []
        return distributed.padded(micros, self.parallel, lambda: batch.micro_batch([0]))

    def _prediction_states(self, micro: MicroBatch) -> PredictionStates:
        """The training forward's prediction states of ``micro`` (prompt-shared or plain)."""
        temperature = self.config.rollout.temperature
        if self.prompt_sharing.shared is None:
            # The first micro-batch decides the forward with a check of its own, run (when
            # sharded) on the whole weights: no collective depends on how it goes.
            with self.policy.full_weights():
                self.prompt_sharing.states(self.model, micro, temperature, self.autocast)
        return self.prompt_sharing.states(self.model, micro, temperature, self.autocast)

    def _logprobs(self, policy, micro: MicroBatch) -> tuple[Tensor, Tensor]:
        states = self._prediction_states(micro)
        return policy(lambda: response_logprobs(policy.model, micro,
                                                self.config.rollout.temperature,
                                                autocast=self.autocast, states=states))

    def _policy_logprobs(self, micro: MicroBatch) -> tuple[Tensor, Tensor]:
        return self._logprobs(self.policy, micro)

    def _reference_logprobs(self, micro: MicroBatch) -> Tensor:
        if self.peft is not None:
            with adapter_disabled(self.peft):
                return self._logprobs(self.policy, micro)[0]
        return self._logprobs(self.reference, micro)[0]

    def update(self, batch: RolloutBatch, behaviour: StepBehaviour,
               pending: PendingScores) -> dict:
        """PPO-clip passes over ``batch``: ``ppo_epochs`` x ``mini_batches`` optimizer steps,
        each accumulated over micro-batches. The advantages are taken from ``pending`` after
        the first micro-batch's forward (the rewards finish meanwhile), pi_old from
        ``behaviour``. Returns the update's metrics.

        With several processes ``batch`` is this rank's part of the global batch (rank r
        holds its rows r*B .. r*B+B-1): the mini-batches are drawn from the global batch as
        one process draws them, each rank computes its rows of each, its loss shares divided
        by the mini-batch's global totals, and the sharded gradient is their sum: the
        one-process update of the global batch."""
        cfg, algo = self.config, self.config.algorithm
        sums = {"clipped": 0.0, "ratio": 0.0, "tokens": 0.0, "kl": 0.0}
        losses, grad_norms = [], []
        lengths = self.parallel.all_gather_ints([batch.response_length(r)
                                                 for r in range(batch.size)])
        count, offset = len(lengths), self.parallel.rank * batch.size
        for _ in range(algo.ppo_epochs):
            order = torch.randperm(count, generator=self.shuffle).tolist()
            for part in range(algo.mini_batches):
                chosen = order[part * count // algo.mini_batches:
                               (part + 1) * count // algo.mini_batches]
                if not chosen:
                    continue
                totals = BatchTotals(tokens=sum(lengths[r] for r in chosen),
                                     sequences=len(chosen),
                                     max_new_tokens=cfg.rollout.max_new_tokens)
                mini = [r - offset for r in chosen if offset <= r < offset + batch.size]
                self.optimizer.zero_grad(set_to_none=True)
                mini_loss = 0.0
                micros = self._padded_micro_batches(batch, mini)
                for index, (micro, weight) in enumerate(micros):
                    # One gradient reduction per optimizer step, after its last micro-batch.
                    self.policy.gradient_sync(index == len(micros) - 1)
                    loss, m = self.micro_loss(
                        micro, behaviour,
                        lambda: pending.result(behaviour.scoring_logprobs).advantages, totals)
                    if not weight:   # a padding copy: the same collectives, no gradient
                        self.policy.backward(loss * 0.0)
                        continue
                    self.policy.backward(loss)
                    mini_loss += float(loss.detach())
                    for k, v in m.items():
                        sums[k] += v
                norm = self.policy.clip_grad_norm_(cfg.optim.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                losses.append(mini_loss)
                grad_norms.append(norm)
        tokens = max(sums["tokens"], 1.0)
        out = {"loss": sum(losses) / len(losses), "grad_norm": sum(grad_norms) / len(grad_norms),
               "clip_frac": sums["clipped"] / tokens, "ratio": sums["ratio"] / tokens}
        if algo.kl_coef > 0:
            out["kl"] = sums["kl"] / tokens
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
        """Checkpoints the run at its current step (:mod:`lambdapo.checkpoint`)."""
        state = {"sampler": self.sampler.state(), "history": self.history,
                 "eval_history": self.eval_history, "config": to_dict(self.config),
                 "elapsed": self.elapsed_before + self._elapsed()}
        rng = {"engine": self.engine.generator_state(), "shuffle": self.shuffle.get_state(),
               "torch": torch.get_rng_state()}
        folder = ckpt.save_checkpoint(self.run_dir, self.step,
                                      model=self.model if self.peft is None else self.peft,
                                      tokenizer=self.tokenizer, optimizer=self.optimizer,
                                      scheduler=self.scheduler, rng=rng, state=state,
                                      keep_last=self.config.checkpoint.keep_last,
                                      parallel=self.parallel)
        self._saved_step = self.step
        return folder

    def _resume_checks(self, where: str, allow_config_change: bool) -> tuple[Path, dict]:
        """The checkpoint to resume (verified) and its state, before anything loads.

        Raises:
            ValueError: the config differs in a field that changes the experiment (unless
                allowed), or the checkpoint was saved by another number of processes.
        """
        folder = ckpt.find_checkpoint(self.run_dir if where == "auto" else where)
        ckpt.verify_checkpoint(folder)
        state = ckpt.read_state(folder)
        ckpt.check_world_size(folder, state, self.parallel)
        breaking, harmless = config_changes(state.get("config", {}), to_dict(self.config))
        if breaking and not allow_config_change:
            raise ValueError(f"--resume {folder}: the config differs from the checkpoint's "
                             f"in {'; '.join(breaking)}. Undo the change, start a new run "
                             f"(another output_dir), or allow it (--allow-config-change)")
        if (breaking or harmless) and self.parallel.is_main:
            warnings.warn(f"resuming {folder} with a changed config: "
                          f"{'; '.join(breaking + harmless)}", LambdapoWarning, stacklevel=3)
        return folder, state

    def _resume(self, folder: Path, state: dict) -> None:
        """Restores the optimizer, scheduler, sampler, history and random states of
        ``folder`` (the weights were loaded before the policy was sharded)."""
        state, rng = ckpt.load_checkpoint(folder, optimizer=self.optimizer,
                                          scheduler=self.scheduler, device=self.device,
                                          parallel=self.parallel)
        self.step = int(state["step"])
        self._saved_step = self.step
        log.info("resuming %s from step %d of %d (checkpoint %s)", self.run_dir, self.step,
                 self.config.steps, folder)
        self.sampler.load_state(state["sampler"])
        self.history = state["history"]
        self.eval_history = state["eval_history"]
        self.elapsed_before = float(state.get("elapsed", 0.0))
        self.engine.set_generator_state(rng["engine"])
        self.shuffle.set_state(rng["shuffle"])
        torch.set_rng_state(rng["torch"])

    def _elapsed(self) -> float:
        return time.perf_counter() - self._start if hasattr(self, "_start") else 0.0

    def train(self, stop: GracefulStop | None = None) -> dict:
        """Runs the remaining steps; returns a summary (accuracy before/after, time).

        ``stop``: while it holds a requested signal (:mod:`lambdapo.stopping`) no further
        step starts; the run then saves a checkpoint of its last finished step (unless it
        has one), writes its plot and returns early with ``summary["stopped"]`` set to the
        signal's name and ``summary["checkpoint"]`` to the checkpoint folder. With several
        processes a signal to any of them stops all after the same step."""
        from tqdm.auto import tqdm

        from .metrics import MetricsWriter, NullWriter, truncate_jsonl

        cfg = self.config
        main = self.parallel.is_main
        self._start = time.perf_counter()
        # Rank 0 writes the metrics and hands them to the trackers; the others, nothing.
        if main:
            writer = MetricsWriter(self.run_dir, last_step=self.step, config=cfg,
                                   progress_bar=self.progress)
            truncate_jsonl(self.run_dir / "samples.jsonl", self.step)
        else:
            writer = NullWriter()
        self._writer = writer
        requested = 0   # the stop signal's number, agreed by every rank (0: none)

        def stopped() -> bool:
            nonlocal requested
            own = stop.requested if stop is not None and stop.requested is not None else 0
            requested = self.parallel.max_int(own)
            return requested != 0
        if not self.eval_history:
            self._evaluate_into(writer)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress or not main,
                   desc="lambdapo", unit="step", dynamic_ncols=True)
        while self.step < cfg.steps and not stopped():
            metrics = self.train_step()
            self.history.append(metrics)
            writer.write(metrics)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['accuracy']:.2f}")
            self.cpu_watch.after_step()
            if stopped():
                break
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                self._evaluate_into(writer)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                writer.flush()   # the events up to a checkpoint survive a kill after it
                self.save()
        bar.close()
        if requested:
            writer.close()
            return self._stopped_summary(signal.Signals(requested).name)
        after = self._evaluate_into(writer)
        self.save()
        elapsed = self.elapsed_before + self._elapsed()
        summary = {"engine": self.engine.name,
                   "accuracy_before": self.eval_history[0]["accuracy"],
                   "accuracy_after": after.accuracy, "seconds": elapsed, "steps": self.step,
                   "eval_samples": after.samples, "eval_history": self.eval_history}
        if self.peft is not None:   # the adapter merged: a plain transformers folder
            merged = self.run_dir / "merged"
            with self.policy.full_weights():
                if main:
                    save_merged(self.model, self.tokenizer, merged)
            summary["merged_model"] = str(merged)
        if self.parallel.enabled:
            summary["processes"] = self.parallel.world_size
        if main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            self._plot()
        writer.close()
        return summary

    def _evaluate_into(self, writer) -> EvalResult:
        result = self.evaluate()
        self.eval_history.append({"step": self.step, "accuracy": result.accuracy,
                                  "reward": result.reward})
        writer.scalars({"eval/accuracy": result.accuracy, "eval/reward": result.reward},
                       self.step)
        return result

    def _plot(self) -> None:
        from .metrics import plot_curves

        cfg = self.config
        plot_curves(self.history, self.eval_history, self.run_dir / "curves.png",
                    title=f"{self.run_dir} (adv_estimator={cfg.algorithm.adv_estimator}, "
                          f"seed {cfg.seed})")

    def _stopped_summary(self, signal_name: str) -> dict:
        """After a stop request: the last finished step checkpointed (unless it is, or no
        step ran), the plot written, one log line naming the checkpoint and the resume
        command."""
        checkpoint = None
        if self.step > 0:
            checkpoint = (self.run_dir / "checkpoints" / f"step-{self.step}")
            if self._saved_step != self.step:
                checkpoint = self.save()
        if self.parallel.is_main:
            self._plot()
        if checkpoint is None:
            log.info("stopped by %s before the first step; nothing to save", signal_name)
        else:
            log.info("stopped by %s after step %d of %d: checkpoint %s; continue with: "
                     "lambdapo train --resume %s", signal_name, self.step, self.config.steps,
                     checkpoint, self.run_dir)
        return {"stopped": signal_name, "steps": self.step,
                "checkpoint": None if checkpoint is None else str(checkpoint),
                "eval_history": self.eval_history}

    def close(self) -> None:
        """Finishes the trackers' runs if :meth:`train` ended by an exception, shuts the
        rollout engine down (a vLLM engine holds memory until then), stops the reward
        worker processes, detaches the run's log file and releases the lock on
        ``output_dir``."""
        try:
            writer = getattr(self, "_writer", None)
            if writer is not None:   # train() closed it unless it ended by an exception
                writer.close(failed=True)
            self.engine.close()
            self.rewards.close()
            self.accuracy_reward.close()
        finally:
            self._detach_log()
            if self._lock is not None:
                self._lock.close()

    def _detach_log(self) -> None:
        if self._log_file is not None:
            logging.getLogger("lambdapo").removeHandler(self._log_file)
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _reward_metrics(scored: ScoredBatch) -> dict[str, float]:
    total = scored.rewards
    return {"reward": float(total.mean()),
            **{f"reward/{k}": sum(v) / len(v) for k, v in scored.per_function.items()},
            "accuracy": sum(scored.correct) / len(scored.correct)}


def _attach_run_log(path: Path) -> logging.Handler:
    """Appends the ``lambdapo`` log (INFO and above) to ``path`` until detached."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                           "%Y-%m-%d %H:%M:%S"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger("lambdapo")
    root.addHandler(handler)
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    return handler


def _schedule(kind: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return factor
