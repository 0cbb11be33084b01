"""The configuration tree of a run: dataclasses with defaults, loadable from YAML, every
field overridable as ``section.field=value`` on the command line, saved next to the outputs.

Names follow verl / TRL where they have one (``rollout.n`` is ``rollout.group_size`` here
because LambdaPO's groups are the unit of the advantage; ``clip_low``/``clip_high`` are
verl's ``clip_ratio_low``/``clip_ratio_high``; ``loss_agg_mode`` is verl's).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import advantages
from .loss import AGG_MODES, IS_LEVELS
from .method import (NORMALIZE_MODES, SCORE_MODES, SEMANTIC_METRICS, LambdaSettings,
                     SemanticDensitySettings)

BUILTIN_MODEL = "builtin:tiny-arithmetic"


class LambdapoWarning(UserWarning):
    """Something a user should know about a run that does not stop it (the command line
    prints these on one line)."""


def _f(default: Any, help: str, **kwargs: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help},
                     **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class ModelConfig:
    path: str = _f(BUILTIN_MODEL, "model directory (transformers format), a Hugging Face Hub "
                                  "name (org/name) or builtin:tiny-arithmetic | "
                                  "builtin:tiny-chain")
    dtype: str = _f("float32", "compute dtype: float32 | bfloat16 (autocast over fp32 master "
                               "weights; with LoRA the frozen base itself is bfloat16)")
    attn_implementation: str = _f(
        "auto", "auto (flash_attention_2 on a GPU with flash-attn for a model that supports "
                "it, else transformers' choice: sdpa where the model has it, else eager) | "
                "sdpa | eager | flash_attention_2")
    kernels: str = _f("none", "none | liger: Liger-Kernel's own patching of the model's family "
                              "(RMSNorm, SwiGLU, RoPE; CUDA only, pip install liger-kernel)")
    lora_rank: int = _f(0, "LoRA rank through peft (0: full fine-tuning); the KL reference is "
                           "then the base model with the adapter off")
    lora_alpha: float = _f(16.0, "LoRA alpha (the adapter's update is scaled by "
                                 "alpha / rank)")
    target_modules: list = _f(["all-linear"], "LoRA targets: all-linear (every linear layer "
                                              "but the output head) or module names, e.g. "
                                              "[q_proj, v_proj]")
    enable_gradient_checkpointing: bool = _f(
        False, "recompute each layer's activations in the backward (less memory, about a "
               "third more compute); the training forward then runs each response with its "
               "prompt")
    trust_remote_code: bool = _f(False, "allow model code from the model directory")


@dataclass
class DataConfig:
    dataset: str = _f("arithmetic", "arithmetic | chain (built-in tasks) | reasoning_gym:<task> "
                                    "(pip install reasoning-gym) | a .jsonl/.json/.parquet "
                                    "file | a Hugging Face dataset name or local dataset folder")
    train_split: str = _f("train", "split of a Hugging Face dataset used for training")
    eval_dataset: str = _f("", "held-out data (same forms; empty: the built-in eval split, "
                               "or the 'test' split of a Hugging Face dataset)")
    eval_split: str = _f("test", "split of a Hugging Face eval dataset")
    prompt_field: str = _f("prompt", "column holding the prompt")
    answer_field: str = _f("answer", "column holding the gold answer")
    solution_field: str = _f("solution", "column holding the reference solution ('' if none)")
    answer_pattern: str = _f("", "regex whose first group extracts the gold answer from the "
                                 "answer column (e.g. '####\\s*(.+)$' for GSM8K)")
    prompt_template: str = _f("{prompt}", "Python format string over the row's columns")
    chat_template: str = _f("auto", "auto (use the tokenizer's chat template when it has one) "
                                    "| on | off")
    num_train: int = _f(20000, "problems generated for the built-in task's train split")
    num_eval: int = _f(200, "held-out problems (built-in task) or the first rows of eval data")
    max_prompt_tokens: int = _f(512, "longer prompts are an error naming the row")


@dataclass
class RolloutConfig:
    engine: str = _f("transformers", "generation backend: transformers | vllm (colocated "
                                     "vLLM engine) | auto (vllm when it imports)")
    group_size: int = _f(8, "responses sampled per prompt (G)")
    temperature: float = _f(1.0, "sampling temperature (log-probs include it)")
    top_p: float = _f(1.0, "nucleus sampling mass")
    top_k: int = _f(0, "top-k sampling (0: off)")
    max_new_tokens: int = _f(64, "response length limit")
    static_decode: str = _f(
        "auto", "transformers engine: the project's decode loop over preallocated key-value "
                "buffers (auto: for the Llama-family models its probe accepts, else "
                "transformers' generate) | on (required) | off (transformers' generate)")
    gpu_memory_utilization: float = _f(0.3, "vllm: share of GPU memory (on CPU: of RAM) "
                                            "it reserves for weights and KV cache")
    kv_cache_gb: float = _f(0.0, "vllm: KV cache size in GiB (0: what "
                                 "gpu_memory_utilization leaves after the weights)")
    max_model_len: int = _f(0, "vllm: longest prompt + response (0: data.max_prompt_tokens "
                               "+ max_new_tokens, capped at the model's positions)")
    sleep_level: int = _f(1, "vllm on GPU, between generations: 0 stay resident | 1 offload "
                             "weights, free KV cache | 2 discard both (weights re-pushed); "
                             "vLLM's CPU backend cannot sleep and stays resident")
    weight_bucket_mb: int = _f(256, "vllm: size of one weight push (whole layers per push)")


@dataclass
class AlgorithmConfig:
    adv_estimator: str = _f("lambdapo", "advantage estimator")
    lambda_beta: float = _f(1.0, "LambdaPO pair weight sharpness (0: RLOO)")
    lambda_score: str = _f("mean", "confidence score of a response, over its log-probs")
    lambda_normalize: str = _f("mean", "LambdaPO normalization")
    clip_low: float = _f(0.2, "PPO clip: ratio >= 1 - clip_low")
    clip_high: float = _f(0.2, "PPO clip: ratio <= 1 + clip_high")
    loss_agg_mode: str = _f("token-mean", "how token losses are aggregated")
    kl_coef: float = _f(0.0, "k3 KL penalty to a frozen reference (0: no reference loaded)")
    ppo_epochs: int = _f(1, "passes over each rollout batch")
    mini_batches: int = _f(1, "optimizer steps per pass (the batch split evenly)")
    rollout_is: str = _f("token", "importance weight between the engine's sampling and the "
                                  "trainer's log-probs (sequence: exp of the mean per-token "
                                  "log-ratio)")
    rollout_is_cap: float = _f(2.0, "truncation of that weight (verl's rollout_is_threshold)")
    share_prompt_forward: str = _f(
        "auto", "training forward: each prompt once, its key-value cache continued by every "
                "response of it (auto: when a check on the first micro-batch agrees with the "
                "plain forward) | on | off (each response runs with its prompt)")
    fused_policy_loss: str = _f(
        "auto", "the policy loss fused with the lm-head (lambdapo_ext.linear_policy_loss: "
                "three matmuls, no logits): auto (wherever it serves) | on (an error where it "
                "cannot) | off (linear_token_logprobs and the loss in torch)")


@dataclass
class RewardConfig:
    functions: list = _f(["math_verify", "semantic_density"],
                         "reward functions: math_verify, semantic_density, format, or "
                         "module:function")
    weights: dict = _f({}, "weight per function name (default 1; semantic_density: lambda_sd)")
    lambda_sd: float = _f(0.1, "weight of the semantic density reward")
    sd_metric: str = _f("rouge_n", "semantic density metric: rouge_n | rouge_l")
    sd_max_n: int = _f(2, "largest n of ROUGE-N")
    answer_marker: str = _f("", "text before the final answer (e.g. '####'); empty: \\boxed{} "
                                "or the last expression, as math-verify extracts it")
    timeout_s: int = _f(5, "math-verify time limit per parse/verify call (seconds)")
    workers: int = _f(1, "math-verify worker processes: they verify while the trainer runs its "
                         "first forward (0: in the trainer's process, before the update)")
    on_error: str = _f("raise", "a reward that raises or returns NaN: raise | zero (score 0, "
                                "logged)")


@dataclass
class OptimConfig:
    lr: float = _f(1e-4, "AdamW learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    betas: list = _f([0.9, 0.99], "AdamW betas")
    warmup_steps: int = _f(0, "linear warm-up steps")
    schedule: str = _f("constant", "after warm-up: constant | cosine")
    max_grad_norm: float = _f(1.0, "gradient norm clip (0: off)")


@dataclass
class CheckpointConfig:
    keep_last: int = _f(0, "keep only the N newest checkpoints/step-* folders (0: all); the "
                           "one checkpoints/latest names is never deleted")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    steps: int = _f(200, "training steps (one rollout batch each)")
    prompts_per_step: int = _f(16, "prompts per step (each sampled group_size times)")
    micro_batch_size: int = _f(64, "sequences per forward/backward (gradient accumulation)")
    eval_samples: int = _f(4, "samples per held-out prompt (accuracy = mean over them)")
    eval_temperature: float = _f(-1.0, "held-out sampling temperature (< 0: rollout's; 0: "
                                       "greedy)")
    eval_every: int = _f(50, "also evaluate every N steps (0: before and after only)")
    save_every: int = _f(0, "checkpoint every N steps (0: at the end only)")
    output_dir: str = _f("runs/lambdapo", "run directory (metrics, plots, checkpoints)")
    seed: int = _f(0, "seed of data order, sampling and initialisation")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    threads: int = _f(0, "CPU threads for torch (0: torch's default, one per core, the "
                         "fastest on an idle machine even for the built-in model)")
    log_samples: int = _f(2, "completions written to samples.jsonl per step")
    dist_timeout_s: float = _f(1800.0, "several processes (torchrun): seconds a collective "
                                       "waits for the other processes before the run fails")
    data_parallel: str = _f("auto", "several processes (torchrun): fsdp (FSDP2: parameters, "
                                    "gradients and optimizer states sharded over the "
                                    "processes) | ddp (a whole copy per process) | auto "
                                    "(fsdp where it runs on the device, else ddp)")
    logger: list = _f(["console", "tensorboard"],
                      "experiment trackers, a list of console | tensorboard | wandb | "
                      "mlflow | trackio, e.g. [console,wandb] (verl's trainer.logger); "
                      "metrics.jsonl is always written")
    project_name: str = _f("lambdapo", "tracker project (W&B project, MLflow experiment, "
                                       "Trackio project)")
    experiment_name: str = _f("", "tracker run name (empty: output_dir as given)")
    console_every: int = _f(0, "console logger: a line of key metrics every N steps (0: "
                               "the first and last steps and one per 30 s between)")


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _convert(value: Any, target: Any, key: str) -> Any:
    """Converts a YAML or command-line value to the field's type, naming the key on error."""
    origin = typing.get_origin(target) or target
    try:
        if origin is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"expected a boolean, got {value!r}")
        if origin in (int, float):
            if isinstance(value, bool):
                raise ValueError(f"expected a number, got {value!r}")
            converted = origin(value)
            if origin is int and isinstance(value, float) and value != converted:
                raise ValueError(f"expected an integer, got {value!r}")
            return converted
        if origin is str:
            return "" if value is None else str(value)
        if origin in (list, dict):
            if isinstance(value, str):
                value = yaml.safe_load(value) if value.strip() else origin()
            if origin is list and isinstance(value, str):
                value = [value]
            if not isinstance(value, origin):
                raise ValueError(f"expected a {origin.__name__}, got {value!r}")
            return value
    except (TypeError, ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"config {key}: {exc}") from None
    raise ValueError(f"config {key}: unsupported type {target}")


def _apply(node: Any, updates: dict, prefix: str = "") -> None:
    names = {f.name: f for f in dataclasses.fields(node)}
    for key, value in updates.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ValueError(f"config: unknown key {path!r} (known: "
                             f"{', '.join(prefix + n for n in names)})")
        current = getattr(node, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"config {path}: expected a mapping, got {value!r}")
            _apply(current, value, prefix=f"{path}.")
        else:
            setattr(node, key, _convert(value, _field_type(type(node), key), path))


def parse_overrides(items: list[str]) -> dict:
    """``["a.b=1", "c=x"]`` -> nested dict ``{"a": {"b": "1"}, "c": "x"}`` (values as text)."""
    nested: dict = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"config override {item!r} must look like section.field=value")
        key, value = item.split("=", 1)
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"config override {item!r} conflicts with an earlier one")
        node[parts[-1]] = value
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                base: str | Path | None = None) -> TrainConfig:
    """Defaults, then the YAML file ``base`` (a run's saved config.yaml, if any), then the
    YAML file at ``path`` (if any), then ``overrides`` (``section.field=value``). Raises
    ValueError naming the key for unknown keys or values of the wrong type, and for invalid
    choices (see :func:`validate`)."""
    config = TrainConfig()
    for file in (base, path):
        if file:
            data = _read_yaml(Path(file))
            if not isinstance(data, dict):
                raise ValueError(f"config file {file}: expected a mapping at the top level")
            _apply(config, data)
    _apply(config, parse_overrides(overrides or []))
    validate(config)
    return config


def _read_yaml(path: Path) -> Any:
    """The parsed file; ValueError naming the file (and line) when it cannot be read."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"config file {path}: {exc.strerror or exc}") from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        raise ValueError(f"config file {path}{where}: YAML syntax error: {problem}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {path}: YAML syntax error: {exc}") from None


# Allowed values per field. A callable reads them from the module that interprets the
# field (its one owner); help_lines() shows those after the field's help.
_CHOICES: dict[str, tuple | typing.Callable[[], tuple]] = {
    "model.dtype": ("float32", "bfloat16"),
    "model.attn_implementation": ("auto", "sdpa", "eager", "flash_attention_2"),
    "model.kernels": ("none", "liger"),
    "algorithm.share_prompt_forward": ("auto", "on", "off"),
    "algorithm.fused_policy_loss": ("auto", "on", "off"),
    "data.chat_template": ("auto", "on", "off"),
    "rollout.engine": ("transformers", "vllm", "auto"),
    "rollout.static_decode": ("auto", "on", "off"),
    "rollout.sleep_level": (0, 1, 2),
    "algorithm.rollout_is": lambda: IS_LEVELS,
    "algorithm.adv_estimator": lambda: tuple(advantages.ESTIMATORS),
    "algorithm.loss_agg_mode": lambda: AGG_MODES,
    "reward.on_error": ("raise", "zero"),
    "optim.schedule": ("constant", "cosine"),
}
# The method's own settings: checked by lambdapo.method (the one home of those rules, shared
# with the TRL and verl adapters); listed here for the help only.
_METHOD_CHOICES = {
    "algorithm.lambda_score": lambda: SCORE_MODES,
    "algorithm.lambda_normalize": lambda: NORMALIZE_MODES,
    "reward.sd_metric": lambda: SEMANTIC_METRICS,
}

_POSITIVE = ("rollout.group_size", "rollout.max_new_tokens", "steps", "prompts_per_step",
             "micro_batch_size", "eval_samples", "algorithm.ppo_epochs",
             "algorithm.mini_batches", "reward.timeout_s",
             "rollout.weight_bucket_mb")


def allowed_values(key: str) -> tuple:
    """The values field ``key`` (``section.field``) accepts."""
    choices = _CHOICES[key]
    return tuple(choices()) if callable(choices) else choices


def get(config: TrainConfig, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


def lambda_settings(config: TrainConfig) -> LambdaSettings:
    """The run's lambda-advantage settings (``algorithm.lambda_*``), checked.

    Raises:
        ValueError: naming the invalid field.
    """
    algo = config.algorithm
    return LambdaSettings.checked(
        algo.lambda_beta, algo.lambda_score, algo.lambda_normalize,
        names={key: f"config algorithm.lambda_{key}" for key in ("beta", "score", "normalize")})


def semantic_density_settings(config: TrainConfig) -> SemanticDensitySettings:
    """The run's semantic-density reward settings (``reward.lambda_sd``, ``sd_metric``,
    ``sd_max_n``), checked.

    Raises:
        ValueError: naming the invalid field.
    """
    reward = config.reward
    return SemanticDensitySettings.checked(
        reward.lambda_sd, reward.sd_metric, reward.sd_max_n,
        names={"weight": "config reward.lambda_sd", "metric": "config reward.sd_metric",
               "max_n": "config reward.sd_max_n"})


def validate(config: TrainConfig) -> None:
    """Raises ValueError naming the first field with an invalid value."""
    lambda_settings(config)
    semantic_density_settings(config)
    for key in _CHOICES:
        choices = allowed_values(key)
        if get(config, key) not in choices:
            raise ValueError(f"config {key}: {get(config, key)!r} is not one of {choices}")
    for key in _POSITIVE:
        if get(config, key) < 1:
            raise ValueError(f"config {key}: must be >= 1, got {get(config, key)}")
    if config.rollout.group_size < 2:
        raise ValueError("config rollout.group_size: needs >= 2 responses per prompt for a "
                         "group advantage")
    if not 0 < config.rollout.top_p <= 1:
        raise ValueError(f"config rollout.top_p: must lie in (0, 1], got {config.rollout.top_p}")
    if not 0 < config.rollout.gpu_memory_utilization <= 1:
        raise ValueError(f"config rollout.gpu_memory_utilization: must lie in (0, 1], got "
                         f"{config.rollout.gpu_memory_utilization}")
    if config.algorithm.rollout_is_cap < 1:
        raise ValueError(f"config algorithm.rollout_is_cap: must be >= 1, got "
                         f"{config.algorithm.rollout_is_cap}")
    if config.rollout.temperature <= 0:
        raise ValueError("config rollout.temperature: must be > 0 (sampling is required)")
    for key in ("algorithm.clip_low", "algorithm.clip_high", "algorithm.kl_coef",
                "optim.weight_decay", "optim.max_grad_norm", "optim.lr",
                "optim.warmup_steps", "rollout.max_model_len", "rollout.kv_cache_gb",
                "eval_every", "save_every", "threads", "log_samples", "checkpoint.keep_last",
                "console_every",
                "reward.workers"):
        if get(config, key) < 0:
            raise ValueError(f"config {key}: must be >= 0, got {get(config, key)}")
    if config.data_parallel not in ("auto", "fsdp", "ddp"):
        raise ValueError(f"config data_parallel: must be auto, fsdp or ddp, got "
                         f"{config.data_parallel!r}")
    if config.dist_timeout_s <= 0:
        raise ValueError(f"config dist_timeout_s: must be > 0, got {config.dist_timeout_s}")
    if config.model.lora_rank < 0:
        raise ValueError(f"config model.lora_rank: must be >= 0 (0: full fine-tuning), got "
                         f"{config.model.lora_rank}")
    if config.model.lora_alpha <= 0:
        raise ValueError(f"config model.lora_alpha: must be > 0, got {config.model.lora_alpha}")
    _check_loggers(config.logger)
    if len(config.optim.betas) != 2:
        raise ValueError(f"config optim.betas: expected two numbers, got {config.optim.betas}")
    _check_model_path(config.model.path)


def _check_loggers(names: list) -> None:
    from .trackers import BACKENDS

    for name in names:
        if name not in BACKENDS:
            raise ValueError(f"config logger: {name!r} is not one of {tuple(BACKENDS)}; give "
                             f"a list, e.g. logger=[console,wandb]")


def _check_model_path(path: str) -> None:
    """A model.path that exists must be a model folder (a missing one is reported when the
    model loads)."""
    folder = Path(path)
    if folder.is_file():
        raise ValueError(f"config model.path: {path} is a file; expected a model folder in "
                         f"transformers format (config.json, tokenizer files, *.safetensors)"
                         f" or {BUILTIN_MODEL}")
    if folder.is_dir() and not (folder / "config.json").exists() and \
            not (folder / "adapter_config.json").exists():
        hint = (" (a training run's folder: use its checkpoints/latest, e.g. "
                "lambdapo eval --model RUN_DIR)" if (folder / "checkpoints").is_dir() else "")
        raise ValueError(f"config model.path: {path} has no config.json; expected a model "
                         f"folder in transformers format{hint}")


# Fields that a resumed run may change (with a warning): how long it runs, how often it
# evaluates, saves and logs, where and how it computes. Any other change (model, data,
# sampling, algorithm, rewards, optimizer, seed, batch shape) would make the rest of the
# run a different experiment from the checkpoint's, so it is an error unless allowed.
RESUMABLE_CHANGES = (
    "steps", "eval_every", "save_every", "eval_samples", "eval_temperature", "output_dir",
    "device", "threads", "log_samples", "micro_batch_size", "checkpoint.", "data.eval_dataset",
    "data.eval_split", "data.num_eval", "data.max_prompt_tokens", "rollout.engine",
    "rollout.gpu_memory_utilization", "rollout.kv_cache_gb", "rollout.max_model_len",
    "rollout.sleep_level", "rollout.weight_bucket_mb", "reward.timeout_s", "reward.on_error",
    "reward.workers", "dist_timeout_s", "model.kernels", "model.attn_implementation",
    "rollout.static_decode", "algorithm.share_prompt_forward", "logger", "project_name",
    "experiment_name", "console_every", "algorithm.fused_policy_loss")


def _flatten(tree: dict) -> dict:
    """``{"rollout": {"group_size": 8}, "steps": 2}`` -> ``{"rollout.group_size": 8,
    "steps": 2}`` (only the config's sections are opened, not dict-valued fields)."""
    defaults = TrainConfig()
    sections = {f.name for f in dataclasses.fields(defaults)
                if dataclasses.is_dataclass(getattr(defaults, f.name))}
    flat = {}
    for key, value in tree.items():
        if key in sections and isinstance(value, dict):
            flat.update({f"{key}.{name}": item for name, item in value.items()})
        else:
            flat[key] = value
    return flat


def config_changes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """Compares a checkpoint's config with the current one (both as :func:`to_dict`
    gives them). Returns (breaking, harmless) changes as ``key: old -> new`` lines; keys
    only one side has (another lambdapo version) are not compared."""
    before, after = _flatten(saved), _flatten(current)
    breaking, harmless = [], []
    for key in after:
        if key not in before or before[key] == after[key] or key == "output_dir":
            continue
        line = f"{key}: {before[key]!r} -> {after[key]!r}"
        allowed = any(key == name or (name.endswith(".") and key.startswith(name))
                      for name in RESUMABLE_CHANGES)
        (harmless if allowed else breaking).append(line)
    return breaking, harmless


def to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


def save_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def help_lines(node: Any = None, prefix: str = "") -> list[str]:
    """One line per field: ``section.field = default  help``."""
    node = node if node is not None else TrainConfig()
    lines = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            lines += help_lines(value, prefix=f"{prefix}{f.name}.")
        else:
            shown = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...")
            text = f.metadata.get("help", "")
            choices = _CHOICES.get(prefix + f.name) or _METHOD_CHOICES.get(prefix + f.name)
            if callable(choices):
                text += ": " + " | ".join(str(c) for c in choices())
            lines.append(f"  {prefix + f.name + ' = ' + shown.strip():<44} {text}")
    return lines


__all__ = ["TrainConfig", "ModelConfig", "DataConfig", "RolloutConfig", "AlgorithmConfig",
           "RewardConfig", "OptimConfig", "CheckpointConfig", "load_config", "save_config",
           "parse_overrides", "validate", "help_lines", "to_dict", "config_changes",
           "LambdapoWarning", "BUILTIN_MODEL"]
