"""The built library links the shared C++ runtime, and error messages format numbers.

A library carrying a private copy of libstdc++ formats numbers in TORCH_CHECK messages with
the wrong locale facet: the message is cut at the first number, or the process crashes
(issue 13). These checks run against whatever build is installed, CPU or CUDA.
"""

import shutil
from pathlib import Path

import pytest
import torch

import lambdapo_ext
from lambdapo_ext._runtime_check import private_cxx_runtime_symbols


@pytest.mark.skipif(shutil.which("nm") is None, reason="nm (binutils) is not installed")
def test_library_uses_the_shared_cxx_runtime():
    import lambdapo_ext._C as compiled

    private = private_cxx_runtime_symbols(Path(compiled.__file__))
    assert not private, f"private libstdc++ symbols in the built library: {private[:5]}"


def test_error_messages_keep_their_numbers():
    logits = torch.zeros(2, 3, 7)
    with pytest.raises(RuntimeError) as shape_error:
        lambdapo_ext.token_logprobs(logits, torch.zeros(2, 4, dtype=torch.long))
    assert "[2, 3]" in str(shape_error.value) and "[2, 4]" in str(shape_error.value)
    with pytest.raises(ValueError) as range_error:
        lambdapo_ext.token_logprobs(logits, torch.full((2, 3), 7))
    assert "[0, 7)" in str(range_error.value) and "-100" in str(range_error.value)
    with pytest.raises(ValueError) as temperature_error:
        lambdapo_ext.token_logprobs(logits, torch.zeros(2, 3, dtype=torch.long),
                                    temperature=-0.5)
    assert "-0.5" in str(temperature_error.value)
