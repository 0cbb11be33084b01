"""Loading the policy: the model folder (transformers format, safetensors only), the device,
the attention implementation, the compute dtype and the opt-in fused layers."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from pathlib import Path

import torch

from .config import BUILTIN_MODEL, ModelConfig
from .kernels import apply_kernels

ASSETS = Path(__file__).resolve().parent / "assets"

log = logging.getLogger(__name__)


def resolve_model_path(path: str) -> str:
    """``builtin:NAME`` -> the packaged model folder; anything else unchanged.

    Raises:
        FileNotFoundError: no built-in model of that name.
    """
    if path.startswith("builtin:"):
        folder = ASSETS / path.removeprefix("builtin:")
        if not (folder / "config.json").exists():
            known = sorted(p.name for p in ASSETS.iterdir() if p.is_dir()) if ASSETS.exists() else []
            raise FileNotFoundError(f"model.path {path!r}: no such built-in model (have {known})")
        return str(folder)
    return path


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when a GPU is visible, else the CPU; other names as torch reads them.

    Raises:
        ValueError: a CUDA device was named and no GPU is visible.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: no GPU is visible to torch")
    return device


def attention_implementation(config: ModelConfig, model_class: type,
                             device: torch.device) -> str | None:
    """The ``attn_implementation`` to load ``model_class`` with: the configured one, or for
    ``auto`` flash-attention 2 on a GPU where flash-attn is installed and the model supports
    it, else None (transformers' own choice: SDPA where the model has it, else eager)."""
    if config.attn_implementation != "auto":
        return config.attn_implementation
    supports_flash = (getattr(model_class, "_supports_flash_attn", False)
                      or getattr(model_class, "_supports_flash_attn_2", False))
    if (device.type == "cuda" and supports_flash
            and importlib.util.find_spec("flash_attn") is not None):
        return "flash_attention_2"
    return None


def load_policy(config: ModelConfig, device: torch.device):
    """(model on ``device`` in :func:`weights_dtype`, tokenizer). Weights load from safetensors only
    (``use_safetensors=True``: no pickle), remote code only with ``trust_remote_code``;
    ``model.kernels`` is applied (:func:`lambdapo.kernels.apply_kernels`).

    Raises:
        FileNotFoundError: the model folder does not exist.
        ValueError: an attention implementation or kernels setting the model cannot use.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = resolve_model_path(config.path)
    if not Path(path).exists() and not is_hub_name(path):
        raise FileNotFoundError(f"model.path {path!r} does not exist (a local model folder "
                                f"in transformers format, a Hugging Face Hub name such as "
                                f"Qwen/Qwen3-1.7B, or {BUILTIN_MODEL})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path,
                                                  trust_remote_code=config.trust_remote_code)
    except OSError as exc:   # a Hub name that cannot be fetched (offline, private, a typo)
        raise FileNotFoundError(f"model.path {path!r}: {exc}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    adapter = path
    if is_adapter_folder(path):   # a LoRA checkpoint: its base model, the adapter merged in
        path = adapter_base(path)
    else:
        adapter = None
    model_config = AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    model_class = _causal_lm_class(model_config, config.trust_remote_code)
    attention = attention_implementation(config, model_class, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=weights_dtype(config), use_safetensors=True,
            attn_implementation=attention, trust_remote_code=config.trust_remote_code)
    except ValueError as exc:
        if attention is None:
            raise
        raise ValueError(f"model.attn_implementation={attention}: {exc} (model.attn_"
                         f"implementation=auto lets transformers choose)") from None
    if adapter is not None:
        from peft import PeftModel

        # peft loads the adapter frozen; merged, the model is a plain, trainable one.
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload().requires_grad_(True)
    log.info("model %s: %s, attention %s%s", config.path, type(model).__name__,
             model.config._attn_implementation,
             "" if config.attn_implementation != "auto" else " (auto)")
    model = model.to(device)
    apply_kernels(model, config.kernels)
    return model, tokenizer


def is_hub_name(path: str) -> bool:
    """Whether ``path`` reads as a Hugging Face Hub model name (``org/name``) rather than a
    local folder: transformers then fetches it, or takes it from its cache."""
    parts = path.split("/")
    return (len(parts) == 2 and all(parts) and not path.startswith((".", "~"))
            and not Path(parts[0]).exists())


def is_adapter_folder(path: str | Path) -> bool:
    """Whether ``path`` holds a peft adapter (a LoRA run's checkpoint) rather than a model."""
    folder = Path(path)
    return (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file()


def adapter_base(path: str | Path) -> str:
    """The base model folder a saved adapter was trained on (its ``adapter_config.json``).

    Raises:
        FileNotFoundError: that base model folder does not exist any more.
    """
    import json

    base = json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]
    if not Path(base).exists():
        raise FileNotFoundError(f"model.path {path}: a LoRA adapter whose base model {base} "
                                f"does not exist here (use the run's merged/ model instead)")
    return base


def _causal_lm_class(model_config, trust_remote_code: bool) -> type:
    """The class AutoModelForCausalLM builds for ``model_config`` (``object`` when it is
    remote code, whose class is only known after loading)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM._model_mapping[type(model_config)]
    except KeyError:
        return object


def weights_dtype(config: ModelConfig) -> torch.dtype:
    """The dtype the model's weights are loaded in: float32 master weights, except that a
    LoRA run in bfloat16 keeps its frozen base in bfloat16 (half the memory; peft keeps the
    trained adapter in float32)."""
    if config.dtype == "bfloat16" and config.lora_rank > 0:
        return torch.bfloat16
    return torch.float32


def autocast_dtype(config: ModelConfig) -> torch.dtype | None:
    """The autocast dtype of ``model.dtype`` (None: float32, no autocast)."""
    return torch.bfloat16 if config.dtype == "bfloat16" else None


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast to ``dtype`` on ``device``, or nothing when ``dtype`` is None."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
