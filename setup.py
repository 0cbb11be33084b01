"""Build of the lambdapo extension (lambdapo_ext._C) against the installed torch.

CPU kernels are always built, with OpenMP against torch's own libgomp when torch's parallel
backend is OpenMP. CUDA kernels are built when nvcc and a CUDA build of torch are present (a
GPU is not needed); LAMBDAPO_FORCE_CPU=1 skips them. TORCH_CUDA_ARCH_LIST is honoured
(default "8.0;9.0"); MAX_JOBS is sized from cores and memory when unset.

Objects are kept in build/temp-<torch>-<cpu|cuda>/ of the source tree, so a reinstall
recompiles only what changed. The C++ runtime is always linked shared: the built library
is checked for a private copy of libstdc++ (lambdapo_ext/_runtime_check.py).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import sys
import threading
import time
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
TORCH_LIB = Path(torch.__file__).parent / "lib"
# Objects live here between builds, so a reinstall recompiles only what changed.
BUILD_TEMP = ROOT / "build" / f"temp-torch{torch.__version__}-{'cuda' if WITH_CUDA else 'cpu'}"

# Linking these (inherited from the environment or Python's sysconfig) would put a private
# copy of libstdc++ in the library; lambdapo_ext/_runtime_check.py says why that breaks.
STATIC_CXX_RUNTIME_FLAGS = ("-static-libstdc++", "-static")


def _runtime_check():
    """lambdapo_ext/_runtime_check.py, loaded without importing the package."""
    spec = importlib.util.spec_from_file_location(
        "lambdapo_runtime_check", ROOT / "lambdapo_ext" / "_runtime_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _openmp_flags() -> tuple[list[str], list[str]]:
    """Compile and link flags that make at::parallel_for run on torch's own OpenMP runtime.

    ATen's parallel_for is a header template whose `#pragma omp parallel` is ignored without
    -fopenmp. Linking torch's bundled libgomp (same soname as the one torch loads) instead
    of the compiler's keeps a single OpenMP runtime in the process."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return [], []
    bundled = sorted(TORCH_LIB.glob("libgomp*.so*"))
    link = [str(bundled[0])] if bundled else ["-fopenmp"]
    return ["-fopenmp"], link


def _progress_stream():
    """The terminal when there is one: pip hides a build backend's own output."""
    if os.environ.get("LAMBDAPO_BUILD_PROGRESS", "1") in ("0", ""):
        return None
    try:
        return open("/dev/tty", "w")
    except OSError:
        return sys.stderr


class _CompileProgress:
    """Prints a line per object file as ninja finishes it (ninja's own progress goes to
    pip's hidden log), and the elapsed time at the end."""

    def __init__(self, sources: list[str], build_temp: Path):
        self.sources, self.build_temp = sources, build_temp
        self.stream = _progress_stream()
        self.start = time.time()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _say(self, text: str) -> None:
        if self.stream is not None:
            print(f"lambdapo build: {text}", file=self.stream, flush=True)

    def _finished_objects(self) -> list[Path]:
        return [o for o in self.build_temp.rglob("*.o") if o.stat().st_mtime >= self.start]

    def _watch(self) -> None:
        seen: set[Path] = set()
        while not self.done.wait(2.0):
            for obj in sorted(set(self._finished_objects()) - seen):
                seen.add(obj)
                self._say(f"[{len(seen)}/{len(self.sources)}] {obj.parent.name}/{obj.stem} "
                          f"({time.time() - self.start:.0f} s)")

    def __enter__(self):
        self._say(f"compiling up to {len(self.sources)} files with MAX_JOBS="
                  f"{os.environ.get('MAX_JOBS')} (objects kept in {self.build_temp}; "
                  f"a cold build takes a few minutes on 2 cores"
                  f"{', plus ~100 s per .cu file' if WITH_CUDA else ''})")
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        rebuilt = len(self._finished_objects())
        self._say(f"done in {time.time() - self.start:.0f} s ({rebuilt} of {len(self.sources)} "
                  f"files compiled, the rest reused)")
        if self.stream not in (None, sys.stderr):
            self.stream.close()


class BuildExtensionWithRecord(BuildExtension.with_options(use_ninja=True)):
    """Keeps objects between builds, links the shared C++ runtime, shows progress, checks the
    result, and writes _build.py beside the built library: what it was built against, read
    by lambdapo_ext before loading it."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = str(BUILD_TEMP)

    def build_extensions(self):
        for attr in ("linker_so", "linker_so_cxx", "compiler_so", "compiler_so_cxx"):
            command = getattr(self.compiler, attr, None)
            if command:
                dropped = [f for f in command if f in STATIC_CXX_RUNTIME_FLAGS]
                if dropped:
                    print(f"lambdapo: dropping {dropped} from the inherited {attr} (the C++ "
                          f"runtime must be the shared one torch uses)", file=sys.stderr)
                    setattr(self.compiler, attr,
                            [f for f in command if f not in STATIC_CXX_RUNTIME_FLAGS])
        super().build_extensions()

    def build_extension(self, ext):
        with _CompileProgress(ext.sources, Path(self.build_temp)):
            super().build_extension(ext)
        library = self.get_ext_fullpath(ext.name)
        try:
            private = _runtime_check().private_cxx_runtime_symbols(library)
        except FileNotFoundError as exc:
            print(f"lambdapo: skipping the C++ runtime check: {exc}", file=sys.stderr)
            private = []
        if private:
            os.remove(library)
            sys.exit("lambdapo: the built library carries a private copy of the C++ runtime "
                     f"({len(private)} libstdc++ symbols, e.g. {private[:3]}); it would break "
                     "error messages or crash. Something on the link line links libstdc++ "
                     "statically (LDFLAGS, LDSHARED, the compiler's specs): remove it.")
        (Path(library).parent / "_build.py").write_text(_build_record())

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
    openmp_compile, openmp_link = _openmp_flags()
    # -fno-trapping-math (as torch builds): without it GCC keeps each lane's division or
    # exp under its select, and only the AVX-512 clones (masked lanes) vectorize the loops.
    cxx = ["-O3", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math"] + openmp_compile
    kwargs = dict(
        name="lambdapo_ext._C",
        include_dirs=[str(ROOT / "csrc")],
        extra_link_args=openmp_link,
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
