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
:data:`StaticDecoder.MODEL_TYPES`); :func:`refusal` checks a model's own forward against it
once, so a model that only looks the part falls back to transformers'.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from ..hf_compat import cache_of
from ..padding import positions_of


class StaticDecoder:
    """Decodes after a prefill: ``cache`` is transformers' cache of the prefill, one row per
    sample, over ``prompt_mask`` ([rows, Lp] long, prompts left-padded so that every row's
    next token goes to the same column); ``max_new_tokens`` bounds the steps."""

    MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

    @classmethod
    def structure_refusal(cls, model: nn.Module) -> str | None:
        """Why ``model`` lacks the structure this decoder runs, or None when it has it
        (checked, not trusted: see :func:`refusal`)."""
        config = model.config
        model_type = getattr(config, "model_type", None)
        if model_type not in cls.MODEL_TYPES:
            return f"model_type {model_type!r} is not one of {cls.MODEL_TYPES}"
        decoder = getattr(model, "model", None)
        layers = getattr(decoder, "layers", None)
        if layers is None or not hasattr(decoder, "rotary_emb") or not len(layers):
            return "no decoder layers with a rotary embedding where Llama has them"
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window",
                                                               True):
            return "sliding-window attention (the buffers keep every column)"
        attention = layers[0].self_attn
        module = sys.modules[type(attention).__module__]
        if not (all(hasattr(attention, name) for name in
                    ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim"))
                and hasattr(module, "apply_rotary_pos_emb")):
            return "its attention is not Llama's (q/k/v/o projections, rotary embedding)"
        return None

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
        self.positions = prompt_mask.sum(-1, keepdim=True)   # next position of every row
        self.live = torch.arange(rows, device=prompt_mask.device)  # buffer row of each live row
        self.rotary_table = self._rotary_table(self.decoder.embed_tokens.weight, width)

    def _rotary_table(self, like: Tensor, width: int) -> Tensor | None:
        """cos and sin stacked, [positions, 2, head_dim], of every position a step can reach,
        from the model's own rotary embedding once, for the rotary types whose values depend
        on the position alone (not the dynamic ones, which rescale with the sequence's
        length). Each step then looks its rows' positions up, both in one index."""
        rotary = self.decoder.rotary_emb
        if any(kind in str(getattr(rotary, "rope_type", "default")) for kind in ("dynamic",
                                                                                  "longrope")):
            return None
        positions = torch.arange(width, device=like.device).unsqueeze(0)
        cos, sin = rotary(like.new_empty((1, width, 1)), positions)
        return torch.stack([cos[0], sin[0]], 1)

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
            cos, sin = self.rotary_table[self.positions].unbind(-2)
        else:
            cos, sin = self.decoder.rotary_emb(hidden, self.positions)
        hidden = self._layers(hidden, cos, sin)
        self.column += 1
        self.positions = self.positions + 1
        hidden = hidden if self.live.numel() == rows else hidden[self.live]
        return self.model.lm_head(self.decoder.norm(hidden))[:, -1]

    def _layers(self, hidden: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
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


@torch.no_grad()
def refusal(model: nn.Module, low_precision: bool = False) -> str | None:
    """None when :class:`StaticDecoder`'s log-probs equal the model's own forward on a probe
    (two prompts of different lengths, three decode steps, a row finishing in between): to
    1e-4 each in float32; under bfloat16 autocast (``low_precision``) to 0.05 on average,
    as single values of any two layouts differ by ~0.1 there. Else why not."""
    structure = StaticDecoder.structure_refusal(model)
    if structure is not None:
        return structure
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
                return (f"its log-probs differ from the model's forward by up to "
                        f"{float(gap.max()):.2g} on the probe")
    except Exception as exc:   # noqa: BLE001 - any structural surprise means: not this model
        return f"the probe failed ({type(exc).__name__}: {exc})"
    return None
