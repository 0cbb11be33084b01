import pytest
import torch

import lambdapo_ext
from lambdapo_ext._loader import has_kernel


def pytest_report_header(config):
    info = lambdapo_ext.build_info()
    return (f"lambdapo_ext {info['version']}: loaded={info['loaded']} built for torch "
            f"{info['torch_version']}, CUDA {info['cuda_version']}, cuda_kernels="
            f"{info['cuda_kernels']}")


@pytest.fixture(scope="session", autouse=True)
def _library_loaded():
    # A test run without the compiled ops would silently test nothing.
    assert lambdapo_ext.library_error() is None, lambdapo_ext.library_error()


def cuda_available_for(op: str) -> bool:
    return torch.cuda.is_available() and has_kernel(op, "CUDA")


def skip_without_cuda(op: str):
    return pytest.mark.skipif(
        not cuda_available_for(op),
        reason=f"needs a GPU and the CUDA kernel of lambdapo::{op}")


def devices(op: str) -> list:
    """["cpu", "cuda"] as pytest params; the CUDA one skips without a GPU or kernel."""
    return ["cpu", pytest.param("cuda", marks=skip_without_cuda(op))]


def to_device(value, device: str):
    """Moves the tensors of a (nested) tuple/list to ``device``; other values pass through."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    return value
