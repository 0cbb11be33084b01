"""The engine a run's config names (``rollout.engine``)."""

from __future__ import annotations

import warnings

from ..config import TrainConfig
from ..models import autocast_dtype
from . import vllm_engine
from .base import RolloutEngine
from .transformers_engine import TransformersEngine
from .vllm_engine import VLLMEngine


def build_engine(config: TrainConfig, model, tokenizer, model_path: str, *,
                 seed: int | None = None, gather_weights=None,
                 several_processes: bool = False) -> RolloutEngine:
    """The engine ``config.rollout.engine`` names (``auto``: vLLM when it imports, else
    transformers, with a warning if vLLM is installed but broken) around the trainer's
    ``model``; ``model_path`` is its folder. ``seed``: of the engine's sampling (default
    ``config.seed``; each process of a run has its own). ``gather_weights(prefixes)``: a
    context in which the named parts of a sharded ``model`` are whole (the vLLM push);
    ``several_processes``: this process is one rank of several, each with its own engine.

    Raises:
        RolloutEngineError: ``vllm`` was asked for and cannot start (see VLLMEngine).
    """
    rollout = config.rollout
    name = rollout.engine
    if name == "auto":
        error = vllm_engine.vllm_import_error()
        if error is not None and vllm_engine.vllm_available():
            warnings.warn(f"rollout.engine=auto: vLLM is installed but {error}; generating "
                          f"with transformers", RuntimeWarning, stacklevel=2)
        name = "vllm" if error is None else "transformers"
    seed = config.seed if seed is None else seed
    if name == "transformers":
        return TransformersEngine(model, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                  seed=seed, autocast_dtype=autocast_dtype(config.model),
                                  static_decode=rollout.static_decode)
    max_len = rollout.max_model_len or min(
        config.data.max_prompt_tokens + rollout.max_new_tokens,
        getattr(model.config, "max_position_embeddings", None) or 1 << 30)
    return VLLMEngine(model, model_path, eos_token_id=tokenizer.eos_token_id, seed=seed,
                      dtype=config.model.dtype, max_model_len=max_len,
                      gpu_memory_utilization=rollout.gpu_memory_utilization,
                      kv_cache_bytes=int(rollout.kv_cache_gb * 2**30),
                      sleep_level=rollout.sleep_level, bucket_mb=rollout.weight_bucket_mb,
                      trust_remote_code=config.model.trust_remote_code,
                      gather_weights=gather_weights, external_launcher=several_processes)
