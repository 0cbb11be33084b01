"""The transformers engine's two decode paths: the project's loop over preallocated key-value
buffers against transformers' own generate (the same greedy tokens and log-probs on Llama
with grouped-query heads, Qwen2 with biased projections and Qwen3 with normalized q and k),
its probe, its row compaction, and the fallback for models it does not serve."""

import logging

import pytest
import torch

from lambdapo.rollout import static_decode
from lambdapo.rollout.base import RolloutEngineError, SamplingParams
from lambdapo.rollout.transformers_engine import TransformersEngine


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU")])]


def _model(kind: str, device: str = "cpu"):
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                              Qwen3Config, Qwen3ForCausalLM)

    common = dict(vocab_size=40, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**common, use_sliding_window=False))
    return model.to(device).eval()


def _generate(model, static: bool, **params):
    engine = TransformersEngine(model, eos_token_id=2, pad_token_id=0, seed=3,
                                static_decode="on" if static else "off")
    prompts = [[1, 5, 6], [1, 7, 8, 9, 10, 11], [1, 12]]
    return engine.generate(prompts, SamplingParams(**{"n": 4, "max_new_tokens": 24, **params}))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_static_decode_gives_transformers_greedy_tokens_and_logprobs(kind, device):
    model = _model(kind, device)
    assert static_decode.refusal(model) is None
    fast = _generate(model, True, temperature=0.0)
    slow = _generate(model, False, temperature=0.0)
    assert fast.completion_ids == slow.completion_ids
    assert fast.finished == slow.finished
    assert any(fast.finished) and not all(fast.finished)   # rows left the batch on the way
    for a, b in zip(fast.logprobs, slow.logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-5)


def test_probe_accepts_biased_projections():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=40, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, mlp_bias=True,
        attention_bias=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    for p in model.parameters():   # biases initialise to zero: make them count
        torch.nn.init.normal_(p, std=0.1) if p.dim() == 1 else None
    assert static_decode.refusal(model) is None


def test_rotary_table_only_for_rotary_types_that_do_not_rescale():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = _model("llama")
    prompt, mask = torch.tensor([[1, 5, 6]]), torch.ones(1, 3, dtype=torch.long)
    out = model(input_ids=prompt, attention_mask=mask, use_cache=True)
    assert static_decode.StaticDecoder(model, out.past_key_values, mask, 2).rotary_table is not None
    torch.manual_seed(0)
    dynamic = LlamaForCausalLM(LlamaConfig(
        vocab_size=40, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
        bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    out = dynamic(input_ids=prompt, attention_mask=mask, use_cache=True)
    assert static_decode.StaticDecoder(dynamic, out.past_key_values, mask, 2).rotary_table is None
    assert static_decode.refusal(dynamic) is None


@pytest.mark.parametrize("static", [True, False])
def test_generation_with_non_finite_logits_raises(static):
    model = _model("llama")
    with torch.no_grad():
        model.lm_head.weight[3] = float("nan")
    with pytest.raises(RuntimeError, match="not finite"):
        _generate(model, static)


def test_static_decode_compacts_its_buffers_when_a_quarter_has_finished():
    model = _model("llama")
    prompt = torch.tensor([[0, 1, 5]] + [[1, 6, 7]] * 7)
    mask = (torch.arange(3) > 0).long().expand(8, 3).clone()
    mask[1:, 0] = 1
    out = model(input_ids=prompt, attention_mask=mask, use_cache=True,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    decoder = static_decode.StaticDecoder(model, out.past_key_values, mask, max_new_tokens=4)
    decoder.step(torch.arange(5, 13))
    decoder.select(torch.tensor([0, 1, 2, 3, 4, 5, 7]))     # 7 of 8 live: buffers stay
    assert decoder.keys[0].shape[0] == 8 and decoder.live.tolist() == [0, 1, 2, 3, 4, 5, 7]
    assert decoder.step(torch.arange(5, 12)).shape[0] == 7
    decoder.select(torch.tensor([0, 2, 3, 5, 6]))           # 5 of 8 live: compacted
    assert decoder.keys[0].shape[0] == 5 and decoder.live.tolist() == [0, 1, 2, 3, 4]
    assert decoder.step(torch.arange(5, 10)).shape[0] == 5


def test_models_it_does_not_serve_fall_back_to_transformers(monkeypatch, caplog):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=32, n_layer=1, n_head=2,
                                      n_positions=64, eos_token_id=2, bos_token_id=1)).eval()
    assert "model_type 'gpt2'" in static_decode.StaticDecoder.structure_refusal(gpt2)
    engine = TransformersEngine(gpt2, eos_token_id=2, pad_token_id=0, seed=3)
    with caplog.at_level(logging.INFO, logger="lambdapo"):
        rollout = engine.generate([[1, 5, 6]], SamplingParams(n=2, max_new_tokens=4))
    assert engine.static_decode is False and len(rollout.completion_ids) == 2
    assert "transformers' generate" in caplog.text and "model_type 'gpt2'" in caplog.text
    with pytest.raises(RolloutEngineError, match="static_decode=on"):
        TransformersEngine(gpt2, eos_token_id=2, pad_token_id=0, static_decode="on").generate(
            [[1, 5, 6]], SamplingParams(n=2, max_new_tokens=4))
    # A Llama whose layers compute more than the pattern the decoder runs is refused.
    llama = _model("llama")
    layer_type = type(llama.model.layers[0])
    forward = layer_type.forward
    monkeypatch.setattr(layer_type, "forward", lambda self, *a, **k: 0.5 * forward(self, *a, **k))
    assert static_decode.StaticDecoder.structure_refusal(llama) is None
    assert "differ from the model's forward" in static_decode.refusal(llama)


def test_static_decode_under_bfloat16_autocast_passes_its_check_and_is_used():
    model = _model("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert static_decode.refusal(model, low_precision=True) is None
    engine = TransformersEngine(model, eos_token_id=2, pad_token_id=0, seed=3,
                                autocast_dtype=torch.bfloat16)
    rollout = engine.generate([[1, 5, 6], [1, 7]], SamplingParams(n=3, max_new_tokens=12))
    assert engine.static_decode is True and len(rollout.completion_ids) == 6
