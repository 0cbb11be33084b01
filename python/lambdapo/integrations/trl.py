"""LambdaPO in TRL: ``LambdaPOTrainer``, a ``GRPOTrainer`` whose group advantages are
LambdaPO's pairwise lambda advantages, and ``LambdaPOConfig``, a ``GRPOConfig`` with the
LambdaPO settings. Switching a GRPO run is a change of class::

    from lambdapo.integrations.trl import LambdaPOConfig, LambdaPOTrainer

    args = LambdaPOConfig(output_dir="out", num_generations=8, lambda_beta=1.0,
                          semantic_density_weight=0.1, solution_column="solution")
    trainer = LambdaPOTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", reward_funcs=[accuracy],
                              args=args, train_dataset=dataset)
    trainer.train()

Everything else (generation with transformers or vLLM, the loss, KL, importance sampling,
accelerate/DeepSpeed/FSDP) is TRL's. A plain ``GRPOConfig`` works too (LambdaPO defaults).

``LambdaPOConfig(lambdapo_fused_loss=True)`` computes TRL's loss with
``lambdapo_ext.linear_policy_loss`` instead (the PPO-clip loss fused with the lm-head: the
decoder's hidden states go to the op with the head's weight, no ``[B, T, V]`` logits, three
matmuls): TRL's loss for ``loss_type`` grpo, bnpo, dr_grpo and dapo with a
token-level ratio, KL and vLLM's importance-sampling correction, on a text model whose head
is a plain linear layer. Other settings are refused at construction, naming them
(:func:`lambdapo.integrations.trl_fused_loss.unsupported_settings`). The logged metrics are
then ``entropy``, ``clip_ratio/region_mean`` and ``kl`` (with ``beta``). In float32 a TRL
1.16 step with it moves the weights as TRL's own to float32 rounding; under bf16 autocast
(GRPOConfig's default) to bf16 rounding, since TRL's head then rounds its logits to bf16 and
this op's are float32 (docs/integrations.md).

How the advantages are formed, per generation batch: the rewards are the weighted sum of
the reward functions (TRL's ``reward_weights``; completions every function scored None are
left out of their group and get advantage 0), and each completion's confidence score is
the mean (``lambda_score="sum"``: the sum) of its sampled tokens' log-probs: vLLM's
sampling log-probs when TRL has them, else the policy's log-probs of the completion at
generation time (TRL's ``old_per_token_logps``, or one no-grad forward pass), both with
TRL's temperature. Groups may span processes, so scores are gathered like TRL gathers the
rewards, ``lambdapo_ext.lambda_advantages`` runs on the whole batch, and each process keeps
its slice. TRL's completion logs and the ``lambdapo/*`` metrics show these advantages.

Needs ``pip install 'lambdapo[trl]'``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import lambdapo_ext

from ..advantages import sequence_scores
from ..logprobs import plain_linear_head
from ..method import LambdaSettings, SemanticDensitySettings
from ..rewards import semantic_density_to_texts
from .trl_fused_loss import fused_grpo_loss, grpo_token_weights, unsupported_settings

try:
    from trl import GRPOConfig, GRPOTrainer
except ImportError as exc:   # pragma: no cover - exercised without TRL
    raise ImportError("lambdapo.integrations.trl needs TRL: pip install 'lambdapo[trl]'") from exc

@dataclass
class LambdaPOConfig(GRPOConfig):
    """``GRPOConfig`` plus LambdaPO's settings (TRL's ``scale_rewards`` does not apply:
    ``lambda_normalize`` takes its place)."""

    lambda_beta: float = field(default=1.0, metadata={
        "help": "Sharpness of the confidence weighting of each pair (0: RLOO)."})
    lambda_score: str = field(default="mean", metadata={
        "help": "Confidence score of a completion: mean | sum of its sampled tokens' log-probs."})
    lambda_normalize: str = field(default="mean", metadata={
        "help": "mean (divide by G-1) | none | std (then by the group's reward std)."})
    semantic_density_weight: float = field(default=0.0, metadata={
        "help": "Weight (lambda_sd) of the semantic-density reward added to reward_funcs "
                "(0: not added)."})
    semantic_density_metric: str = field(default="rouge_n", metadata={
        "help": "rouge_n | rouge_l."})
    semantic_density_max_n: int = field(default=2, metadata={"help": "Largest n of ROUGE-N."})
    solution_column: str = field(default="solution", metadata={
        "help": "Dataset column with the reference solution of the semantic-density reward."})
    lambdapo_fused_loss: bool = field(default=False, metadata={
        "help": "Compute the loss with lambdapo_ext.linear_policy_loss (fused with the "
                "lm-head: no logits tensor, three matmuls); loss_type grpo, bnpo, dr_grpo or "
                "dapo, token-level ratio, a plain linear lm-head."})

    def __post_init__(self):
        super().__post_init__()
        check_lambda_settings(self)


def check_lambda_settings(args) -> tuple[LambdaSettings, SemanticDensitySettings]:
    """The LambdaPO settings of ``args`` (a :class:`LambdaPOConfig`, or a plain
    ``GRPOConfig``: the defaults), checked by :mod:`lambdapo.method`.

    Raises:
        ValueError: naming the first invalid setting.
    """
    lambda_settings = LambdaSettings.checked(
        getattr(args, "lambda_beta", 1.0), getattr(args, "lambda_score", "mean"),
        getattr(args, "lambda_normalize", "mean"))
    density = SemanticDensitySettings.checked(
        getattr(args, "semantic_density_weight", 0.0),
        getattr(args, "semantic_density_metric", "rouge_n"),
        getattr(args, "semantic_density_max_n", 2),
        names={"weight": "semantic_density_weight", "metric": "semantic_density_metric",
               "max_n": "semantic_density_max_n"})
    return lambda_settings, density


class SemanticDensityTextReward:
    """TRL reward function: ``lambdapo_ext.semantic_density`` of each completion's token ids
    against its reference solution, the dataset column ``solution_column`` tokenized with
    ``tokenizer`` (completions of one prompt share one reference).

    Args:
        tokenizer: the policy's tokenizer (LambdaPOTrainer sets it when left None).
        solution_column: dataset column with the reference solution text.
        metric, max_n: ``rouge_n`` (mean F1 of n = 1..max_n) or ``rouge_l``.

    Raises (when called):
        KeyError: the dataset has no ``solution_column``.
        RuntimeError: no tokenizer was set.
    """

    __name__ = "semantic_density"

    def __init__(self, tokenizer=None, *, solution_column: str = "solution",
                 metric: str = "rouge_n", max_n: int = 2):
        self.tokenizer = tokenizer
        self.solution_column = solution_column
        self.metric = metric
        self.max_n = max_n
        self._ids: dict[str, list[int]] = {}

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float]:
        if self.solution_column not in kwargs:
            raise KeyError(f"semantic_density: the dataset has no column "
                           f"{self.solution_column!r} (set solution_column)")
        if self.tokenizer is None:
            raise RuntimeError("semantic_density: no tokenizer (pass one, or use it through "
                               "LambdaPOTrainer)")
        return semantic_density_to_texts(completion_ids,
                                         [str(s) for s in kwargs[self.solution_column]],
                                         self._tokenize, metric=self.metric, max_n=self.max_n)

    def _tokenize(self, text: str) -> list[int]:
        if text not in self._ids:
            self._ids[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._ids[text]


class LambdaPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` with LambdaPO advantages (module docstring). Takes the same
    arguments; ``args`` may be a :class:`LambdaPOConfig` or a plain ``GRPOConfig``.

    Raises:
        ValueError: an invalid LambdaPO setting, or ``multi_objective_aggregation`` other
            than ``sum_then_normalize`` (LambdaPO compares the weighted sum of the rewards).
    """

    _tag_names = ["trl", "lambdapo"]
    _name = "LambdaPO"

    def __init__(self, model, reward_funcs=None, args: GRPOConfig | None = None, *pos, **kw):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = LambdaPOConfig(output_dir=f"{str(name).split('/')[-1]}-LambdaPO")
        self._lambda_settings, density = check_lambda_settings(args)
        self._fused_loss = bool(getattr(args, "lambdapo_fused_loss", False))
        if self._fused_loss and unsupported_settings(args):
            raise ValueError("LambdaPOTrainer: lambdapo_fused_loss=True does not support "
                             + ", ".join(unsupported_settings(args)))
        if args.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError("LambdaPOTrainer: multi_objective_aggregation must be "
                             "'sum_then_normalize' (LambdaPO compares weighted reward sums), "
                             f"got {args.multi_objective_aggregation!r}")
        self._semantic_density = None
        weight = density.weight
        if weight > 0:
            funcs = [] if reward_funcs is None else (
                list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs])
            self._semantic_density = SemanticDensityTextReward(
                solution_column=args.solution_column, metric=density.metric,
                max_n=density.max_n)
            weights = args.reward_weights or [1.0] * len(funcs)
            args.reward_weights = list(weights) + [weight]
            reward_funcs = funcs + [self._semantic_density]
        super().__init__(model, reward_funcs, args, *pos, **kw)
        if self._semantic_density is not None:
            tok = self.processing_class
            self._semantic_density.tokenizer = getattr(tok, "tokenizer", tok)
        self._rewards_per_func: torch.Tensor | None = None
        if self._fused_loss:
            unwrapped = self.accelerator.unwrap_model(self.model)
            if plain_linear_head(unwrapped) is None:
                raise ValueError("LambdaPOTrainer: lambdapo_fused_loss=True needs a model whose "
                                 "lm-head is a plain linear layer (no logit soft-capping or "
                                 "scaling, no adapter on it)")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's loss, through ``lambdapo_ext.linear_policy_loss`` with
        ``lambdapo_fused_loss`` (module docstring)."""
        if not self._fused_loss:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if return_outputs:
            raise ValueError("The GRPOTrainer does not support returning outputs")
        return self._fused_loss_of(model, inputs)

    def _fused_loss_of(self, model, inputs) -> torch.Tensor:
        """TRL's ``_compute_loss`` for the supported settings, from the decoder's hidden
        states and the lm-head's weight, with its main metrics."""
        unwrapped = self.accelerator.unwrap_model(model)
        head = plain_linear_head(unwrapped)
        completion_ids, mask = inputs["completion_ids"], inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        width = completion_ids.size(1)
        with self.accelerator.autocast():
            hidden = unwrapped.get_decoder()(
                input_ids=torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
                attention_mask=torch.cat([inputs["prompt_mask"], inputs["completion_mask"]],
                                         dim=1)).last_hidden_state[:, -width - 1:-1]
        # The head runs in the wider of the states' and its own dtype, as TRL's does outside
        # autocast: float32 for a head that cast_lm_head_to_fp32 widened on a bf16 model.
        dtype = torch.promote_types(hidden.dtype, head.weight.dtype)
        hidden, weight = hidden.to(dtype), head.weight.to(dtype)
        bias = None if head.bias is None else head.bias.to(dtype)
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        normalizer = None
        if self.loss_type == "dapo":
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * accumulation / self.args.steps_per_generation
        token_weights = grpo_token_weights(mask, self.loss_type, accumulation=accumulation,
                                           max_completion_length=self.max_completion_length,
                                           normalizer=normalizer)
        correcting = self.use_vllm and self.vllm_importance_sampling_correction
        old = inputs.get("old_per_token_logps")
        loss, logprobs, entropy = fused_grpo_loss(
            hidden, weight, completion_ids, mask, inputs["advantages"], token_weights,
            old_logprobs=old,
            ref_logprobs=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
            is_ratio=inputs["importance_sampling_ratio"] if correcting else None,
            beta=self.beta, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
            temperature=self.temperature, bias=bias)
        self._log_fused_metrics(mode, mask.float(), logprobs, entropy, old, inputs)
        return loss

    @torch.no_grad()
    def _log_fused_metrics(self, mode, mask, logprobs, entropy, old, inputs) -> None:
        """``entropy``, ``clip_ratio/region_mean`` and (with ``beta``) ``kl``, as TRL's
        means over the completion tokens of every process."""
        def mean(x):
            total = self.accelerator.gather(torch.stack([(x * mask).sum(), mask.sum()]).view(1, 2))
            return float(total[:, 0].sum() / total[:, 1].sum().clamp(min=1.0))
        metrics = self._metrics[mode]
        metrics["entropy"].append(mean(entropy))
        ratio = torch.exp(logprobs - (logprobs if old is None else old.float()))
        advantages = inputs["advantages"].float()
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        clipped = (((ratio < 1 - self.epsilon_low) & (advantages < 0))
                   | ((ratio > 1 + self.epsilon_high) & (advantages > 0)))
        metrics["clip_ratio/region_mean"].append(mean(clipped.float()))
        if self.beta != 0.0:
            d = inputs["ref_per_token_logps"].float() - logprobs
            metrics["kl"].append(mean(torch.exp(d) - d - 1))

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # Gathered over processes (TRL's rows in process order); LambdaPO needs them raw.
        self._rewards_per_func = super()._calculate_rewards(inputs, prompts, completions,
                                                            completion_ids_list)
        return self._rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        group = self.num_generations if mode == "train" else self.num_generations_eval
        rewards_per_func = self._rewards_per_func
        device = rewards_per_func.device
        scored = ~torch.isnan(rewards_per_func).all(dim=1)
        rewards = (rewards_per_func * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)

        mask = output["completion_mask"].float()
        if "tool_mask" in output:
            mask = mask * output["tool_mask"].float()
        logps = self._sampled_logps(output)
        settings = self._lambda_settings
        local_scores = sequence_scores(torch.nan_to_num(logps.float()), mask, settings.score)
        scores = self.accelerator.gather(local_scores).to(device)

        advantages = lambdapo_ext.lambda_advantages(
            rewards.view(-1, group), scores.view(-1, group), mask=scored.view(-1, group),
            beta=settings.beta, normalize=settings.normalize).view(-1)
        local = len(local_scores)
        start = self.accelerator.process_index * local
        output["advantages"] = advantages[start:start + local].to(output["advantages"].device)

        # TRL logged its GRPO advantages for these completions: show LambdaPO's instead.
        logged = self._logs["advantages"]
        for _ in range(min(len(advantages), len(logged))):
            logged.pop()
        logged.extend(advantages.tolist())
        metrics = self._metrics[mode]
        metrics["lambdapo/advantage_mean"].append(float(advantages.mean()))
        metrics["lambdapo/advantage_std"].append(float(advantages.std()))
        metrics["lambdapo/advantage_abs_mean"].append(float(advantages.abs().mean()))
        metrics["lambdapo/score_mean"].append(float(scores[scored].mean()) if scored.any()
                                              else 0.0)
        return output

    @torch.no_grad()
    def _sampled_logps(self, output) -> torch.Tensor:
        """[B, C] log-probs of the sampled tokens: the sampler's when TRL has them, else the
        generating policy's (TRL's old log-probs, or a no-grad forward pass now: no update
        has happened since generation)."""
        for key in ("sampling_per_token_logps", "old_per_token_logps"):
            if output.get(key) is not None:
                return output[key]
        ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        mode = "train" if self.model.training else "eval"
        batch_size = (self.args.per_device_train_batch_size if mode == "train"
                      else self.args.per_device_eval_batch_size)
        extra = {k: output[k] for k in ("pixel_values", "image_grid_thw", "pixel_attention_mask",
                                        "image_sizes", "token_type_ids") if k in output}
        logps, _, _ = self._get_per_token_logps_and_entropies(
            self.model, ids, attention, output["completion_ids"].size(1), batch_size=batch_size,
            **extra)
        return logps
