"""Loads the compiled op library once, refusing one built for a different torch."""

from __future__ import annotations

import importlib
from typing import Any

import torch

REBUILD_HINT = (
    "rebuild it against the installed torch from the lambdapo source folder with "
    "`pip install --no-build-isolation -e .` (or without -e for a regular install)"
)


def _torch_release(version: str) -> str:
    return version.split("+")[0]


def _load() -> tuple[dict[str, Any] | None, str | None]:
    try:
        build = importlib.import_module("lambdapo_ext._build")
    except ImportError:
        return None, "the lambdapo_ext C++ library is not built"
    record = {
        "torch_version": build.TORCH_VERSION,
        "cuda_version": build.CUDA_VERSION,
        "cuda_arch_list": build.CUDA_ARCH_LIST,
    }
    if _torch_release(build.TORCH_VERSION) != _torch_release(torch.__version__):
        # Loading a library built for another torch can fail on symbols or crash later.
        return record, (f"the lambdapo_ext C++ library was built for torch {build.TORCH_VERSION} "
                        f"but torch {torch.__version__} is installed")
    try:
        importlib.import_module("lambdapo_ext._C")
    except (ImportError, OSError) as exc:
        return record, f"the lambdapo_ext C++ library failed to load ({exc})"
    return record, None


_BUILD_RECORD, _LOAD_ERROR = _load()


def library_error() -> str | None:
    """Why the compiled ops are unavailable, or None when they are loaded."""
    return None if _LOAD_ERROR is None else f"{_LOAD_ERROR}; {REBUILD_HINT}"


def require_library() -> None:
    """Raises RuntimeError naming the problem and the rebuild command if ops are missing."""
    if _LOAD_ERROR is not None:
        raise RuntimeError(f"lambdapo_ext: {library_error()}")


def has_kernel(op: str, backend: str) -> bool:
    """Whether ``lambdapo::op`` has a kernel registered for the dispatch key ``backend``
    ("CPU", "CUDA", "CompositeExplicitAutograd", ...)."""
    if _LOAD_ERROR is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"lambdapo::{op}", backend)


def build_info() -> dict[str, Any]:
    """What the compiled library was built against and whether it is usable.

    Returns:
        dict with ``version``, ``loaded`` (bool), ``error`` (str or None),
        ``torch_version`` (built against), ``running_torch_version``, ``cuda_version``
        (None for a CPU-only build), ``cuda_arch_list`` and ``cuda_kernels`` (whether CUDA
        kernels are registered).
    """
    from lambdapo_ext import __version__

    record = _BUILD_RECORD or {"torch_version": None, "cuda_version": None, "cuda_arch_list": ""}
    return {
        "version": __version__,
        "loaded": _LOAD_ERROR is None,
        "error": library_error(),
        **record,
        "running_torch_version": torch.__version__,
        "cuda_kernels": has_kernel("lambda_advantages", "CUDA"),
    }
