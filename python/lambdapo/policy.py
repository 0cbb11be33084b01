"""The policy model: loading (transformers format, safetensors only), and per-token
log-probs of responses through the fused ops of ``lambdapo_ext``.

Log-probs come from ``lambdapo_ext.linear_token_logprobs`` on the decoder's final hidden
states and the lm-head weight (no [N, V] logits tensor is materialised) whenever the model's
head is a plain linear layer; models that transform their logits (soft-capping, scaling)
go through their own forward and ``lambdapo_ext.token_logprobs`` on the logits.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import lambdapo_ext

from .config import BUILTIN_MODEL, ModelConfig

ASSETS = Path(__file__).resolve().parent / "assets"


def resolve_model_path(path: str) -> str:
    """``builtin:NAME`` -> the packaged model folder; anything else unchanged."""
    if path.startswith("builtin:"):
        folder = ASSETS / path.removeprefix("builtin:")
        if not (folder / "config.json").exists():
            known = sorted(p.name for p in ASSETS.iterdir() if p.is_dir()) if ASSETS.exists() else []
            raise FileNotFoundError(f"model.path {path!r}: no such built-in model (have {known})")
        return str(folder)
    return path


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: no GPU is visible to torch")
    return device


def attn_implementation(config: ModelConfig, device: torch.device) -> str:
    if config.attn_implementation != "auto":
        return config.attn_implementation
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_policy(config: ModelConfig, device: torch.device):
    """(model in fp32 on ``device``, tokenizer). Weights load from safetensors only
    (``use_safetensors=True``: no pickle), remote code only with trust_remote_code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    path = resolve_model_path(config.path)
    if not Path(path).exists():
        raise FileNotFoundError(f"model.path {path!r} does not exist (a local model folder "
                                f"in transformers format, or {BUILTIN_MODEL})")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, use_safetensors=True,
        attn_implementation=attn_implementation(config, device),
        trust_remote_code=config.trust_remote_code)
    return model.to(device), tokenizer


def autocast_dtype(config: ModelConfig) -> torch.dtype | None:
    return torch.bfloat16 if config.dtype == "bfloat16" else None


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast to ``dtype`` on ``device``, or nothing when ``dtype`` is None."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def _plain_linear_head(model) -> nn.Linear | None:
    head = model.get_output_embeddings()
    cfg = model.config
    transformed = any(getattr(cfg, name, None) not in (None, 1.0, 0)
                      for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    if isinstance(head, nn.Linear) and not transformed and hasattr(model, "get_decoder"):
        return head
    return None


@dataclass
class SequenceBatch:
    """Prompt + response rows, right-padded, with where each response token sits."""
    input_ids: Tensor        # [B, L]
    attention_mask: Tensor   # [B, L]
    response_mask: Tensor    # [B, T] True on response tokens (T = longest response)
    rows: Tensor             # [N] row of each response token (row-major order of the mask)
    cols: Tensor             # [N] input column that predicts it
    targets: Tensor          # [N] the response token ids


def build_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                device: torch.device) -> SequenceBatch:
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    batch, width = len(prompts), max(lengths)
    longest = max((len(r) for r in responses), default=0)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, width), dtype=torch.long)
    response_mask = torch.zeros((batch, max(longest, 1)), dtype=torch.bool)
    rows, cols, targets = [], [], []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[i, :len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attention[i, :len(p) + len(r)] = 1
        response_mask[i, :len(r)] = True
        rows += [i] * len(r)
        cols += range(len(p) - 1, len(p) + len(r) - 1)
        targets += r
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return SequenceBatch(input_ids.to(device), attention.to(device), response_mask.to(device),
                         as_long(rows), as_long(cols), as_long(targets))


def response_logprobs(model, batch: SequenceBatch, temperature: float, *,
                      autocast: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Log-probs and entropies [B, T] (zero off the response) of the response tokens under
    ``softmax(logits / temperature)``; differentiable w.r.t. the model's parameters."""
    device = batch.input_ids.device
    with autocast_context(device, autocast):
        head = _plain_linear_head(model)
        if head is not None:
            hidden = model.get_decoder()(input_ids=batch.input_ids,
                                         attention_mask=batch.attention_mask).last_hidden_state
            selected = hidden[batch.rows, batch.cols]
            weight = head.weight
            if autocast is not None:
                selected, weight = selected.to(autocast), weight.to(autocast)
            bias = head.bias.to(weight.dtype) if head.bias is not None else None
            lp, entropy = lambdapo_ext.linear_token_logprobs(
                selected, weight, batch.targets, bias=bias, temperature=temperature,
                return_entropy=True)
        else:
            logits = model(input_ids=batch.input_ids,
                           attention_mask=batch.attention_mask).logits
            lp, entropy = lambdapo_ext.token_logprobs(
                logits[batch.rows, batch.cols], batch.targets, temperature=temperature,
                return_entropy=True)
    out_lp = torch.zeros(batch.response_mask.shape, dtype=torch.float32, device=device)
    out_h = torch.zeros_like(out_lp)
    out_lp = out_lp.masked_scatter(batch.response_mask, lp.float())
    out_h = out_h.masked_scatter(batch.response_mask, entropy.float())
    return out_lp, out_h
