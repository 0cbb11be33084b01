"""The preallocated-buffer decode steps of the transformers engine against transformers' own
forward and cache: the same samples and log-probs on Llama (with grouped-query heads),
Qwen2 (biased projections) and Qwen3 (normalized q and k), and the fallback for models it
does not serve; and the models' RMSNorms and gated MLPs routed through lambdapo_ext.rms_norm
and lambdapo_ext.swiglu."""

import copy

import pytest
import torch

import lambdapo_ext
from lambdapo import policy
from lambdapo.rollout import SamplingParams, TransformersEngine, static_decode


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
    engine = TransformersEngine(model, eos_token_id=2, pad_token_id=0, seed=3)
    engine.static_decode = static
    prompts = [[1, 5, 6], [1, 7, 8, 9, 10, 11], [1, 12]]
    return engine.generate(prompts, SamplingParams(**{"n": 4, "max_new_tokens": 24, **params}))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_static_decode_samples_what_transformers_samples(kind, temperature, device):
    model = _model(kind, device)
    assert static_decode.matches_model(model)
    fast = _generate(model, True, temperature=temperature)
    slow = _generate(model, False, temperature=temperature)
    assert fast.completion_ids == slow.completion_ids
    assert fast.finished == slow.finished
    assert any(fast.finished) and not all(fast.finished)   # rows left the batch on the way
    for a, b in zip(fast.logprobs, slow.logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("attention", ["decode_attention", "torch"])
def test_fused_steps_give_the_module_steps_logits(kind, device, attention, monkeypatch):
    if attention == "torch":   # as with a library that has no decode_attention kernel
        monkeypatch.setattr(static_decode, "has_device_kernel", lambda op, device: False)
    model = _model(kind, device)
    prompt = torch.tensor([[0, 1, 5, 9], [1, 6, 7, 8], [0, 0, 3, 4]], device=device)
    mask = (prompt > 0).long()
    logits = []
    for fused in (True, False):
        out = model(input_ids=prompt, attention_mask=mask, use_cache=True,
                    position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        decoder = static_decode.StaticDecoder(model, out.past_key_values, mask, max_new_tokens=3)
        assert decoder.fused is not None
        want = lambdapo_ext.decode_attention if attention != "torch" else static_decode._attend
        assert decoder.fused[0].attend is want
        if not fused:
            decoder.fused = None
        ids = lambda *t: torch.tensor(t, device=device)  # noqa: E731
        steps = [decoder.step(ids(10, 11, 12))]
        decoder.select(ids(0, 2))
        steps += [decoder.step(ids(13, 14)), decoder.step(ids(15, 16))]
        logits.append(steps)
    for a, b in zip(*logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fused_steps_serve_plain_float32_layers_only():
    class LoraLinear(torch.nn.Linear):   # a wrapper whose forward adds to the weight's
        def forward(self, x):
            return super().forward(x) + 1.0

    model = _model("llama")
    assert static_decode.FusedLayer.of_model(model) is not None
    attention = model.model.layers[1].self_attn
    wrapped = LoraLinear(attention.v_proj.in_features, attention.v_proj.out_features, bias=False)
    wrapped.weight = attention.v_proj.weight
    attention.v_proj = wrapped
    assert static_decode.FusedLayer.of_model(model) is None
    assert static_decode.FusedLayer.of_model(_model("llama").to(torch.bfloat16)) is None
    model = _model("llama")
    model.config.hidden_act = "gelu"
    assert static_decode.FusedLayer.of_model(model) is None


def test_fused_steps_add_the_mlp_biases():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=40, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, mlp_bias=True,
        attention_bias=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    for p in model.parameters():   # biases initialise to zero: make them count
        torch.nn.init.normal_(p, std=0.1) if p.dim() == 1 else None
    assert static_decode.FusedLayer.of_model(model) is not None
    assert static_decode.matches_model(model)


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
    assert static_decode.matches_model(dynamic)


def test_generation_with_non_finite_logits_raises():
    model = _model("llama")
    with torch.no_grad():
        model.lm_head.weight[3] = float("nan")
    with pytest.raises(RuntimeError, match="not finite"):
        _generate(model, True)


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


def test_models_it_does_not_serve_fall_back_to_transformers(monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=32, n_layer=1, n_head=2,
                                      n_positions=64, eos_token_id=2, bos_token_id=1)).eval()
    assert not static_decode.StaticDecoder.supports(gpt2)
    assert not static_decode.matches_model(gpt2)
    engine = TransformersEngine(gpt2, eos_token_id=2, pad_token_id=0, seed=3)
    engine.generate([[1, 5, 6]], SamplingParams(n=2, max_new_tokens=4))
    assert engine.static_decode is False
    # A Llama whose layers compute more than the pattern the decoder runs is refused.
    llama = _model("llama")
    layer_type = type(llama.model.layers[0])
    forward = layer_type.forward
    monkeypatch.setattr(layer_type, "forward", lambda self, *a, **k: 0.5 * forward(self, *a, **k))
    assert static_decode.StaticDecoder.supports(llama)
    assert not static_decode.matches_model(llama)


def test_static_decode_under_bfloat16_autocast_passes_its_check_and_is_used():
    model = _model("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert static_decode.matches_model(model, low_precision=True)
    engine = TransformersEngine(model, eos_token_id=2, pad_token_id=0, seed=3,
                                autocast_dtype=torch.bfloat16)
    rollout = engine.generate([[1, 5, 6], [1, 7]], SamplingParams(n=3, max_new_tokens=12))
    assert engine.static_decode is True and len(rollout.completion_ids) == 6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_fused_rms_norms_keep_the_models_logits_and_gradients(kind, device):
    plain = _model(kind, device).train()
    fused = copy.deepcopy(plain)
    # Two per layer and the final norm; Qwen3 adds q_norm and k_norm per layer.
    assert policy.fuse_rms_norms(fused) == (9 if kind == "qwen3" else 5)
    assert fused.model.norm.forward.__func__ is policy._fused_rms_norm_forward
    _assert_same_logits_and_gradients(plain, fused, device)


def _assert_same_logits_and_gradients(plain, fused, device):
    ids = torch.tensor([[1, 5, 6, 7, 9], [1, 12, 13, 3, 4]], device=device)
    grad = torch.randn(2, 5, 40, device=device)
    logits = []
    for model in (plain, fused):
        out = model(input_ids=ids).logits
        (out * grad).sum().backward()
        logits.append(out.detach())
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_fused_rms_norm_keeps_the_modules_promotion_for_mixed_dtypes():
    model = _model("llama")
    policy.fuse_rms_norms(model)
    norm = model.model.norm
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, type(norm).forward(norm, x), rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = model(input_ids=torch.tensor([[1, 5, 6, 7]])).logits
        plain = _model("llama")(input_ids=torch.tensor([[1, 5, 6, 7]])).logits
    torch.testing.assert_close(fused, plain)


def test_fuse_rms_norms_leaves_other_norms_alone():
    class OwnRMSNorm(torch.nn.Module):   # not a transformers Llama-family module
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(8))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return x

    model = torch.nn.Sequential(OwnRMSNorm(), torch.nn.LayerNorm(8))
    assert policy.fuse_rms_norms(model) == 0
    assert "forward" not in vars(model[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_fused_swiglu_mlps_keep_the_models_logits_and_gradients(kind, device):
    plain = _model(kind, device).train()
    fused = copy.deepcopy(plain)
    assert policy.fuse_swiglu_mlps(fused) == 2   # one per layer
    mlp = fused.model.layers[0].mlp
    assert mlp.forward.__func__ is policy._fused_swiglu_mlp_forward
    _assert_same_logits_and_gradients(plain, fused, device)


def test_fused_swiglu_mlp_with_biases_and_under_autocast(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, head_dim=16, mlp_bias=True)
    plain = LlamaForCausalLM(config).eval()
    fused = copy.deepcopy(plain)
    assert policy.fuse_swiglu_mlps(fused) == 1
    ids = torch.tensor([[1, 5, 6, 7]])
    torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits,
                               rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = fused(input_ids=ids).logits
        want = plain(input_ids=ids).logits
    assert low.dtype == want.dtype
    torch.testing.assert_close(low.float(), want.float(), rtol=0.05, atol=0.05)
    # Mixed dtypes outside autocast keep the module's own forward (here, its error).
    def not_this_path(gate_up):
        raise AssertionError("the fused path ran on mixed dtypes")

    monkeypatch.setattr(lambdapo_ext, "swiglu", not_this_path)
    with pytest.raises(RuntimeError, match="dtype"):
        fused.model.layers[0].mlp(torch.randn(3, 32, dtype=torch.float64))


def test_fuse_swiglu_mlps_leaves_other_mlps_alone():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, head_dim=16, hidden_act="gelu")
    assert policy.fuse_swiglu_mlps(LlamaForCausalLM(config)) == 0   # not a SiLU gate

    class Wrapped(torch.nn.Linear):   # a stand-in for a LoRA or quantized projection
        pass

    model = _model("llama")
    mlp = model.model.layers[1].mlp
    mlp.up_proj = Wrapped(64, 96, bias=False)
    assert policy.fuse_swiglu_mlps(model) == 1
    assert "forward" not in vars(mlp)
    assert not policy.is_plain_gated_mlp(torch.nn.Sequential())
