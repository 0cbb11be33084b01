"""Opt-in fused layers for the policy model (``model.kernels``).

``none`` (the default) leaves the model exactly as transformers built it. ``liger`` applies
Liger-Kernel's own patching for the model's family (its RMSNorm, SwiGLU/GeGLU and RoPE
kernels, as Liger chooses them for that family). Liger's cross-entropy replacements are
left off: lambdapo computes log-probs with its own fused ops. lambdapo keeps no fused
layers of its own.
"""

from __future__ import annotations

import inspect
import logging

from torch import nn

KERNELS = ("none", "liger")

log = logging.getLogger(__name__)


def apply_kernels(model: nn.Module, kernels: str) -> None:
    """Applies the fused layers ``kernels`` names to ``model`` (in place).

    Raises:
        ValueError: ``kernels`` is unknown; or ``liger`` and liger-kernel is not installed,
            the model is not on a CUDA device (Liger's kernels are Triton kernels for GPUs),
            or Liger has no patching for the model's family (``config.model_type``).
    """
    if kernels == "none":
        return
    if kernels != "liger":
        raise ValueError(f"model.kernels: {kernels!r} is not one of {KERNELS}")
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ValueError(f"model.kernels=liger: Liger-Kernel's kernels run on CUDA GPUs only; "
                         f"the model is on {device} (use model.kernels=none)")
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as exc:
        raise ValueError(f"model.kernels=liger needs Liger-Kernel: pip install liger-kernel "
                         f"({exc})") from None
    model_type = getattr(model.config, "model_type", None)
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply is None:
        raise ValueError(f"model.kernels=liger: Liger-Kernel has no patching for model_type "
                         f"{model_type!r} (it serves {', '.join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))})")
    accepted = inspect.signature(apply).parameters
    apply(model=model, **{name: False for name in ("cross_entropy", "fused_linear_cross_entropy")
                          if name in accepted})
    log.info("model.kernels=liger: Liger-Kernel's %s patching applied to the %s model",
             apply.__name__, model_type)
