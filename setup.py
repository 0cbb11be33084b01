"""Build of the lambdapo extension (lambdapo_ext._C) against the installed torch.

CPU kernels are always built. CUDA kernels are built when nvcc and a CUDA build of torch
are present (a GPU is not needed); LAMBDAPO_FORCE_CPU=1 skips them. TORCH_CUDA_ARCH_LIST
is honoured (default "8.0;9.0"); MAX_JOBS is sized from cores and memory when unset.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent

try:
    import torch
except ImportError:
    sys.exit("lambdapo: torch is not importable; install torch first (e.g. `pip install torch`), "
             "then `pip install --no-build-isolation .`")


def _real_cuda_home() -> str | None:
    """The CUDA toolkit folder, seeing through an nvcc on PATH that is a wrapper script."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "/usr/local/cuda" if os.path.exists("/usr/local/cuda/bin/nvcc") else None
    nvcc = os.path.realpath(nvcc)
    with open(nvcc, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"#!"):  # a wrapper: find the nvcc it execs into
        match = re.search(rb"(/\S+)/bin/nvcc\b", head)
        if match and os.path.exists(match.group(1) + b"/bin/nvcc"):
            return match.group(1).decode()
    return os.path.dirname(os.path.dirname(nvcc))


def _want_cuda(cuda_home: str | None) -> bool:
    if os.environ.get("LAMBDAPO_FORCE_CPU", "0") not in ("", "0"):
        return False
    return torch.version.cuda is not None and cuda_home is not None


def _size_max_jobs(with_cuda: bool) -> None:
    if os.environ.get("MAX_JOBS"):
        return
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8.0
    per_job_gib = 4.0 if with_cuda else 2.0  # nvcc on ATen headers peaks near 3-4 GiB
    os.environ["MAX_JOBS"] = str(max(1, min(cores, int(mem_gib // per_job_gib))))


def _missing_cuda_headers_dir(cuda_home: str) -> list[str]:
    """ATen's CUDA headers include cusparse.h/cublas; a bare toolkit may lack them, while
    the nvidia pip wheels that come with a CUDA torch ship them."""
    if os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    candidates = []
    for site in sys.path:
        candidates += glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
        candidates += glob.glob(os.path.join(site, "nvidia", "cusparse", "include"))
        candidates += glob.glob(os.path.join(site, "nvidia", "cublas", "include"))
    return sorted({c for c in candidates if os.path.isdir(c)})


CUDA_HOME = _real_cuda_home()
WITH_CUDA = _want_cuda(CUDA_HOME)
if WITH_CUDA:
    os.environ["CUDA_HOME"] = CUDA_HOME  # before cpp_extension reads it at import
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
_size_max_jobs(WITH_CUDA)

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ARCH_LIST = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if WITH_CUDA else ""


class BuildExtensionWithRecord(BuildExtension.with_options(use_ninja=True)):
    """Writes _build.py beside the built library: what it was built against, read by
    lambdapo_ext before loading it."""

    def build_extension(self, ext):
        super().build_extension(ext)
        (Path(self.get_ext_fullpath(ext.name)).parent / "_build.py").write_text(_build_record())

    def copy_extensions_to_source(self):
        # --inplace and editable installs: the library is copied into the source package.
        super().copy_extensions_to_source()
        (ROOT / "lambdapo_ext" / "_build.py").write_text(_build_record())


def _build_record() -> str:
    return (
        "# Written by setup.py at build time; not under version control.\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"CUDA_VERSION = {(torch.version.cuda if WITH_CUDA else None)!r}\n"
        f"CUDA_ARCH_LIST = {ARCH_LIST!r}\n"
    )


def _extension():
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp-simd", "-fno-math-errno"]
    kwargs = dict(
        name="lambdapo_ext._C",
        include_dirs=[str(ROOT / "csrc")],
        py_limited_api=True,
    )
    if not WITH_CUDA:
        print("lambdapo: building CPU kernels only", file=sys.stderr)
        return CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)
    cu_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    extra_includes = _missing_cuda_headers_dir(CUDA_HOME)
    after = [f"-idirafter{d}" for d in extra_includes]
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo",
            "-DLAMBDAPO_WITH_CUDA"] + [f"-Xcompiler=-idirafter{d}" for d in extra_includes]
    print(f"lambdapo: building CUDA kernels ({len(cu_sources)} .cu files) with {CUDA_HOME}, "
          f"TORCH_CUDA_ARCH_LIST={ARCH_LIST}", file=sys.stderr)
    return CUDAExtension(
        sources=sources + cu_sources,
        extra_compile_args={"cxx": cxx + after + ["-DLAMBDAPO_WITH_CUDA"], "nvcc": nvcc},
        **kwargs,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtensionWithRecord},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
