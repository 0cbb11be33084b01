"""The example configs (examples/configs/*.yaml: Qwen3-1.7B and Phi-4-mini on GSM8K, one GPU
with LoRA, several with FSDP) compose with a random-init model of the published model's
config.json shape (one layer instead of all, the character tokenizer of the tests) and
train two steps on the CPU. Nothing is downloaded."""

import json
from pathlib import Path

import pytest
import torch

from lambdapo.config import load_config
from lambdapo.trainer import Trainer
from tiny_model import char_tokenizer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"

# The published config.json shapes (huggingface.co/Qwen/Qwen3-1.7B and
# huggingface.co/microsoft/Phi-4-mini-instruct), but for the number of layers.
SHAPES = {
    "qwen3-1.7b": dict(
        model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=2048,
        intermediate_size=6144, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, vocab_size=151936, use_sliding_window=False),
    "phi4-mini": dict(
        model_type="phi3", architectures=["Phi3ForCausalLM"], hidden_size=3072,
        intermediate_size=8192, num_attention_heads=24, num_key_value_heads=8,
        max_position_embeddings=131072, original_max_position_embeddings=4096,
        partial_rotary_factor=0.75, rope_theta=10000.0, rms_norm_eps=1e-5,
        rope_scaling={"type": "longrope", "short_factor": [1.0] * 48,
                      "long_factor": [1.0 + i / 48 for i in range(48)]},
        sliding_window=262144, tie_word_embeddings=True, vocab_size=200064),
}
CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))


def random_model(folder: Path, shape: str) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = char_tokenizer()
    vocab = tokenizer.get_vocab()
    options = dict(SHAPES[shape])
    config = AutoConfig.for_model(options.pop("model_type"), num_hidden_layers=1,
                                  bos_token_id=vocab["<bos>"], eos_token_id=vocab["<eos>"],
                                  pad_token_id=vocab["<pad>"], **options)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def gsm8k_rows(path: Path) -> Path:
    """Four GSM8K rows: the real ones when ../shared/data holds them, else made up in its
    format (question, worked answer ending in '#### <number>')."""
    if GSM8K.exists():
        lines = GSM8K.read_text().splitlines()[:4]
    else:
        lines = [json.dumps({"question": f"Tom has {a} apples and buys {a + 2}. How many?",
                             "answer": f"{a}+{a + 2}={2 * a + 2}\n#### {2 * a + 2}"})
                 for a in range(4)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_every_example_config_is_covered():
    assert {p.stem.split("-gsm8k")[0] for p in CONFIGS} == set(SHAPES)
    assert len(CONFIGS) == 4


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_example_config_trains_two_steps_on_a_model_of_its_shape(tmp_path, path):
    shape = path.stem.split("-gsm8k")[0]
    model = random_model(tmp_path / "model", shape)
    data = gsm8k_rows(tmp_path / "gsm8k.jsonl")
    # What a user changes to run the config here: a local model and data, the CPU, a small
    # batch; every other setting (LoRA, dtype, checkpointing, prompts, rewards) is the file's.
    overrides = [f"model.path={model}", f"data.dataset={data}", f"data.eval_dataset={data}",
                 "device=cpu", "rollout.engine=transformers", "prompts_per_step=2",
                 "rollout.group_size=2", "rollout.max_new_tokens=8", "micro_batch_size=2",
                 "data.num_eval=2", f"output_dir={tmp_path / 'run'}"]
    config = load_config(path, overrides)
    assert config.model.path == str(model)
    with Trainer(config, progress=False) as trainer:
        lora = config.model.lora_rank > 0
        assert (trainer.peft is not None) == lora
        assert trainer.model.is_gradient_checkpointing == \
            config.model.enable_gradient_checkpointing
        if lora:   # the frozen base in bfloat16, the adapter trained in float32
            assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == \
                {torch.float32}
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()
                  if p.requires_grad}
        metrics = [trainer.train_step() for _ in range(2)]
        changed = [n for n, p in trainer.model.named_parameters()
                   if p.requires_grad and not torch.equal(p, before[n])]
    assert all(m["loss"] == m["loss"] and m["grad_norm"] == m["grad_norm"] for m in metrics)
    assert changed
