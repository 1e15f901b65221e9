"""Build and install `kernels` (ops) and `speedrun` (trainers).

    pip install --no-build-isolation -e .

compiles csrc/ into the extension `kernels._C` for Hopper (sm_90a) when a CUDA toolkit
and a CUDA build of torch are present; otherwise it installs the pure Python/Triton
package and prints one line saying why.  Environment switches:

    KERNELS_SKIP_EXTENSION=1   never build the extension (Triton and reference only)
    CUDA_HOME=/path/to/cuda    the toolkit root (the folder whose bin/ holds nvcc);
                               found automatically otherwise, see find_cuda_home()
    MAX_JOBS=N                 parallel compile jobs (default: all cores)

--no-build-isolation matters: the extension must be compiled against the torch that
is installed, not a fresh copy in an isolated build environment.

Supported range (SUPPORTED, tested in CI at both ends): torch 2.11-2.15, triton 3.6-3.8,
Python 3.11-3.12.  pip's requirements say so; a torch or triton already installed outside
it gets a warning line here, since --no-build-isolation builds against whatever is there.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
SKIP_ENV = "KERNELS_SKIP_EXTENSION"
# Headers that torch's CUDA headers include but a minimal toolkit may lack; the pip
# wheels nvidia-* (installed with torch) carry them.
LIBRARY_HEADERS = ("cusparse.h", "cublas_v2.h", "cublasLt.h", "cusolverDn.h", "curand.h")
# (oldest, newest) major.minor of each supported component, both ends included: the oldest
# is the GPU machines' stack (torch 2.11, triton 3.6, Python 3.12), the newest the pinned one.
SUPPORTED = {"torch": ((2, 11), (2, 15)), "triton": ((3, 6), (3, 8)), "python": ((3, 11), (3, 12))}


def say(message: str) -> None:
    print(f"speedrun setup: {message}", file=sys.stderr)


def _major_minor(version: str) -> tuple[int, int]:
    """(2, 11) for "2.11.0+cu130", "2.11.0a0" or "2.11"."""
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def unsupported(versions: dict[str, str]) -> list[str]:
    """One line per component of `versions` ({"torch": "2.10.0", ...}) outside SUPPORTED."""
    problems = []
    for name, version in versions.items():
        (lo, hi), have = SUPPORTED[name], _major_minor(version)
        if not lo <= have <= hi:
            problems.append(f"{name} {version} is outside the supported range "
                            f"{lo[0]}.{lo[1]}-{hi[0]}.{hi[1]}")
    return problems


def requirement(name: str) -> str:
    """The pip requirement for a supported component, e.g. "torch>=2.11,<2.16"."""
    (lo, hi) = SUPPORTED[name]
    return f"{name}>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1] + 1}"


def installed_versions() -> dict[str, str]:
    """The Python running this and the torch/triton importable here (those not importable left out)."""
    versions = {"python": ".".join(map(str, sys.version_info[:2]))}
    for name in ("torch", "triton"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return versions


def warn_if_unsupported() -> None:
    for problem in unsupported(installed_versions()):
        say(f"warning: {problem}; the package is tested only inside it (see README.md, Set up)")


def _is_elf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _root_of_nvcc(nvcc: str) -> str | None:
    """The toolkit root of an nvcc binary; follows symlinks and simple wrapper scripts.

    Some machines put a shell script named nvcc on PATH that execs the real binary;
    torch's own detection would then take the script's folder as CUDA_HOME and miss
    the headers.  We read such a script for an absolute path to a real nvcc.
    """
    nvcc = os.path.realpath(nvcc)
    if _is_elf(nvcc):
        return os.path.dirname(os.path.dirname(nvcc))
    try:
        with open(nvcc, encoding="utf-8", errors="replace") as f:
            text = f.read(65536)
    except OSError:
        return None
    for token in text.replace('"', " ").replace("'", " ").split():
        if token.startswith("/") and token.endswith("/bin/nvcc") and _is_elf(token):
            return os.path.dirname(os.path.dirname(os.path.realpath(token)))
    return None


def find_cuda_home() -> str | None:
    """CUDA_HOME/CUDA_PATH if valid, else the root behind `nvcc` on PATH, else /usr/local/cuda*."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and _is_elf(os.path.join(root, "bin", "nvcc")):
            return root
    on_path = shutil.which("nvcc")
    if on_path:
        root = _root_of_nvcc(on_path)
        if root:
            return root
    for root in ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]:
        if _is_elf(os.path.join(root, "bin", "nvcc")):
            return root
    return None


def pip_cuda_include_dirs(cuda_home: str) -> list[str]:
    """Include folders of the pip nvidia-* wheels that hold headers the toolkit lacks."""
    missing = [h for h in LIBRARY_HEADERS
               if not os.path.exists(os.path.join(cuda_home, "include", h))]
    if not missing:
        return []
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        say(f"the toolkit lacks {', '.join(missing)} and no nvidia-* wheels are installed")
        return []
    found = []
    for base in nvidia.__path__:
        for include in sorted(glob.glob(os.path.join(base, "*", "include"))):
            if any(os.path.exists(os.path.join(include, h)) for h in missing):
                found.append(include)
    return found


def extension_modules():
    """([CUDAExtension], cmdclass) or ([], {}) with one line saying why not."""
    if os.environ.get(SKIP_ENV, "0") == "1":
        say(f"{SKIP_ENV}=1: installing without the CUDA extension kernels._C")
        return [], {}
    cuda_home = find_cuda_home()
    if cuda_home is None:
        say("no CUDA toolkit found (no nvcc binary via CUDA_HOME, PATH or /usr/local/cuda*); "
            "installing without the CUDA extension kernels._C (Triton and reference only)")
        return [], {}
    # torch.utils.cpp_extension reads CUDA_HOME when imported, so set it first.
    os.environ["CUDA_HOME"] = cuda_home
    # Hopper only: the kernels use sm_90a instructions.  Without this, torch would build
    # for every architecture it knows when no GPU is visible.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as exc:
        say(f"torch is not importable ({exc}); install torch first, then this package with "
            "--no-build-isolation; installing without the CUDA extension")
        return [], {}
    if torch.version.cuda is None:
        say("the installed torch is a CPU build; installing without the CUDA extension")
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    extension = CUDAExtension(
        name="kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")] + pip_cuda_include_dirs(cuda_home),
        extra_compile_args={
            "cxx": ["-O3"],
            # -lineinfo keeps source lines for ncu and compute-sanitizer at no runtime cost.
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"],
        },
    )
    say(f"building kernels._C for sm_90a with CUDA at {cuda_home}")
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":  # pip runs this file as __main__; tests import its helpers
    warn_if_unsupported()
    ext_modules, cmdclass = extension_modules()
    setup(
        name="speedrun",
        version="0.1.0",
        description="Hand-written CUDA and Triton kernels for the NanoGPT and CIFAR-10 speedruns",
        packages=find_packages(include=["kernels", "kernels.*", "speedrun", "speedrun.*", "bench"]),
        python_requires=">=3.11",
        install_requires=[requirement("torch"), requirement("triton"), "numpy"],
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
