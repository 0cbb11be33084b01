"""The memory budget of a chunk of logits, shared by the chunked lm-head ops."""

from __future__ import annotations

import torch


def logits_budget(device: torch.device, *, cpu_bytes: int, cuda_cap_bytes: int,
                  query_free_memory: bool) -> int:
    """Bytes a chunk of logits may take on ``device``: ``cpu_bytes`` on the CPU; on CUDA
    ``cuda_cap_bytes`` or an eighth of free memory, the smaller (the cap alone without
    ``query_free_memory``: no driver call, so no host sync and safe in a CUDA-graph capture)."""
    if device.type != "cuda":
        return cpu_bytes
    if query_free_memory:
        return min(cuda_cap_bytes, torch.cuda.mem_get_info(device)[0] // 8)
    return cuda_cap_bytes
