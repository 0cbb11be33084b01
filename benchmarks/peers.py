"""Peer implementations of fused log-prob / cross-entropy kernels, each adapted to return
per-token log-probs (= -cross-entropy with reduction "none"). They are CUDA/Triton only:
on the CPU, or when a package is missing, the entry is a string saying why it did not run.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

LOGITS_PEERS = ("flash_attn_triton", "liger_kernel")
LINEAR_PEERS = ("cut_cross_entropy", "liger_fused_linear")
# Peers without an entropy output.
NO_ENTROPY = {*LOGITS_PEERS, *LINEAR_PEERS}


def logits_peers(device: str) -> dict:
    """Peers of token_logprobs: name -> fn(logits, targets, entropy) -> (logprobs, None)."""
    if device != "cuda":
        return {name: "CUDA only" for name in LOGITS_PEERS}
    peers = {}
    try:
        cross_entropy_loss = _flash_attn_triton_cross_entropy()

        def flash(x, t, _):
            loss, _ = cross_entropy_loss(x, t, inplace_backward=False)
            return -loss, None
        peers["flash_attn_triton"] = flash
    except ImportError as exc:
        peers["flash_attn_triton"] = f"flash-attn not importable ({exc.name})"
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy

        peers["liger_kernel"] = lambda x, t, _: (-liger_cross_entropy(x, t, reduction="none"), None)
    except ImportError as exc:
        peers["liger_kernel"] = f"liger-kernel not importable ({exc.name})"
    return peers


def _flash_attn_triton_cross_entropy():
    """flash-attn's Triton cross-entropy. A flash-attn installed without its CUDA build
    (FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE, or its source tree on the path) cannot import its
    package __init__, which loads the CUDA attention kernels; the Triton module does not
    need them, so it is then loaded from its file."""
    try:
        from flash_attn.ops.triton.cross_entropy import cross_entropy_loss
        return cross_entropy_loss
    except ImportError:
        spec = importlib.util.find_spec("flash_attn")
        if spec is None or not spec.submodule_search_locations:
            raise
    path = Path(spec.submodule_search_locations[0]) / "ops" / "triton" / "cross_entropy.py"
    module_spec = importlib.util.spec_from_file_location("flash_attn_triton_cross_entropy", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.cross_entropy_loss


def linear_peers(device: str) -> dict:
    """Peers of linear_token_logprobs: name -> fn(hidden, weight, targets, entropy)."""
    if device != "cuda":
        return {name: "CUDA only" for name in LINEAR_PEERS}
    peers = {}
    try:
        from cut_cross_entropy import linear_cross_entropy

        peers["cut_cross_entropy"] = lambda h, w, t, _: (
            -linear_cross_entropy(h, w, t, reduction="none"), None)
    except ImportError as exc:
        peers["cut_cross_entropy"] = f"cut-cross-entropy not importable ({exc.name})"
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        peers["liger_fused_linear"] = lambda h, w, t, _: (
            -liger_fused_linear_cross_entropy(h, w, t, reduction="none"), None)
    except ImportError as exc:
        peers["liger_fused_linear"] = f"liger-kernel not importable ({exc.name})"
    return peers
