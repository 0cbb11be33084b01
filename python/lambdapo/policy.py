"""The policy model: loading (transformers format, safetensors only), and per-token
log-probs of responses through the fused ops of ``lambdapo_ext``.

Every plain Llama-family RMSNorm of a loaded model runs through ``lambdapo_ext.rms_norm``
(:func:`fuse_rms_norms`), and every plain gated MLP through one concatenated gate-and-up
matmul and ``lambdapo_ext.swiglu`` (:func:`fuse_swiglu_mlps`). Log-probs come from
``lambdapo_ext.linear_token_logprobs`` on the decoder's final hidden states and the lm-head
weight (no [N, V] logits tensor is materialised) whenever the model's head is a plain linear
layer; models that transform their logits (soft-capping, scaling) go through their own
forward and ``lambdapo_ext.token_logprobs`` on the logits.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import types
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lambdapo_ext
from lambdapo_ext._loader import has_kernel

from .batch import MicroBatch
from .config import BUILTIN_MODEL, ModelConfig

ASSETS = Path(__file__).resolve().parent / "assets"
# Model families whose RMSNorm is weight * (x * rsqrt(mean(x^2) + eps)) in float32, the
# arithmetic of lambdapo_ext.rms_norm, and whose MLP is down(act(gate(x)) * up(x)).
LLAMA_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
LLAMA_FAMILY_MODULES = tuple(f"transformers.models.{name}.modeling_{name}"
                             for name in LLAMA_FAMILIES)
SILU_ACTIVATIONS = ("silu", "swish")


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
    model = model.to(device)
    fuse_rms_norms(model)
    fuse_swiglu_mlps(model)
    return model, tokenizer


def is_plain_rms_norm(module: nn.Module | None) -> bool:
    """Whether ``module`` is the RMSNorm of a Llama-family model in transformers (any weight
    dtype), the norm :func:`fuse_rms_norms` replaces."""
    return (module is not None and type(module).__module__ in LLAMA_FAMILY_MODULES
            and type(module).__name__.endswith("RMSNorm")
            and isinstance(getattr(module, "variance_epsilon", None), float)
            and isinstance(getattr(module, "weight", None), Tensor)
            and module.weight.dim() == 1)


def has_device_kernel(op: str, device: torch.device) -> bool:
    """Whether ``lambdapo::op`` has a kernel for ``device``'s type (False when the compiled
    library did not load)."""
    return has_kernel(op, device.type.upper())


def _torch_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return F.rms_norm(x, x.shape[-1:], weight, eps)


def _lambdapo_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return lambdapo_ext.rms_norm(x, weight, eps=eps)


def rms_norm_function(device: torch.device) -> Callable[[Tensor, Tensor, float], Tensor]:
    """fn(x, weight, eps) -> RMSNorm of x: ``lambdapo_ext.rms_norm`` where the library has a
    kernel for ``device``, else ``torch.nn.functional.rms_norm``."""
    fused = has_device_kernel("rms_norm_forward", device)
    return _lambdapo_rms_norm if fused else _torch_rms_norm


def _fused_rms_norm_forward(self: nn.Module, hidden: Tensor) -> Tensor:
    if hidden.dtype != self.weight.dtype:   # mixed dtypes: the module's own promotion
        return type(self).forward(self, hidden)
    return lambdapo_ext.rms_norm(hidden, self.weight, eps=self.variance_epsilon)


def fuse_rms_norms(model: nn.Module) -> int:
    """Routes the forward of every plain RMSNorm of ``model`` (:func:`is_plain_rms_norm`)
    through ``lambdapo_ext.rms_norm``: one fused pass per row forward and backward instead
    of six elementwise ops and their saved tensors, equal to transformers' to float32
    rounding. An input whose dtype differs from the weight's keeps the module's own
    forward. Does nothing where the library has no kernel for a norm's device.

    Returns:
        How many norms now run fused.
    """
    norms = [m for m in model.modules() if is_plain_rms_norm(m)
             and has_device_kernel("rms_norm_forward", m.weight.device)]
    for norm in norms:
        norm.forward = types.MethodType(_fused_rms_norm_forward, norm)
    return len(norms)


def is_plain_gated_mlp(module: nn.Module | None) -> bool:
    """Whether ``module`` is the SiLU-gated MLP of a Llama-family model in transformers,
    ``down_proj(silu(gate_proj(x)) * up_proj(x))`` with plain ``nn.Linear`` projections (not
    LoRA or quantized wrappers), the MLP :func:`fuse_swiglu_mlps` replaces."""
    if (module is None or type(module).__module__ not in LLAMA_FAMILY_MODULES
            or not type(module).__name__.endswith("MLP")):
        return False
    gate, up, down = (getattr(module, name, None) for name in ("gate_proj", "up_proj",
                                                                 "down_proj"))
    activation = getattr(module, "act_fn", None)
    return (all(type(p) is nn.Linear for p in (gate, up, down))
            and getattr(getattr(module, "config", None), "hidden_act", None) in SILU_ACTIVATIONS
            and type(activation).__name__ in ("SiLU", "SiLUActivation")
            and gate.weight.shape == up.weight.shape and gate.weight.dtype == up.weight.dtype
            and (gate.bias is None) == (up.bias is None))


def swiglu_function(device: torch.device) -> Callable[[Tensor], Tensor]:
    """fn(gate_up [..., 2I]) -> silu(gate) * up [..., I]: ``lambdapo_ext.swiglu`` where the
    library has a kernel for ``device``, else the same in torch ops."""
    fused = has_device_kernel("swiglu_forward", device)
    return lambdapo_ext.swiglu if fused else _torch_swiglu


def _torch_swiglu(gate_up: Tensor) -> Tensor:
    gate, up = gate_up.chunk(2, -1)
    return F.silu(gate) * up


def _fused_swiglu_mlp_forward(self: nn.Module, x: Tensor) -> Tensor:
    gate, up = self.gate_proj, self.up_proj
    if x.dtype != gate.weight.dtype and not torch.is_autocast_enabled(x.device.type):
        return type(self).forward(self, x)   # mixed dtypes: the module's own promotion
    # The weights change every optimizer step, so they are joined on every call (a copy of
    # 2 I H values, small next to the matmul); autograd splits the gradient back.
    weight = torch.cat([gate.weight, up.weight])
    bias = None if gate.bias is None else torch.cat([gate.bias, up.bias])
    return self.down_proj(lambdapo_ext.swiglu(F.linear(x, weight, bias)))


def fuse_swiglu_mlps(model: nn.Module) -> int:
    """Routes the forward of every plain gated MLP of ``model`` (:func:`is_plain_gated_mlp`)
    through one matmul on the concatenated gate and up weights and ``lambdapo_ext.swiglu``:
    one fused pass forward and backward instead of SiLU, a product and their four backward
    ops, one input-gradient matmul instead of two and their sum, and only the matmul's
    output saved. Equal to transformers' forward to float32 rounding. An input whose dtype
    differs from the weights' (outside autocast) keeps the module's own forward. Does
    nothing where the library has no kernel for an MLP's device.

    Returns:
        How many MLPs now run fused.
    """
    mlps = [m for m in model.modules() if is_plain_gated_mlp(m)
            and has_device_kernel("swiglu_forward", m.gate_proj.weight.device)]
    for mlp in mlps:
        mlp.forward = types.MethodType(_fused_swiglu_mlp_forward, mlp)
    return len(mlps)


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


def cache_argument(module: nn.Module) -> str:
    """The keyword under which ``module.forward`` takes a key-value cache (transformers 5
    renamed ``past_key_values`` to ``cache``)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def cache_of(output):
    """The key-value cache a transformers forward returned (under either name)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def positions_of(mask: Tensor) -> Tensor:
    """Position ids [..., L] of left-padded rows from their attention ``mask``: 0 at each
    row's first real token, counting real tokens only (0 on the padding too)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def masked_rows(x: Tensor, mask: Tensor) -> Tensor:
    """``x[mask]`` for ``x`` [b, T, ...] and a bool ``mask`` [b, T], as an ``index_select``:
    its backward is an ``index_add_``, where boolean indexing's is an accumulating
    ``index_put_`` that took 3-10x longer on the CPU, and longer with two threads than with
    one."""
    return x.flatten(0, 1).index_select(0, mask.flatten().nonzero().squeeze(1))


def select_cache_rows(cache, rows: Tensor) -> None:
    """``cache.batch_select_indices(rows)``, with ``index_select`` where that method is
    transformers' own for the cache and its layer (which index keys and values, a backward
    as slow as :func:`masked_rows` avoids); a cache or layer with its own selection keeps
    it."""
    from transformers.cache_utils import Cache, DynamicLayer

    if type(cache).batch_select_indices is not Cache.batch_select_indices:
        cache.batch_select_indices(rows)
        return
    for layer in cache.layers:
        if (type(layer).batch_select_indices is DynamicLayer.batch_select_indices
                and layer.get_seq_length() > 0):
            layer.keys = layer.keys.index_select(0, rows)
            layer.values = layer.values.index_select(0, rows)
        else:
            layer.batch_select_indices(rows)


def _prediction_states(model, micro: MicroBatch, head: nn.Linear | None,
                       share_prompts: bool) -> Tensor:
    """[b, T, H] decoder states (``head`` given) or [b, T, V] logits from which response
    token t of each row is predicted: the prompt's last position for t = 0, response
    position t - 1 after it. Prompts are left-padded, so every prompt ends in the last
    column and positions count real tokens only."""
    network = model.get_decoder() if head is not None else model
    read = (lambda out: out.last_hidden_state) if head is not None else (lambda out: out.logits)
    positions = positions_of(micro.prompt_mask)
    width = micro.width
    response_in = micro.response_ids[:, :width - 1]
    # Attention over each row's prompt and response, and the response's positions.
    mask = torch.cat([micro.prompt_mask[micro.prompt_of_row],
                      micro.response_mask[:, :width - 1].long()], 1)
    response_positions = (positions[micro.prompt_of_row, -1:] + 1
                          + torch.arange(width - 1, device=response_in.device))
    if not share_prompts:
        ids = torch.cat([micro.prompt_ids[micro.prompt_of_row], response_in], 1)
        out = network(input_ids=ids, attention_mask=mask, position_ids=torch.cat(
            [positions[micro.prompt_of_row], response_positions], 1))
        return read(out)[:, micro.prompt_ids.shape[1] - 1:]
    # Each distinct prompt runs once; its key-value cache, repeated for the rows that
    # continue it (differentiably), serves their responses.
    out = network(input_ids=micro.prompt_ids, attention_mask=micro.prompt_mask,
                  position_ids=positions, use_cache=True)
    last = read(out)[:, -1:].index_select(0, micro.prompt_of_row)
    if width == 1:
        return last
    cache = cache_of(out)
    select_cache_rows(cache, micro.prompt_of_row)
    out = network(input_ids=response_in, attention_mask=mask, position_ids=response_positions,
                  use_cache=True, **{cache_argument(network): cache})
    return torch.cat([last, read(out)], 1)


def response_logprobs(model, micro: MicroBatch, temperature: float, *,
                      autocast: torch.dtype | None = None,
                      share_prompts: bool = True) -> tuple[Tensor, Tensor]:
    """Log-probs and entropies [b, T] (zero off the response) of the micro-batch's response
    tokens under ``softmax(logits / temperature)``; differentiable w.r.t. the model's
    parameters. ``share_prompts``: run each distinct prompt once and continue its key-value
    cache (else every row runs prompt and response as one sequence; the results agree to
    float rounding, see :func:`prompt_sharing_agrees`)."""
    device = micro.response_ids.device
    mask = micro.response_mask
    targets = micro.response_ids[mask]
    with autocast_context(device, autocast):
        head = _plain_linear_head(model)
        states = masked_rows(_prediction_states(model, micro, head, share_prompts), mask)
        if head is not None:
            weight = head.weight
            if autocast is not None:
                states, weight = states.to(autocast), weight.to(autocast)
            bias = head.bias.to(weight.dtype) if head.bias is not None else None
            lp, entropy = lambdapo_ext.linear_token_logprobs(
                states, weight, targets, bias=bias, temperature=temperature,
                return_entropy=True)
        else:
            lp, entropy = lambdapo_ext.token_logprobs(states, targets, temperature=temperature,
                                                      return_entropy=True)
    out_lp = torch.zeros(mask.shape, dtype=torch.float32, device=device)
    out_h = torch.zeros_like(out_lp)
    return out_lp.masked_scatter(mask, lp.float()), out_h.masked_scatter(mask, entropy.float())


@torch.no_grad()
def prompt_sharing_agrees(model, micro: MicroBatch, temperature: float, *,
                          autocast: torch.dtype | None = None) -> bool:
    """Whether the shared-prompt forward gives this model's log-probs: some models' caches
    cannot be repeated per row or their forward reads positions another way, so the trainer
    checks once on a real micro-batch before it relies on sharing."""
    try:
        shared, _ = response_logprobs(model, micro, temperature, autocast=autocast)
    except Exception:   # noqa: BLE001 - a cache without batch_select_indices, ...
        return False
    plain, _ = response_logprobs(model, micro, temperature, autocast=autocast,
                                 share_prompts=False)
    gap = (shared - plain).abs()[micro.response_mask]
    if autocast is None:   # float32: the two agree to rounding, token by token
        return bool(gap.max() <= 1e-3)
    # bfloat16: single tokens differ by up to ~0.15 between any two layouts, so the mean
    # decides (~0.01 on the built-in model; a wrong cache or positions give far more).
    return bool(gap.mean() <= 0.05)
