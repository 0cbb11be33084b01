"""lambdapo_ext imports without a usable compiled library and says how to rebuild."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lambdapo_ext

PACKAGE = Path(lambdapo_ext.__file__).parent

# An editable install maps lambdapo_ext to the source tree through a meta-path finder,
# ahead of the working directory; drop it so the copy under test is imported.
CALL_OP = """
import sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
import torch, lambdapo_ext
assert lambdapo_ext.__file__.startswith(sys.argv[1]), lambdapo_ext.__file__
print("info:", lambdapo_ext.build_info())
try:
    lambdapo_ext.lambda_advantages(torch.zeros(1, 2), torch.zeros(1, 2))
except RuntimeError as exc:
    print("error:", exc)
"""


def run_with_package_copy(tmp_path, *, with_library, build_record=None):
    copy = tmp_path / "lambdapo_ext"
    copy.mkdir()
    for source in PACKAGE.glob("*.py"):
        if source.name != "_build.py":
            shutil.copy(source, copy)
    if with_library:
        for library in PACKAGE.glob("_C*.so"):
            shutil.copy(library, copy)
    if build_record is not None:
        (copy / "_build.py").write_text(build_record)
    result = subprocess.run([sys.executable, "-c", CALL_OP, str(tmp_path)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_missing_library_gives_one_clear_error(tmp_path):
    out = run_with_package_copy(tmp_path, with_library=False)
    assert "'loaded': False" in out
    assert "error: lambdapo_ext: the lambdapo_ext C++ library is not built" in out
    assert "pip install --no-build-isolation" in out


def test_library_for_another_torch_is_not_loaded(tmp_path):
    record = ("TORCH_VERSION = '1.0.0'\nCUDA_VERSION = None\nCUDA_ARCH_LIST = ''\n")
    out = run_with_package_copy(tmp_path, with_library=True, build_record=record)
    assert f"built for torch 1.0.0 but torch {torch.__version__} is installed" in out
    assert "pip install --no-build-isolation" in out


def test_build_info_describes_the_loaded_library():
    info = lambdapo_ext.build_info()
    assert info["loaded"] and info["error"] is None
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["version"] == lambdapo_ext.__version__
    assert info["cuda_kernels"] == (info["cuda_version"] is not None)
