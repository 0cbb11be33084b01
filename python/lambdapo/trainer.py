"""The LambdaPO training loop.

One step: take ``prompts_per_step`` prompts -> sample ``group_size`` responses each with
the rollout engine (transformers or vLLM) -> score them -> the trainer's log-probs of the
responses (behaviour policy, no grad) and their importance weights over the engine's
log-probs (rollout correction) -> confidence scores and advantages -> ``ppo_epochs``
passes of PPO-clip over ``mini_batches`` optimizer steps, each accumulated over
micro-batches -> the engine serves the new weights. Outputs go to one run directory:
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

import torch

from . import advantages as adv_lib
from . import checkpoint as ckpt
from .config import LambdapoWarning, TrainConfig, config_changes, save_config, to_dict
from .data import PromptSampler, load_split
from .loss import BatchTotals, policy_loss, rollout_is_weights
from .policy import (autocast_dtype, build_batch, load_policy, pick_device,
                     resolve_model_path, response_logprobs)
from .rewards import MathVerifyReward, RewardManager
from .rollout import SamplingParams, build_engine


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
            self.autocast = autocast_dtype(config.model)
            self.model, self.tokenizer = load_policy(config.model, self.device)
            self.model.train()
            self.ref_model = None
            if config.algorithm.kl_coef > 0:
                self.ref_model, _ = load_policy(config.model, self.device)
                self.ref_model.eval().requires_grad_(False)
            self.eos = self.tokenizer.eos_token_id
            self.pad = self.tokenizer.pad_token_id
            self.rewards = RewardManager.from_config(config.reward)
            self.accuracy_reward = MathVerifyReward(config.reward.answer_marker,
                                                    config.reward.timeout_s)
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
        self._prompt_cache: dict[str, list[int]] = {}
        self._solution_cache: dict[str, list[int]] = {}

    # ----------------------------------------------------------------------------- data
    def _prompt_ids(self, row: dict) -> list[int]:
        text = row["prompt"]
        if text not in self._prompt_cache:
            if self._use_chat_template():
                ids = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": text}], add_generation_prompt=True,
                    tokenize=True)
                # transformers 5 returns a BatchEncoding, 4.x a list of ids.
                ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            else:
                ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
            if len(ids) > self.config.data.max_prompt_tokens:
                raise ValueError(f"prompt of {len(ids)} tokens exceeds data.max_prompt_tokens="
                                 f"{self.config.data.max_prompt_tokens}: {text[:80]!r}")
            self._prompt_cache[text] = ids
        return self._prompt_cache[text]

    def _use_chat_template(self) -> bool:
        mode = self.config.data.chat_template
        has = getattr(self.tokenizer, "chat_template", None) is not None
        if mode == "on" and not has:
            raise ValueError("data.chat_template=on but the tokenizer has no chat template")
        return mode == "on" or (mode == "auto" and has)

    def _columns(self, rows: list[dict], n: int) -> dict[str, list]:
        columns: dict[str, list] = {}
        for key in rows[0]:
            columns[key] = [row[key] for row in rows for _ in range(n)]
        solution_ids = [self._solution_ids(row["solution"]) for row in rows]
        columns["solution_ids"] = [ids for ids in solution_ids for _ in range(n)]
        columns["group_index"] = [p for p in range(len(rows)) for _ in range(n)]
        return columns

    def _solution_ids(self, text: str) -> list[int]:
        if text not in self._solution_cache:
            self._solution_cache[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._solution_cache[text]

    def _decode(self, ids: list[list[int]]) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def _correct(self, per_function, prompts, texts, completion_ids, columns) -> list[float]:
        """The math_verify reward per completion: reused when it is one of the rewards."""
        if "math_verify" in per_function:
            return per_function["math_verify"]
        return self.accuracy_reward(prompts, texts, completion_ids, **columns)

    # ----------------------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self) -> EvalResult:
        """Held-out accuracy: the math_verify reward averaged over ``eval_samples`` samples
        per prompt at ``eval_temperature`` (< 0: the rollout temperature; 0: greedy, one
        sample)."""
        cfg = self.config
        temperature = cfg.rollout.temperature if cfg.eval_temperature < 0 else cfg.eval_temperature
        n = 1 if temperature == 0 else cfg.eval_samples
        params = SamplingParams(n=n, temperature=temperature, top_p=cfg.rollout.top_p,
                                top_k=cfg.rollout.top_k, max_new_tokens=cfg.rollout.max_new_tokens)
        # Evaluation draws from its own generator so that it does not shift training's.
        saved = self.engine.generator_state()
        self.engine.generator.manual_seed(cfg.seed + 12345)
        try:
            rollout = self.engine.generate([self._prompt_ids(r) for r in self.eval_rows], params)
        finally:
            self.engine.set_generator_state(saved)
        texts = self._decode(rollout.completion_ids)
        columns = self._columns(self.eval_rows, n)
        prompts = [row["prompt"] for row in self.eval_rows for _ in range(n)]
        total, per_function = self.rewards.score(prompts, texts, rollout.completion_ids, columns)
        correct = self._correct(per_function, prompts, texts, rollout.completion_ids, columns)
        return EvalResult(sum(correct) / len(correct), sum(total) / len(total), len(correct))

    # ----------------------------------------------------------------------------- train
    def train_step(self) -> dict:
        cfg, algo = self.config, self.config.algorithm
        t0 = time.perf_counter()
        rows = self.sampler.take(cfg.prompts_per_step)
        prompt_ids = [self._prompt_ids(r) for r in rows]
        g = cfg.rollout.group_size
        params = SamplingParams(n=g, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                top_k=cfg.rollout.top_k, max_new_tokens=cfg.rollout.max_new_tokens)
        rollout = self.engine.generate(prompt_ids, params)
        gen_time = time.perf_counter() - t0

        texts = self._decode(rollout.completion_ids)
        prompts = [row["prompt"] for row in rows for _ in range(g)]
        columns = self._columns(rows, g)
        total, per_function = self.rewards.score(prompts, texts, rollout.completion_ids, columns)
        correct = self._correct(per_function, prompts, texts, rollout.completion_ids, columns)

        seq_prompts = [ids for ids in prompt_ids for _ in range(g)]
        responses = rollout.completion_ids
        mask, engine_lp = _response_tensors(responses, rollout.logprobs, self.device)
        fused = self._behaviour_from_update()
        if fused:
            # pi_old is the training forward's own (detached) log-probs; the scores need
            # them before it, and the engine's are the same numbers (see
            # _behaviour_from_update), so they serve.
            old_lp = ref_lp = is_weights = entropy = None
            mismatch = {}
            scores = adv_lib.sequence_scores(engine_lp, mask.float(), algo.lambda_score)
        else:
            old_lp, entropy, ref_lp = self._behaviour_logprobs(seq_prompts, responses)
            is_weights, mismatch = rollout_is_weights(old_lp, engine_lp, mask,
                                                      level=algo.rollout_is,
                                                      cap=algo.rollout_is_cap)
            scores = adv_lib.sequence_scores(old_lp, mask.float(), algo.lambda_score)
        rewards_t = torch.tensor(total, dtype=torch.float32, device=self.device).view(-1, g)
        advantages = adv_lib.compute_advantages(rewards_t, scores.view(-1, g), algo).view(-1)

        t1 = time.perf_counter()
        update = self._update(seq_prompts, responses, old_lp, ref_lp, advantages, mask,
                              is_weights, engine_lp)
        if fused:
            entropy = update.pop("entropy_tensor")
            mismatch = update.pop("mismatch")
        self.engine.sync_weights()
        self.step += 1
        tokens = rollout.num_tokens
        n_tok = max(tokens, 1)
        metrics = {
            "step": self.step,
            "reward": sum(total) / len(total),
            **{f"reward/{k}": sum(v) / len(v) for k, v in per_function.items()},
            "accuracy": sum(correct) / len(correct),
            "advantage/mean": float(advantages.mean()),
            "advantage/std": float(advantages.std()),
            "advantage/abs_mean": float(advantages.abs().mean()),
            "score/mean": float(scores.mean()),
            "entropy": float((entropy * mask).sum() / n_tok),
            "response_length": tokens / len(responses),
            "finished": sum(rollout.finished) / len(rollout.finished),
            **update,
            **mismatch,
            "lr": self.scheduler.get_last_lr()[0],
            "tokens_per_s": tokens / max(gen_time, 1e-9),
            "gen_time": gen_time,
            "middle_time": t1 - t0 - gen_time,
            "train_time": time.perf_counter() - t1,
            "step_time": time.perf_counter() - t0,
        }
        if self.rewards.errors:
            metrics["reward_errors"] = sum(self.rewards.errors.values())
        self._log_samples(rows[0]["prompt"], texts[:cfg.log_samples], total[:cfg.log_samples])
        return metrics

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
        return engine_exact or algo.adv_estimator != "lambdapo"

    @torch.no_grad()
    def _behaviour_logprobs(self, prompts, responses):
        temperature = self.config.rollout.temperature
        chunks_lp, chunks_h, chunks_ref = [], [], []
        width = max(max((len(r) for r in responses), default=1), 1)
        self.model.eval()
        for start in range(0, len(responses), self.config.micro_batch_size):
            end = start + self.config.micro_batch_size
            batch = build_batch(prompts[start:end], responses[start:end], self.pad, self.device)
            lp, h = response_logprobs(self.model, batch, temperature, autocast=self.autocast)
            chunks_lp.append(_pad_to(lp, width))
            chunks_h.append(_pad_to(h, width))
            if self.ref_model is not None:
                ref, _ = response_logprobs(self.ref_model, batch, temperature,
                                           autocast=self.autocast)
                chunks_ref.append(_pad_to(ref, width))
        self.model.train()
        ref = torch.cat(chunks_ref) if chunks_ref else None
        return torch.cat(chunks_lp), torch.cat(chunks_h), ref

    def _update(self, prompts, responses, old_lp, ref_lp, advantages, mask, is_weights,
                engine_lp) -> dict:
        """PPO-clip passes over the batch. ``old_lp`` None: pi_old is each micro-batch's own
        detached log-probs (see _behaviour_from_update); the rollout-correction weights and
        the reference's log-probs are then computed per micro-batch, and the result also
        holds ``entropy_tensor`` [B, T] and the ``mismatch`` metrics."""
        cfg, algo = self.config, self.config.algorithm
        sums = {"clipped": 0.0, "ratio": 0.0, "tokens": 0.0, "kl": 0.0}
        losses, grad_norms = [], []
        count = len(responses)
        fused = old_lp is None
        if fused:
            seen_lp, seen_h = torch.zeros_like(engine_lp), torch.zeros_like(engine_lp)
        lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
        for _ in range(algo.ppo_epochs):
            order = torch.randperm(count, generator=self.shuffle).tolist()
            for part in range(algo.mini_batches):
                mini = order[part * count // algo.mini_batches:(part + 1) * count // algo.mini_batches]
                if not mini:
                    continue
                # Micro-batches of similar lengths pad little (the loss is a sum of shares,
                # so their order does not change it).
                mini.sort(key=lambda i: lengths[i])
                totals = BatchTotals(tokens=int(mask[mini].sum()), sequences=len(mini),
                                     max_new_tokens=cfg.rollout.max_new_tokens)
                self.optimizer.zero_grad(set_to_none=True)
                mini_loss = 0.0
                for start in range(0, len(mini), cfg.micro_batch_size):
                    idx = mini[start:start + cfg.micro_batch_size]
                    batch = build_batch([prompts[i] for i in idx], [responses[i] for i in idx],
                                        self.pad, self.device)
                    lp, h = response_logprobs(self.model, batch, cfg.rollout.temperature,
                                              autocast=self.autocast)
                    width = lp.shape[1]
                    index = torch.tensor(idx, device=self.device)
                    micro_mask = mask[index, :width]
                    if fused:
                        old = lp.detach()
                        seen_lp[index, :width] = old
                        seen_h[index, :width] = h.detach()
                        weights, _ = rollout_is_weights(old, engine_lp[index, :width],
                                                        micro_mask, level=algo.rollout_is,
                                                        cap=algo.rollout_is_cap)
                        ref = None
                        if self.ref_model is not None:
                            with torch.no_grad():
                                ref, _ = response_logprobs(self.ref_model, batch,
                                                           cfg.rollout.temperature,
                                                           autocast=self.autocast)
                    else:
                        old = old_lp[index, :width]
                        weights = None if is_weights is None else is_weights[index, :width]
                        ref = None if ref_lp is None else ref_lp[index, :width]
                    loss, m = policy_loss(
                        lp, old, advantages[index], micro_mask,
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
        tokens = max(sums["tokens"], 1.0)
        out = {"loss": sum(losses) / len(losses), "grad_norm": sum(grad_norms) / len(grad_norms),
               "clip_frac": sums["clipped"] / tokens, "ratio": sums["ratio"] / tokens}
        if algo.kl_coef > 0:
            out["kl"] = sums["kl"] / tokens
        if fused:
            _, out["mismatch"] = rollout_is_weights(seen_lp, engine_lp, mask,
                                                    level=algo.rollout_is,
                                                    cap=algo.rollout_is_cap)
            out["entropy_tensor"] = seen_h
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
        """Shuts the rollout engine down (a vLLM engine holds memory until then) and
        releases the lock on ``output_dir``."""
        self.engine.close()
        self._lock.close()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _response_tensors(responses: list[list[int]], logprobs: list[list[float]],
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, T] bool, engine log-probs [B, T] float32, 0 off the response) from the
    rollout's rows, T the longest response (>= 1), built in one host-to-device copy."""
    width = max(max((len(r) for r in responses), default=1), 1)
    padded = [row + [0.0] * (width - len(row)) for row in logprobs]
    lengths = torch.tensor([len(r) for r in responses])
    mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    return (mask.to(device, non_blocking=True),
            torch.tensor(padded, dtype=torch.float32).to(device, non_blocking=True))


def _pad_to(t: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[1])) if t.shape[1] < width else t


def _schedule(kind: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return factor
