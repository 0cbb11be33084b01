"""The built library links the shared C++ runtime, error messages format numbers, and the
CPU loops are vectorized for every ISA they are cloned for.

A library carrying a private copy of libstdc++ formats numbers in TORCH_CHECK messages with
the wrong locale facet: the message is cut at the first number, or the process crashes
(issue 13). A loop whose lanes GCC may not evaluate unconditionally (trapping math) stays
scalar in the AVX2 clone while the AVX-512 one is vectorized: 6x slower on an AVX2 machine.
These checks run against whatever build is installed, CPU or CUDA.
"""

import platform
import re
import shutil
import subprocess
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


@pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("objdump") is None
                    or shutil.which("c++filt") is None,
                    reason="x86-64 clones, read with objdump and c++filt (binutils)")
def test_avx2_clones_of_float_loops_are_vectorized():
    import lambdapo_ext._C as compiled

    listing = subprocess.run(["objdump", "-d", "-j", ".text", "--no-show-raw-insn",
                              compiled.__file__], capture_output=True, text=True,
                             check=True).stdout
    ymm_by_clone: dict[str, int] = {}
    clone = None
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if header:
            clone = header.group(1) if header.group(1).endswith(".arch_x86_64_v3") else None
            if clone:
                ymm_by_clone[clone] = 0
        elif clone and "%ymm" in line:
            ymm_by_clone[clone] += 1
    names = subprocess.run(["c++filt"], input="\n".join(ymm_by_clone), capture_output=True,
                           text=True, check=True).stdout.splitlines()
    # Loops on float storage (fp32, fp16, bf16); fp64 ones may call std::exp, which does not
    # vectorize.
    float_loops = {name: ymm for name, ymm in zip(names, ymm_by_clone.values())
                   if re.search(r"\((float|c10::Half|c10::BFloat16) const\*", name)}
    assert float_loops, "no AVX2 clones of float loops found in the library"
    # The loops of the softmax blocks (both log-prob ops) and of lambda_advantages: a kernel
    # whose loops lost their clones would otherwise go unchecked.
    for loop in ("load_scaled", "block_exp_sums", "block_grad", "accumulate_pairs",
                 "accumulate_lane_major"):
        assert any(f"::{loop}(" in name for name in float_loops), f"no AVX2 clone of {loop}"
    scalar = [name for name, ymm in float_loops.items() if ymm == 0]
    assert not scalar, f"AVX2 clones without a vector instruction: {scalar}"
