"""LoRA through peft (``model.lora_rank`` > 0).

The policy keeps its transformers model, with peft's LoRA layers injected in place (the
forward, the decode loop and the log-prob ops run on it as on any model); the
:class:`peft.PeftModel` around it saves and loads the adapter and switches it off for the
frozen reference (``kl_coef`` > 0: the base model is the reference, no second copy). The
vLLM engine and the exported model get the merged weights (:func:`served_parameters`)
under the base model's own parameter names, made afresh from the current adapter each time
(the base weights are never changed, so no rounding accumulates).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def target_modules(value) -> str | list[str]:
    """``model.target_modules`` as peft takes it: ``all-linear`` (every linear layer but the
    output head, verl's default) or the module names, given as a list or comma-separated."""
    items = [value] if isinstance(value, str) else list(value)
    names = [name.strip() for item in items for name in str(item).split(",") if name.strip()]
    if not names:
        raise ValueError("config model.target_modules: empty (all-linear, or module names "
                         "such as q_proj,v_proj)")
    return "all-linear" if names == ["all-linear"] else names


def apply_lora(model: nn.Module, rank: int, alpha: float, modules) -> nn.Module:
    """Injects LoRA layers of ``rank`` and ``alpha`` into ``model`` (in place; dropout 0, so
    the sampled and the trained log-probs stay one distribution) and freezes everything
    else. Returns the :class:`peft.PeftModel` around it.

    Raises:
        ValueError: peft is missing, or ``modules`` names no module of the model.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise ValueError(f"config model.lora_rank > 0 needs peft: pip install peft ({exc})") \
            from None
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                        target_modules=target_modules(modules), task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise ValueError(f"config model.target_modules={modules!r}: {exc}") from None


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules()
            if isinstance(module, LoraLayer)}


@torch.no_grad()
def served_parameters(model: nn.Module, within: tuple[str, ...] | None = None
                      ) -> Iterator[tuple[str, Tensor]]:
    """``model``'s parameters under the names of the model without adapters, each LoRA
    layer's weight merged with its active adapters (a new tensor; the model is unchanged).
    Without LoRA layers: ``named_parameters()`` itself. ``within``: only the parameters
    whose names start with one of these prefixes (so that merged copies are made a few
    layers at a time)."""
    def wanted(name: str) -> bool:
        return within is None or name.startswith(within)

    layers = {name: layer for name, layer in _lora_layers(model).items() if wanted(name)}
    inside = tuple(f"{name}." for name in layers)
    for name, param in model.named_parameters():
        if wanted(name) and not (inside and name.startswith(inside)) and "lora_" not in name:
            yield name, param
    for name, layer in layers.items():
        base = layer.get_base_layer()
        weight = base.weight.detach().clone()
        if not layer.disable_adapters:
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    weight += layer.get_delta_weight(adapter).to(weight.dtype)
        yield f"{name}.weight", weight
        if getattr(base, "bias", None) is not None:
            yield f"{name}.bias", base.bias


def save_merged(model: nn.Module, tokenizer, folder: Path) -> Path:
    """Writes ``model`` with its adapters merged as a plain transformers folder (config,
    tokenizer, safetensors), loadable without peft. Returns the folder."""
    folder = Path(folder)
    model.save_pretrained(folder, state_dict=dict(served_parameters(model)),
                          safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def load_adapter_weights(peft_model: nn.Module, folder: Path) -> None:
    """Loads the adapter saved in ``folder`` (``PeftModel.save_pretrained``) into
    ``peft_model``'s active adapter.

    Raises:
        ValueError: no adapter there, or its tensors do not fit the model's adapter.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.exists():
        raise ValueError(f"checkpoint {folder}: no LoRA adapter ({ADAPTER_WEIGHTS}); it was "
                         f"saved by a run without model.lora_rank")
    result = set_peft_model_state_dict(peft_model, load_file(str(path)))
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise ValueError(f"checkpoint {folder}: its adapter lacks {missing[:3]} (another "
                         f"lora_rank or target_modules?)")


def adapter_disabled(peft_model: nn.Module | None):
    """A context in which ``peft_model``'s adapters are off (the base model computes);
    nothing when it is None."""
    return contextlib.nullcontext() if peft_model is None else peft_model.disable_adapter()
