"""Decode steps of Llama-family transformers models over preallocated key-value buffers.

transformers' generic forward rebuilds Python state every decode step: its dynamic cache
grows by concatenation (a copy of the whole cache per step), the attention mask is rebuilt,
and the attention kernel runs on the grown tensors. For the small models of RL on a CPU
that per-step work costs more than the matmuls. :class:`StaticDecoder` keeps one
[rows, kv_heads, max_len, head_dim] buffer per layer and writes each new key and value into
its column; a step runs the model's own modules (norms, projections, rotary embedding, MLP,
head) with attention computed on the filled part of the buffers. Rows that finish stop
being computed once a quarter of the buffer's rows have finished (the buffers are then
compacted; until then a finished row costs a little compute and nothing else).

It serves the architectures whose decoder layers are the Llama pattern (``model_type`` in
:data:`StaticDecoder.MODEL_TYPES`); :meth:`StaticDecoder.matches_model` checks a model's own
forward against it once, so a model that only looks the part falls back to transformers'.

In float32, when every projection is a plain ``nn.Linear`` (not a LoRA or quantized
wrapper) and the norms and activation are the pattern's own (:class:`FusedLayer`), a step
runs on the weights directly, with about a third of the calls: q, k and v in one matmul, as
are gate and up; the rotary embedding of q and k together; the attention scale and padding
mask and the softmax in one pass over the buffers (``lambdapo_ext.decode_attention``); the
residual adds inside the output matmuls (``addmm``); ``lambdapo_ext.rms_norm`` and
``lambdapo_ext.swiglu``. On the small models of RL on a CPU a step's time is mostly the
per-call cost of those many small ops.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lambdapo_ext

from ..policy import (cache_of, has_device_kernel, is_plain_rms_norm, positions_of,
                      rms_norm_function, swiglu_function)


class StaticDecoder:
    """Decodes after a prefill: ``cache`` is transformers' cache of the prefill, one row per
    sample, over ``prompt_mask`` ([rows, Lp] long, prompts left-padded so that every row's
    next token goes to the same column); ``max_new_tokens`` bounds the steps."""

    MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        """Whether ``model`` has the structure this decoder runs (checked, not trusted:
        see :meth:`matches_model`)."""
        config = model.config
        if getattr(config, "model_type", None) not in cls.MODEL_TYPES:
            return False
        decoder = getattr(model, "model", None)
        layers = getattr(decoder, "layers", None)
        if layers is None or not hasattr(decoder, "rotary_emb") or not len(layers):
            return False
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window",
                                                               True):
            return False   # the buffers keep every column; a sliding window would not
        attention = layers[0].self_attn
        module = sys.modules[type(attention).__module__]
        return (all(hasattr(attention, name) for name in
                    ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim"))
                and hasattr(module, "apply_rotary_pos_emb"))

    def __init__(self, model: nn.Module, cache, prompt_mask: Tensor, max_new_tokens: int):
        self.model = model
        self.decoder = model.model
        layers = self.decoder.layers
        attention = layers[0].self_attn
        self.rotate = sys.modules[type(attention).__module__].apply_rotary_pos_emb
        self.head_dim = attention.head_dim
        self.scaling = attention.scaling
        rows, prompt_width = prompt_mask.shape
        self.column = prompt_width          # where the next token's key and value go
        keys = [cache.layers[i].keys for i in range(len(layers))]
        values = [cache.layers[i].values for i in range(len(layers))]
        width = prompt_width + max_new_tokens
        self.keys, self.values = [], []
        for k, v in zip(keys, values):
            # Every column is written (the prompt's here, one per step) before it is read.
            buffer_k = k.new_empty((rows, k.shape[1], width, k.shape[3]))
            buffer_v = v.new_empty((rows, v.shape[1], width, v.shape[3]))
            buffer_k[:, :, :prompt_width] = k
            buffer_v[:, :, :prompt_width] = v
            self.keys.append(buffer_k)
            self.values.append(buffer_v)
        # Additive mask [rows, width] over the buffer's columns: -inf on the prompts' left
        # padding.
        dtype = keys[0].dtype
        self.mask = torch.zeros((rows, width), dtype=dtype, device=prompt_mask.device)
        self.mask[:, :prompt_width].masked_fill_(prompt_mask == 0, float("-inf"))
        self.fused = FusedLayer.of_model(model) if dtype == torch.float32 else None
        self.positions = prompt_mask.sum(-1, keepdim=True)   # next position of every row
        self.live = torch.arange(rows, device=prompt_mask.device)  # buffer row of each live row
        self.rotary_table = self._rotary_table(self.decoder.embed_tokens.weight, width)

    def _rotary_table(self, like: Tensor, width: int) -> Tensor | None:
        """cos, sin and :func:`_signed_sin` stacked, [positions, 3, head_dim], of every
        position a step can reach, from the model's own rotary embedding once, for the rotary
        types whose values depend on the position alone (not the dynamic ones, which rescale
        with the sequence's length). Each step then looks its rows' positions up, all three
        in one index."""
        rotary = self.decoder.rotary_emb
        if any(kind in str(getattr(rotary, "rope_type", "default")) for kind in ("dynamic",
                                                                                  "longrope")):
            return None
        positions = torch.arange(width, device=like.device).unsqueeze(0)
        cos, sin = rotary(like.new_empty((1, width, 1)), positions)
        return torch.stack([cos[0], sin[0], _signed_sin(sin[0])], 1)

    def select(self, keep: Tensor) -> None:
        """Keeps the live rows at positions ``keep`` (of the current live rows)."""
        self.live = self.live[keep]
        if self.live.numel() <= 3 * self.keys[0].shape[0] // 4:
            self.keys = [k[self.live] for k in self.keys]
            self.values = [v[self.live] for v in self.values]
            self.mask = self.mask[self.live]
            self.positions = self.positions[self.live]
            self.live = torch.arange(self.live.numel(), device=self.live.device)

    def step(self, tokens: Tensor) -> Tensor:
        """Logits [live rows, V] of the next token after ``tokens`` ([live rows] long)."""
        rows = self.keys[0].shape[0]
        if self.live.numel() == rows:
            every = tokens
        else:
            every = tokens.new_zeros(rows)
            every[self.live] = tokens
        hidden = self.decoder.embed_tokens(every.unsqueeze(1))
        if self.rotary_table is not None:
            cos, sin, signed = self.rotary_table[self.positions].unbind(-2)
        else:
            cos, sin = self.decoder.rotary_emb(hidden, self.positions)
            signed = _signed_sin(sin)
        if self.fused is not None and not torch.is_autocast_enabled(hidden.device.type):
            hidden = self._fused_layers(hidden.view(rows, -1), cos, signed).unsqueeze(1)
        else:
            hidden = self._module_layers(hidden, cos, sin)
        self.column += 1
        self.positions = self.positions + 1
        hidden = hidden if self.live.numel() == rows else hidden[self.live]
        return self.model.lm_head(self.decoder.norm(hidden))[:, -1]

    def _module_layers(self, hidden: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        rows, column = hidden.shape[0], self.column
        for layer, keys, values in zip(self.decoder.layers, self.keys, self.values):
            attention = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attention.q_proj(x).view(rows, 1, -1, self.head_dim)
            k = attention.k_proj(x).view(rows, 1, -1, self.head_dim)
            if hasattr(attention, "q_norm"):   # Qwen3 normalizes each head's q and k
                q, k = attention.q_norm(q), attention.k_norm(k)
            v = attention.v_proj(x).view(rows, 1, -1, self.head_dim)
            q, k = self.rotate(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            keys[:, :, column] = k[:, :, 0]
            values[:, :, column] = v[:, 0]
            heads, kv_heads = q.shape[1], keys.shape[1]
            # [rows, kv_heads, heads per kv head, head_dim]: grouped-query heads share keys.
            q = q.reshape(rows, kv_heads, heads // kv_heads, self.head_dim)
            scores = torch.matmul(q, keys[:, :, :column + 1].transpose(-1, -2)) * self.scaling
            scores = scores + self.mask[:, None, None, :column + 1]
            out = torch.matmul(torch.softmax(scores.float(), -1).to(q.dtype),
                               values[:, :, :column + 1])
            hidden = hidden + attention.o_proj(out.reshape(rows, 1, heads * self.head_dim))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return hidden

    def _fused_layers(self, hidden: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
        """The layers on [rows, hidden] states through :class:`FusedLayer` weights, at the
        rows' rotary cos and :func:`_signed_sin` [rows, 1, head_dim]."""
        rows, column, head_dim = hidden.shape[0], self.column, self.head_dim
        half = head_dim // 2
        for fused, keys, values in zip(self.fused, self.keys, self.values):
            kv_heads = keys.shape[1]
            heads = fused.heads
            x = fused.norm(hidden, fused.input_norm, fused.input_eps)
            qkv = F.linear(x, fused.qkv_weight, fused.qkv_bias)
            qk = qkv[:, :(heads + kv_heads) * head_dim].view(rows, heads + kv_heads, head_dim)
            if fused.q_norm is not None:   # Qwen3 normalizes each head's q and k
                qk = torch.cat([fused.q_norm(qk[:, :heads]), fused.k_norm(qk[:, heads:])], 1)
            swapped = qk.view(rows, heads + kv_heads, 2, half).flip(2).view(qk.shape)
            qk = torch.addcmul(qk * cos, swapped, signed_sin)
            keys[:, :, column] = qk[:, heads:]
            values[:, :, column] = qkv[:, (heads + kv_heads) * head_dim:].view(
                rows, kv_heads, head_dim)
            # [rows, kv_heads, heads per kv head, head_dim]: grouped-query heads share keys.
            q = qk[:, :heads].view(rows, kv_heads, heads // kv_heads, head_dim)
            out = fused.attend(q, keys, values, column + 1, scale=self.scaling, mask=self.mask)
            hidden = fused.add_output(hidden, out.reshape(rows, heads * head_dim))
            x = fused.norm(hidden, fused.post_norm, fused.post_eps)
            gate_up = F.linear(x, fused.gate_up_weight, fused.gate_up_bias)
            hidden = fused.add_down(hidden, fused.activation(gate_up))
        return hidden


class FusedLayer:
    """One decoder layer's weights for :meth:`StaticDecoder._fused_layers`: q, k, v
    concatenated, gate and up concatenated (copies, made once per generation: the weights
    do not change while it runs), the norms' weights, and the output projections'."""

    def __init__(self, layer: nn.Module):
        attention, mlp = layer.self_attn, layer.mlp
        self.heads = attention.q_proj.out_features // attention.head_dim
        projections = (attention.q_proj, attention.k_proj, attention.v_proj)
        self.qkv_weight = torch.cat([p.weight for p in projections])
        self.qkv_bias = _joint_bias(projections)
        self.q_norm = getattr(attention, "q_norm", None)
        self.k_norm = getattr(attention, "k_norm", None)
        self.gate_up_weight = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        self.gate_up_bias = _joint_bias((mlp.gate_proj, mlp.up_proj))
        self.input_norm = layer.input_layernorm.weight
        self.input_eps = layer.input_layernorm.variance_epsilon
        self.post_norm = layer.post_attention_layernorm.weight
        self.post_eps = layer.post_attention_layernorm.variance_epsilon
        self.norm = rms_norm_function(self.input_norm.device)
        self.activation = swiglu_function(self.input_norm.device)
        self.attend = (lambdapo_ext.decode_attention
                       if has_device_kernel("decode_attention", self.input_norm.device)
                       else _attend)
        self.output, self.down = attention.o_proj, mlp.down_proj

    def add_output(self, hidden: Tensor, attended: Tensor) -> Tensor:
        return _add_linear(hidden, attended, self.output)

    def add_down(self, hidden: Tensor, activated: Tensor) -> Tensor:
        return _add_linear(hidden, activated, self.down)

    @classmethod
    def of_model(cls, model: nn.Module) -> list["FusedLayer"] | None:
        """The fused weights of every layer, or None when a layer is not the plain float32
        pattern (any other projection, norm or activation runs through its modules)."""
        if getattr(model.config, "hidden_act", None) not in ("silu", "swish"):
            return None
        layers = model.model.layers
        if not all(cls._plain(layer) for layer in layers):
            return None
        return [cls(layer) for layer in layers]

    @classmethod
    def _plain(cls, layer: nn.Module) -> bool:
        attention, mlp = layer.self_attn, getattr(layer, "mlp", None)
        linears = [getattr(attention, name, None) for name in ("q_proj", "k_proj", "v_proj",
                                                                "o_proj")]
        linears += [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
        norms = [getattr(layer, "input_layernorm", None),
                 getattr(layer, "post_attention_layernorm", None)]
        norms += [getattr(attention, name) for name in ("q_norm", "k_norm")
                  if hasattr(attention, name)]
        return (all(type(p) is nn.Linear and p.weight.dtype == torch.float32 for p in linears)
                and all(cls._plain_norm(n) for n in norms)
                and attention.q_proj.out_features % attention.head_dim == 0
                and attention.head_dim % 2 == 0)

    @classmethod
    def _plain_norm(cls, norm: nn.Module | None) -> bool:
        return is_plain_rms_norm(norm) and norm.weight.dtype == torch.float32


def _attend(q: Tensor, keys: Tensor, values: Tensor, seen: int, *, scale: float,
            mask: Tensor) -> Tensor:
    """``lambdapo_ext.decode_attention`` in torch calls (where the library has no kernel):
    the scale and mask inside the score matmul (``baddbmm``), softmax, the value matmul."""
    rows, kv_heads, groups, head_dim = q.shape
    width = keys.shape[2]
    scores = torch.baddbmm(
        mask[:, None, None, :seen].expand(rows, kv_heads, 1, seen).reshape(rows * kv_heads, 1,
                                                                            seen),
        q.reshape(rows * kv_heads, groups, head_dim),
        keys.view(rows * kv_heads, width, head_dim)[:, :seen].transpose(1, 2), alpha=scale)
    return torch.bmm(torch.softmax(scores, -1),
                     values.view(rows * kv_heads, width, head_dim)[:, :seen])


def _signed_sin(sin: Tensor) -> Tensor:
    """rotate_half(x) * sin == x with its halves swapped, times sin with its first half
    negated: one flip of q and k together instead of two slices, a negation and a cat."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], -1)


def _joint_bias(projections) -> Tensor | None:
    """The biases of projections whose weights are concatenated (zeros where one has
    none), or None when none has one."""
    biases = [p.bias for p in projections]
    if all(b is None for b in biases):
        return None
    return torch.cat([b if b is not None else p.weight.new_zeros(p.out_features)
                      for b, p in zip(biases, projections)])


def _add_linear(hidden: Tensor, x: Tensor, linear: nn.Linear) -> Tensor:
    """hidden + linear(x), the add inside the matmul when there is no bias."""
    if linear.bias is None:
        return torch.addmm(hidden, x, linear.weight.t())
    return hidden + F.linear(x, linear.weight, linear.bias)


@torch.no_grad()
def matches_model(model: nn.Module, low_precision: bool = False) -> bool:
    """Whether :class:`StaticDecoder`'s log-probs equal the model's own forward on a probe
    (two prompts of different lengths, three decode steps, a row finishing in between): to
    1e-4 each in float32; under bfloat16 autocast (``low_precision``) to 0.05 on average,
    as single values of any two layouts differ by ~0.1 there."""
    if not StaticDecoder.supports(model):
        return False
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    prompts = torch.tensor([[0, 0, 3, 4], [5, 6, 7, 8]], device=device) % vocab
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]], device=device)
    try:
        out = model(input_ids=prompts, attention_mask=mask, position_ids=positions_of(mask),
                    use_cache=True)
        decoder = StaticDecoder(model, cache_of(out), mask, max_new_tokens=3)
        follow = torch.tensor([[9, 10, 11], [12, 13, 14]], device=device) % vocab
        for t in range(3):
            if t == 2:   # the first row has finished
                decoder.select(torch.tensor([1], device=device))
            got = decoder.step(follow[:, t] if t < 2 else follow[1:, t])
            ids = torch.cat([prompts, follow[:, :t + 1]], 1)
            full = torch.cat([mask, torch.ones_like(follow[:, :t + 1])], 1)
            expected = model(input_ids=ids, attention_mask=full,
                             position_ids=positions_of(full)).logits[:, -1]
            expected = expected if t < 2 else expected[1:]
            gap = (torch.log_softmax(got.float(), -1)
                   - torch.log_softmax(expected.float(), -1)).abs()
            if (gap.mean() > 0.05) if low_precision else (gap.max() > 1e-4):
                return False
    except Exception:   # noqa: BLE001 - any structural surprise means: not this model
        return False
    return True
