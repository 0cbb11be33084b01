"""One training step, lambdapo vs TRL's GRPOTrainer, on the same model, prompts and batch.

The setting of issue 19: the built-in tiny model, 16 prompts x 8 samples, up to 48 new
tokens (the small size: 16), temperature 1, fp32, no KL, one optimizer step per batch in
micro-batches of 64, no evaluation, the same two rewards (math_verify and 0.1 x
semantic_density, lambdapo's reward functions, which have TRL's signature).

Real shapes (issue 39), randomly initialised from the published config.json with a
synthetic word-level tokenizer of the same 151936-token vocabulary:

* ``model=qwen2.5-0.5b``: Qwen2.5-0.5B's shape. On the CPU float32, 4 prompts x 4 samples x
  64 new tokens (small: 16); on CUDA bf16 autocast over fp32 weights, 16 x 8 x 256 (small:
  32); full fine-tuning, or LoRA with ``lora_rank=16`` (alpha 32, every linear layer but
  the head, dropout 0; TRL gets the same ``peft.LoraConfig``). Targets: lambdapo's peak
  resident memory and step time at most TRL's.
* ``model=qwen3-4b``: Qwen3-4B's shape with bf16 weights, LoRA rank 16, gradient
  checkpointing, the KL reference as the base with the adapter off (``kl_coef`` 0.04),
  2 prompts x 4 samples x 32 new tokens, lambdapo only. Target: peak resident memory within
  20 GiB (what one 24 GB GPU holds). On a CPU without bf16 matrix units (AVX2 only) torch
  multiplies bf16 in a linear layer's input-gradient layout at well under 1 GFLOP/s, so a
  bf16 step takes hours there: ``dtype=float32`` (``--dtype float32``) runs the case with
  float32 weights, every model-sized buffer twice its bf16 size, a bound on the bf16 peak.

Both trainers get the same gradient checkpointing setting (TRL's own default is on; here it
is off unless the model's case turns it on, or ``checkpointing=1``). ``layers=N`` cuts a
shape to N layers (quick checks; the label says so).

    pytest benchmarks/bench_train_step.py --benchmark-only [--bench-set model=qwen2.5-0.5b]
    python benchmarks/bench_train_step.py --threads 1 --runs 3 --steps 12
    python benchmarks/bench_train_step.py --model-config qwen2.5-0.5b --modes full,lora --runs 2 \\
        --warmup 1 --steps 2
    python benchmarks/bench_train_step.py --model-config qwen3-4b --runs 1 --warmup 0 --steps 1
    python benchmarks/bench_train_step.py --device cuda --model-config qwen2.5-0.5b

A round is one optimizer step: lambdapo's ``Trainer.train_step()``; for TRL, its own
``train()`` loop in a thread that pauses after every step (``on_step_end``), so that a
round is exactly one of its steps, from one ``on_step_end`` to the next. A step's parts are
generation, the middle (rewards, scores, advantages, bookkeeping) and training (forward,
backward, optimizer step); TRL's come from timing its ``_generate`` and
``_generate_and_score_completions``. ``cpu_s`` is the process's CPU time per step. In
TRL's thread lambdapo's reward functions run without their per-call time limit (SIGALRM
needs the main thread; it costs two system calls a call). TRL is optional: without it
its case is not run, with the reason.

``peak_rss_mib`` is the peak resident set (VmHWM) of the process that ran the case, from
its start (model loading included) to the end of its last step; a real-shape model is
written to the temporary folder by a separate process first, so that its making is not
counted. lambdapo's reward workers are processes of their own: their peak resident sets
are reported beside it (``workers_peak_rss_mib``), not in it.

The script runs each trainer in a fresh pytest process per run, alternating run by run
(so that a change of machine load hits both), and prints medians over all runs' timed
steps and the largest peak resident set of the runs; each run prints a line as it starts
and ends. Rows go to benchmarks/out/train_step.jsonl (untracked; ``--out DIR``,
``--no-save``), and with ``--record`` also to the tracked history
benchmarks/results/train_step.jsonl.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

OP = "train_step"
RATIOS = ("trl",)
# The dispatcher ops the trainer reaches (token_logprobs, linear_token_logprobs,
# lambda_advantages, semantic_density).
KERNELS = ("token_logprobs_forward", "token_logprobs_backward", "linear_token_logprobs_forward",
           "linear_token_logprobs_backward", "lambda_advantages", "ngram_overlap", "lcs_length")
# -1 (lora_rank, checkpointing, kl_coef): the model's own case (MODEL_DEFAULTS).
SETTINGS = {"model": "builtin", "seed": 0, "lora_rank": -1, "lora_alpha": 32.0,
            "checkpointing": -1, "kl_coef": -1.0, "layers": 0, "dtype": ""}
MODELS = ("builtin", "qwen2.5-0.5b", "qwen3-4b")
MICRO_BATCH = 64
# (prompts, samples per prompt, max new tokens) by model, size and device
BATCHES = {
    "builtin": {"small": (16, 8, 16), "full": (16, 8, 48)},
    "qwen2.5-0.5b": {"small": (16, 8, 32), "full": (16, 8, 256)},
    "qwen2.5-0.5b@cpu": {"small": (4, 4, 16), "full": (4, 4, 64)},
    "qwen3-4b": {"small": (2, 4, 8), "full": (2, 4, 32)},
}
# dtype by model (and device): on the CPU the Qwen2.5-0.5B case is float32, since CPUs
# without bf16 matrix units (AVX2 only, like the project machine's) multiply bf16 about
# 10x slower than float32.
DTYPES = {"builtin": "float32", "qwen2.5-0.5b": "bfloat16", "qwen2.5-0.5b@cpu": "float32",
          "qwen3-4b": "bfloat16"}
MODEL_DEFAULTS = {"qwen3-4b": {"lora_rank": 16, "checkpointing": True, "kl_coef": 0.04}}
# Cases TRL does not run, with the reason.
LAMBDAPO_ONLY = {"qwen3-4b": "a lambdapo-only memory case (issue 39)"}
# Bound on lambdapo's peak resident set, GiB (issue 39).
PEAK_RSS_BOUND_GIB = {"qwen3-4b": 20.0}
# Bound on lambdapo's step time over TRL's (issue 19 for the built-in setting, issue 39
# for the real shapes; memory: lambdapo's peak resident set at most TRL's there).
STEP_RATIO_BOUND = {"builtin": 0.5, "qwen2.5-0.5b": 1.0}
WARMUP = {"small": 1, "full": 3}
IMPLS = ("lambdapo", "trl")
PARTS = ("gen", "middle", "train", "step")
MIB = 2**20

# Qwen2.5-0.5B's architecture (config.json of Qwen/Qwen2.5-0.5B), randomly initialised.
QWEN_05B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
    "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
    "num_key_value_heads": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "tie_word_embeddings": True, "vocab_size": 151936,
    "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151643,
    "pad_token_id": 151643, "torch_dtype": "float32", "use_sliding_window": False,
}
# Qwen3-4B's architecture (config.json of Qwen/Qwen3-4B), randomly initialised, bf16.
QWEN3_4B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 2560,
    "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960,
    "max_window_layers": 36, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
    "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": True,
    "vocab_size": 151936, "hidden_act": "silu", "initializer_range": 0.02,
    "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16",
    "use_sliding_window": False, "sliding_window": None,
}
# Real shapes: (config.json, dtype of the written weights)
SHAPES = {"qwen2.5-0.5b": (QWEN_05B, "float32"), "qwen3-4b": (QWEN3_4B, "bfloat16")}


@dataclass(frozen=True)
class Setup:
    """Everything one case of a training step is: model, batch, mode and seed."""
    model: str
    prompts: int
    group: int
    max_new: int
    dtype: str
    lora_rank: int = 0            # 0: full fine-tuning
    lora_alpha: float = 32.0
    checkpointing: bool = False   # gradient checkpointing, both trainers
    kl_coef: float = 0.0          # lambdapo's kl_coef, TRL's beta
    layers: int = 0               # 0: the shape's own layer count
    seed: int = 0
    own_dtype: bool = True        # False: ``dtype`` overrides the case's own (the label says so)

    @property
    def micro_batch(self) -> int:
        return min(MICRO_BATCH, self.prompts * self.group)

    @property
    def mode(self) -> str:
        return f"lora{self.lora_rank}" if self.lora_rank else "full"


def make_setup(model: str, size: str, device: str, *, seed: int = 0, lora_rank: int = -1,
               lora_alpha: float = 32.0, checkpointing: int = -1, kl_coef: float = -1.0,
               layers: int = 0, dtype: str = "") -> Setup:
    """The case of ``model`` at ``size`` on ``device``; -1 (lora_rank, checkpointing,
    kl_coef) or "" (dtype): the model's own case."""
    if model not in MODELS:
        raise pytest.UsageError(f"--bench-set model={model}: one of {MODELS}")
    if layers and model == "builtin":
        raise pytest.UsageError("--bench-set layers=N: only for the real shapes")
    if dtype and (model == "builtin" or dtype not in ("float32", "bfloat16")):
        raise pytest.UsageError(f"--bench-set dtype={dtype}: float32 or bfloat16, only for "
                                f"the real shapes")
    def on_device(table: dict) -> Any:
        return table.get(f"{model}@{device}", table[model])
    prompts, group, max_new = on_device(BATCHES)[size]
    defaults = MODEL_DEFAULTS.get(model, {})
    own = on_device(DTYPES)
    return Setup(model, prompts, group, max_new, dtype or own,
                 lora_rank=defaults.get("lora_rank", 0) if lora_rank < 0 else lora_rank,
                 lora_alpha=lora_alpha,
                 checkpointing=defaults.get("checkpointing", False) if checkpointing < 0
                 else bool(checkpointing),
                 kl_coef=defaults.get("kl_coef", 0.0) if kl_coef < 0 else kl_coef,
                 layers=layers, seed=seed, own_dtype=dtype in ("", own))


def size_label(setup: Setup, threads: int) -> str:
    """``16x8,max48,builtin,float32,1threads``; a real shape adds its mode and what differs
    from the default (``lora16``, ``gc``, ``kl0.04``, ``4layers``)."""
    model = setup.model + (f"-{setup.layers}layers" if setup.layers else "")
    parts = [f"{setup.prompts}x{setup.group}", f"max{setup.max_new}", model, setup.dtype]
    if setup.lora_rank:
        parts.append(f"lora{setup.lora_rank}")
    if setup.checkpointing:
        parts.append("gc")
    if setup.kl_coef:
        parts.append(f"kl{setup.kl_coef:g}")
    return ",".join(parts + [f"{threads or 'default'}threads"])


def setup_of(options: harness.BenchOptions, device: str) -> Setup:
    """The session's case (``--bench-set`` settings over the model's own)."""
    get = functools.partial(options.setting, SETTINGS)
    return make_setup(get("model"), options.size, device, seed=get("seed"),
                      lora_rank=get("lora_rank"), lora_alpha=get("lora_alpha"),
                      checkpointing=get("checkpointing"), kl_coef=get("kl_coef"),
                      layers=get("layers"), dtype=get("dtype"))


def cases(options: harness.BenchOptions, device: str) -> list[harness.Case]:
    setup = setup_of(options, device)
    # One thread unless asked: the trainer's recorded setting on a shared 2-core machine.
    threads = 1 if options.threads is None else options.threads
    size = size_label(setup, threads)
    return [harness.Case(OP, impl, size, device, spec=(setup,), kernels=KERNELS,
                         warmup=WARMUP[options.size], peak_memory=False, threads=threads)
            for impl in IMPLS]


def write_shaped_model(folder: Path, shape: dict, dtype: str = "float32") -> Path:
    """A randomly initialised model of ``shape`` (a config.json's fields) in ``dtype`` and a
    synthetic word-level tokenizer of its vocabulary (the characters of the arithmetic task,
    then fillers). Written once: a folder that is complete is left as it is."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    done = folder / "complete"
    if done.exists():
        return folder
    vocab_size = shape["vocab_size"]
    chars = list("0123456789+=-*/,.()\\{}boxed ")
    names = ["<unk>"] + chars
    names += [f"<t{i}>" for i in range(vocab_size - len(names) - 1)] + ["<|endoftext|>"]
    vocab = {name: i for i, name in enumerate(names)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    eos = vocab["<|endoftext|>"]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(folder)
    config = AutoConfig.for_model(**{**shape, "bos_token_id": eos, "eos_token_id": eos,
                                     "pad_token_id": eos, "torch_dtype": dtype})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(folder, safe_serialization=True)
    done.write_text("")
    return folder


def written_dtype(setup: Setup) -> str:
    """The dtype of a real shape's written weights: the shape's own unless the case
    overrides its dtype."""
    return SHAPES[setup.model][1] if setup.own_dtype else setup.dtype


def shaped_model_folder(setup: Setup) -> Path:
    layers = f"-{setup.layers}layers" if setup.layers else ""
    dtype = "" if written_dtype(setup) == SHAPES[setup.model][1] else f"-{setup.dtype}"
    return Path(tempfile.gettempdir()) / f"lambdapo-{setup.model}{layers}{dtype}-shape"


def model_path(setup: Setup) -> str:
    """The model folder of ``setup``. A real shape not yet written is written by a separate
    process, so that making it adds nothing to this process's peak resident set."""
    from lambdapo.models import resolve_model_path

    if setup.model == "builtin":
        return resolve_model_path("builtin:tiny-arithmetic")
    folder = shaped_model_folder(setup)
    if not (folder / "complete").exists():
        shape, dtype = SHAPES[setup.model][0], written_dtype(setup)
        if setup.layers:
            shape = {**shape, "num_hidden_layers": setup.layers}
            if "max_window_layers" in shape:
                shape["max_window_layers"] = setup.layers
        code = ("import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
                "import bench_train_step as b; "
                "b.write_shaped_model(Path(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4])")
        subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parent),
                        str(folder), json.dumps(shape), dtype], check=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(
                           [str(ROOT), str(ROOT / "python"), os.environ.get("PYTHONPATH", "")])})
    return str(folder)


# ------------------------------------------------------------------------------ memory
def _status_kib(pid: str, key: str) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(rf"{key}:\s+(\d+) kB", text)
    return int(match.group(1)) if match else None


def _child_pids(pid: str) -> list[str]:
    out = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                out += (task / "children").read_text().split()
            except OSError:
                pass
    except OSError:
        pass
    return out


def peak_rss() -> dict:
    """This process's peak resident set (VmHWM, MiB), and the sum of its live descendants'
    (lambdapo's reward workers), with their count."""
    own = _status_kib("self", "VmHWM") or 0
    pids, stack = [], _child_pids(str(os.getpid()))
    while stack:
        pid = stack.pop()
        pids.append(pid)
        stack += _child_pids(pid)
    children = [k for k in (_status_kib(pid, "VmHWM") for pid in pids) if k is not None]
    return {"peak_rss_mib": round(own / 1024, 1),
            "workers_peak_rss_mib": round(sum(children) / 1024, 1), "workers": len(children)}


def task_rows(tokenizer) -> list[dict]:
    from lambdapo.tasks import arithmetic

    rows = arithmetic.generate("train", 256, seed=0)
    for row in rows:
        row["solution_ids"] = tokenizer(row["solution"], add_special_tokens=False)["input_ids"]
    return rows


# ------------------------------------------------------------------------------ trainers
def lambdapo_step(case: harness.Case, steps: int, out_dir: str, stack: contextlib.ExitStack
                  ) -> Callable[[], dict]:
    """One lambdapo training step per call; returns its parts."""
    from lambdapo.config import load_config
    from lambdapo.process import configure_process
    from lambdapo.trainer import Trainer

    setup: Setup = case.spec[0]
    overrides = {
        "model.path": model_path(setup), "model.dtype": setup.dtype, "device": case.device,
        "prompts_per_step": setup.prompts, "rollout.group_size": setup.group,
        "rollout.max_new_tokens": setup.max_new, "rollout.temperature": 1.0,
        "rollout.engine": "transformers", "algorithm.kl_coef": setup.kl_coef,
        "algorithm.ppo_epochs": 1, "algorithm.mini_batches": 1,
        "micro_batch_size": setup.micro_batch, "steps": steps,   # the LR schedule's length
        # threads=0: the trainer leaves torch's setting alone; the case sets it.
        "threads": 0, "output_dir": out_dir, "log_samples": 0, "seed": setup.seed,
        "data.max_prompt_tokens": 64,
        "model.enable_gradient_checkpointing": setup.checkpointing,
    }
    if setup.lora_rank:
        overrides.update({"model.lora_rank": setup.lora_rank,
                          "model.lora_alpha": setup.lora_alpha,
                          "model.target_modules": "all-linear"})
    config = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    configure_process(config)   # as `lambdapo train` does (seeds, malloc on the CPU)
    trainer = stack.enter_context(Trainer(config, progress=False))

    def step() -> dict:
        m = trainer.train_step()
        return {"gen": m["gen_time"], "middle": m["middle_time"], "train": m["train_time"],
                "tokens": m["response_length"] * setup.prompts * setup.group}
    return step


class PausedTrainLoop:
    """Runs a transformers Trainer's ``train()`` in a thread that waits after every
    optimizer step; each call lets exactly one step run and returns when it has ended.
    The first call also runs the loop's set-up."""

    def __init__(self, trainer: Any) -> None:
        from transformers import TrainerCallback

        self._go, self._done = threading.Semaphore(0), threading.Semaphore(0)
        self._stop = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._thread_done = False
        loop = self

        class Pause(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                loop._done.release()
                loop._go.acquire()
                if loop._stop:
                    control.should_training_stop = True
                return control

        trainer.add_callback(Pause())
        self.trainer = trainer

    def _run(self, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)   # OpenMP's thread count is per thread
        try:
            self.trainer.train()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            self._error = exc
        finally:
            self._thread_done = True
            self._done.release()

    def __call__(self) -> None:
        import torch

        if self._thread is None:
            self._thread = threading.Thread(target=self._run, args=(torch.get_num_threads(),),
                                            daemon=True)
            self._thread.start()
        else:
            self._go.release()
        self._done.acquire()
        if self._error is not None:
            raise RuntimeError("TRL's training loop failed") from self._error
        if self._thread_done:
            raise RuntimeError("TRL's training loop ended before the benchmark did")

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._stop = True
            self._go.release()
            self._thread.join(timeout=600)


def trl_step(case: harness.Case, steps: int, out_dir: str, stack: contextlib.ExitStack
             ) -> Callable[[], dict]:
    """One TRL GRPOTrainer step per call; returns its parts."""
    setup: Setup = case.spec[0]
    if setup.model in LAMBDAPO_ONLY:
        pytest.skip(LAMBDAPO_ONLY[setup.model])
    pytest.importorskip("trl", reason="trl is not installed (pip install -e '.[trl]')")
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from lambdapo.rewards import MathVerifyReward, SemanticDensityReward

    path = model_path(setup)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    math_verify, semantic_density = MathVerifyReward(), SemanticDensityReward()
    math_verify.__name__, semantic_density.__name__ = "math_verify", "semantic_density"
    current: dict = {}

    class Timed(GRPOTrainer):
        def _generate(self, prompts):
            start = time.perf_counter()
            out = super()._generate(prompts)
            current["gen"] = current.get("gen", 0.0) + time.perf_counter() - start
            current["tokens"] = current.get("tokens", 0) + sum(len(c) for c in out[1])
            return out

        def _generate_and_score_completions(self, inputs):
            start = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            current["gen_score"] = current.get("gen_score", 0.0) + time.perf_counter() - start
            return out

    total = setup.prompts * setup.group
    config = GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=setup.micro_batch,
        gradient_accumulation_steps=total // setup.micro_batch, num_generations=setup.group,
        max_completion_length=setup.max_new, temperature=1.0, top_p=1.0, beta=setup.kl_coef,
        num_iterations=1, learning_rate=1e-4, adam_beta1=0.9, adam_beta2=0.99,
        weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="constant",
        max_steps=steps + 1, logging_steps=1, report_to="none", save_strategy="no",
        use_cpu=case.device == "cpu", bf16=setup.dtype == "bfloat16", seed=setup.seed,
        # TRL's default is on; both trainers get the case's setting.
        gradient_checkpointing=setup.checkpointing,
        reward_weights=[1.0, 0.1], disable_tqdm=True, log_completions=False,
        dataloader_num_workers=0)
    peft_config = None
    if setup.lora_rank:
        from peft import LoraConfig

        peft_config = LoraConfig(r=setup.lora_rank, lora_alpha=setup.lora_alpha,
                                 lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    trainer = Timed(model=path, reward_funcs=[math_verify, semantic_density], args=config,
                    train_dataset=Dataset.from_list(task_rows(tokenizer)),
                    processing_class=tokenizer, peft_config=peft_config)
    loop = PausedTrainLoop(trainer)
    stack.callback(loop.close)

    def step() -> dict:
        current.clear()
        loop()
        # "train" is filled in from the round's time: step - (generation + scoring).
        return {"gen": current["gen"], "middle": current["gen_score"] - current["gen"],
                "gen_score": current["gen_score"], "tokens": current["tokens"]}
    return step


def summarize_steps(steps: list[dict]) -> dict:
    """Medians of the parts over ``steps`` (each with gen, middle, train, step, cpu,
    tokens) and the generated tokens per second of generation time."""
    out = {f"{part}_s": round(statistics.median(s[part] for s in steps), 4) for part in PARTS}
    out["cpu_s"] = round(statistics.median(s["cpu"] for s in steps), 4)
    out["tokens_per_s"] = round(sum(s["tokens"] for s in steps) /
                                sum(s["gen"] for s in steps), 1)
    out["steps"] = len(steps)
    return out


def test_train_step(case: harness.Case, measure, benchmark, options, tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        make = lambdapo_step if case.impl == "lambdapo" else trl_step
        step = make(case, sum(harness.calls(case, options)), str(tmp_path), stack)
        steps: list[dict] = []

        def timed_step() -> None:
            cpu = time.process_time()
            parts = step()
            steps.append({**parts, "cpu": time.process_time() - cpu})
        result = measure(timed_step)
        memory = peak_rss()   # before the trainer closes (its reward workers still live)
    if result.median_ms is None:
        return
    rounds = benchmark.stats.stats.data
    timed = [{**s, "step": seconds} for s, seconds in zip(steps[-len(rounds):], rounds)]
    for s in timed:
        if "gen_score" in s:
            s["train"] = s["step"] - s.pop("gen_score")
    result.extra.update(summarize_steps(timed), **memory, per_step=timed)


def model_of(size: str) -> str:
    """The model of a size label (``4x4,max64,qwen2.5-0.5b-2layers,...`` -> qwen2.5-0.5b)."""
    return re.sub(r"-\d+layers$", "", size.split(",")[2])


def targets(rows: list[harness.Result], device: str) -> list[harness.Target]:
    """Issue 19, the built-in setting: lambdapo's middle part <= 0.1 s, its step <= 0.5x
    TRL's. Issue 39, Qwen2.5-0.5B's shape: lambdapo's step time and peak resident set at
    most TRL's; Qwen3-4B's shape: lambdapo's peak resident set within 20 GiB."""
    index = harness.by_impl_size(rows)
    out = []
    for size in dict.fromkeys(r.size for r in rows if r.impl == "lambdapo"):
        ours, model = index[("lambdapo", size)], model_of(size)
        trl = index.get(("trl", size))
        if model == "builtin":
            out.append(harness.Target(size, "middle part", ours.extra.get("middle_s"), 0.1,
                                      at_least=False, unit=" s"))
        if model in STEP_RATIO_BOUND:
            out.append(harness.Target(size, "step time / TRL's",
                                      harness.ratio(index, size, "lambdapo", "trl"),
                                      STEP_RATIO_BOUND[model], at_least=False))
        if model in STEP_RATIO_BOUND and model != "builtin":
            a = ours.extra.get("peak_rss_mib")
            b = trl.extra.get("peak_rss_mib") if trl is not None else None
            out.append(harness.Target(size, "peak resident memory / TRL's",
                                      a / b if a and b else None, 1.0, at_least=False))
        if model in PEAK_RSS_BOUND_GIB:
            peak = ours.extra.get("peak_rss_mib")
            out.append(harness.Target(size, "peak resident memory",
                                      peak * MIB / 2**30 if peak else None,
                                      PEAK_RSS_BOUND_GIB[model], at_least=False, unit=" GiB"))
    return out


def verdict(target: harness.Target) -> str:
    """A target's line with "met" / "not met"."""
    return re.sub(r" MISSED$", " not met", target.line())


# ------------------------------------------------------------------------------ driver
def bench_sets(setup: Setup) -> list[str]:
    """The ``--bench-set`` options that make ``setup`` in a pytest process."""
    values = {"model": setup.model, "seed": setup.seed, "lora_rank": setup.lora_rank,
              "lora_alpha": setup.lora_alpha, "checkpointing": int(setup.checkpointing),
              "kl_coef": setup.kl_coef, "layers": setup.layers,
              "dtype": "" if setup.own_dtype else setup.dtype}
    return [f"--bench-set={k}={v}" for k, v in values.items()]


def run_in_fresh_process(args: argparse.Namespace, impl: str, setup: Setup, size: str
                         ) -> dict | None:
    """The row of one run of ``impl``'s case in a fresh pytest process."""
    node = f"{Path(__file__).resolve()}::test_train_step[{args.device}-{size}-{impl}]"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), str(ROOT / "python"), os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "pytest", node, "--benchmark-only",
                   "--benchmark-quiet", "-p", "no:cacheprovider", "-q",
                   f"--bench-device={args.device}", "--bench-size=full",
                   f"--bench-threads={args.threads}", f"--bench-warmup={args.warmup}",
                   f"--benchmark-min-rounds={args.steps}", *bench_sets(setup),
                   f"--bench-results={out}"]
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        path = Path(out) / f"{OP}.jsonl"
        if path.exists():
            return json.loads(path.read_text().splitlines()[-1])
    sys.stderr.write(f"{impl} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n")
    return None


def driver_setups(args: argparse.Namespace) -> list[Setup]:
    """The cases of a driver run: one per mode (``--modes``; none given: the model's own)."""
    modes = [m.strip() for m in args.modes.split(",") if m.strip()] or ["own"]
    out = []
    for mode in modes:
        if mode not in ("own", "full", "lora"):
            raise SystemExit(f"--modes {args.modes}: full, lora or both")
        rank = {"own": -1, "full": 0, "lora": args.lora_rank}[mode]
        out.append(make_setup(args.model_config, "full", args.device, seed=args.seed,
                              lora_rank=rank, lora_alpha=args.lora_alpha,
                              checkpointing=args.checkpointing, kl_coef=args.kl_coef,
                              layers=args.layers, dtype=args.dtype))
    return out


def _gib(mib: float | None) -> str:
    return "-" if mib is None else f"{mib / 1024:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: default)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--model-config", default="builtin", choices=MODELS)
    parser.add_argument("--modes", default="",
                        help="full, lora or full,lora (alternated run by run); default: the "
                             "model's own case (full fine-tuning; qwen3-4b: LoRA)")
    parser.add_argument("--lora-rank", type=int, default=16, help="rank of --modes lora")
    parser.add_argument("--lora-alpha", type=float, default=32.0)
    parser.add_argument("--checkpointing", type=int, default=-1, choices=(-1, 0, 1),
                        help="gradient checkpointing, both trainers (-1: the model's own)")
    parser.add_argument("--kl-coef", type=float, default=-1.0,
                        help="lambdapo's kl_coef, TRL's beta (-1: the model's own)")
    parser.add_argument("--layers", type=int, default=0,
                        help="cut a real shape to N layers (0: its own)")
    parser.add_argument("--dtype", default="", choices=("", "float32", "bfloat16"),
                        help="override a real shape's dtype (default: its own; the label "
                             "says so)")
    parser.add_argument("--runs", type=int, default=3, help="runs per trainer, alternated")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps per run")
    parser.add_argument("--trainers", default="",
                        help="default lambdapo,trl (lambdapo for a lambdapo-only model)")
    parser.add_argument("--seed", type=int, default=0)
    harness.add_save_arguments(parser)
    args = parser.parse_args()
    default_sides = "lambdapo" if args.model_config in LAMBDAPO_ONLY else "lambdapo,trl"
    sides = [s.strip() for s in (args.trainers or default_sides).split(",") if s.strip()]
    setups = driver_setups(args)
    sizes = [size_label(setup, args.threads) for setup in setups]
    for setup in setups:
        model_path(setup)   # written once, in a process of its own, before any run
    steps: dict[tuple[str, str], list[dict]] = {(z, s): [] for z in sizes for s in sides}
    peaks: dict[tuple[str, str], list[dict]] = {(z, s): [] for z in sizes for s in sides}
    last: dict[tuple[str, str], dict] = {}
    load_before = os.getloadavg()
    start = time.perf_counter()
    for run in range(1, args.runs + 1):
        for setup, size in zip(setups, sizes):
            for side in sides:
                key = (size, side)
                if key in last and last[key]["status"] != "ok":
                    continue   # not run (trl missing) or failed: the same next time
                begun = time.perf_counter()
                head = f"[run {run}/{args.runs} {int(begun - start)} s] {OP} {size} {side}"
                print(f"{head}: {args.warmup} + {args.steps} steps...", flush=True)
                row = run_in_fresh_process(args, side, setup, size)
                took = time.perf_counter() - begun
                extra = (row or {}).get("extra", {})
                peak = (f", peak {_gib(extra['peak_rss_mib'])} GiB"
                        if "peak_rss_mib" in extra else "")
                outcome = ("failed" if row is None else
                           f"{row['median_ms'] / 1e3:.3f} s a step{peak}"
                           if row.get("median_ms") else row["status"])
                print(f"{head}: {outcome}, {took:.0f} s", flush=True)
                if row is not None:
                    last[key] = row
                    steps[key] += extra.get("per_step", [])
                    if "peak_rss_mib" in extra:
                        peaks[key].append({k: extra[k] for k in (
                            "peak_rss_mib", "workers_peak_rss_mib", "workers")})
    load_after = os.getloadavg()
    env = harness.environment(args.device)
    rows = []
    for size in sizes:
        for side in sides:
            key = (size, side)
            if not steps[key]:
                status = last[key]["status"] if key in last else "failed"
                rows.append({**env, "op": OP, "impl": side, "size": size, "status": status})
                continue
            summary = summarize_steps(steps[key])
            memory = {}
            if peaks[key]:   # the largest of the runs
                top = max(peaks[key], key=lambda p: p["peak_rss_mib"])
                memory = {**top, "peak_rss_runs_mib": [p["peak_rss_mib"] for p in peaks[key]]}
            rows.append({**env, "device_name": last[key]["device_name"], "op": OP,
                         "impl": side, "size": size,
                         "median_ms": round(summary["step_s"] * 1e3, 1), "status": "ok",
                         "extra": {**summary, **memory, "threads": args.threads,
                                   "runs": args.runs, "warmup": args.warmup,
                                   "load_before": [round(x, 2) for x in load_before],
                                   "load_after": [round(x, 2) for x in load_after]}})
    results = [harness.Result(r["op"], r["impl"], r["size"], args.device,
                              median_ms=r.get("median_ms"), status=r["status"],
                              extra=r.get("extra", {})) for r in rows]
    checks = targets(results, args.device)
    by_key = {(r["impl"], r["size"]): r for r in rows}
    for target in checks:
        row = by_key.get((target.impl, target.size))
        if row is not None and "extra" in row:
            row["extra"].setdefault("targets", []).append(target.as_dict())
    device = next((r["device_name"] for r in rows if r["status"] == "ok"), env["device_name"])
    print(f"{OP} on {device}, commit {env['commit']}; medians over the timed steps after "
          f"{args.warmup} warm-up steps, {args.runs} alternated runs; peak: the largest "
          f"peak resident set of the runs")
    print(f"load average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in load_before)} before, "
          f"{' '.join(f'{x:.2f}' for x in load_after)} after")
    for size in sizes:
        print(f"{harness.short_size(size)}:")
        print(f"  {'trainer':<10}{'step s':>9}{'gen s':>9}{'middle s':>10}{'train s':>9}"
              f"{'cpu s':>9}{'gen tok/s':>11}{'peak GiB':>10}{'step/TRL':>10}{'peak/TRL':>10}")
        base = by_key.get(("trl", size))
        base = base if base and base["status"] == "ok" else None
        for side in sides:
            row = by_key[(side, size)]
            if row["status"] != "ok":
                print(f"  {side:<10} {row['status']}"[:harness.TABLE_WIDTH])
                continue
            e = row["extra"]
            b = base["extra"] if base else {}
            step_ratio = f"{e['step_s'] / b['step_s']:.2f}x" if b else "-"
            mem_ratio = (f"{e['peak_rss_mib'] / b['peak_rss_mib']:.2f}x"
                         if b.get("peak_rss_mib") and e.get("peak_rss_mib") else "-")
            print(f"  {side:<10}{e['step_s']:>9.3f}{e['gen_s']:>9.3f}{e['middle_s']:>10.3f}"
                  f"{e['train_s']:>9.3f}{e['cpu_s']:>9.3f}{e['tokens_per_s']:>11.0f}"
                  f"{_gib(e.get('peak_rss_mib')):>10}{step_ratio:>10}{mem_ratio:>10}")
        workers = [(side, by_key[(side, size)]["extra"]) for side in sides
                   if by_key[(side, size)].get("extra", {}).get("workers")]
        for side, e in workers:
            print(f"  ({side}'s {e['workers']} child processes, reward workers: peak "
                  f"{_gib(e['workers_peak_rss_mib'])} GiB together, not in its peak)")
    for target in checks:
        print(harness.clip(verdict(target), harness.TABLE_WIDTH))
    folders = [] if args.no_save else [args.out]
    if args.record and not any(harness.same_path(f, harness.RESULTS_DIR) for f in folders):
        folders.append(harness.RESULTS_DIR)
    paths = [harness.append_rows(folder, OP, rows) for folder in folders]
    for line in harness.saved_lines(paths) or ["rows not saved (--no-save)"]:
        print(line)


if __name__ == "__main__":
    main()
