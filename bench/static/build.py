"""Compiled artifacts for the static reading: cubins for sm_90(a), cached by source hash.

- CUDA: each csrc/<op>.cu is compiled alone with nvcc -cubin for sm_90a, with the flags
  setup.py gives the extension (so the SASS is the extension's), not linked: seconds per
  file instead of the whole extension build.
- Triton: the specs of bench.static.families go through tests/hopper_aot.py, which
  specializes each exactly as the JIT would and writes the cubins.

The cache lives in $SPEEDRUN_CACHE/static (default ~/.cache/speedrun/static); an entry's
key hashes everything its compiled code depends on (sources, flags, toolchain versions,
the spec), so a changed kernel is recompiled and an unchanged one is read back.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARCH = "sm_90a"


def cache_dir() -> Path:
    base = os.environ.get("SPEEDRUN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "speedrun")
    path = Path(base) / "static"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:20]


# ---- CUDA ----------------------------------------------------------------------------------

def _nvcc() -> tuple[str, list[str]]:
    """(nvcc path, include flags) as setup.py finds them; raises with one line if absent."""
    sys.path.insert(0, str(ROOT))
    try:
        import setup  # the project's own toolkit discovery (CUDA_HOME trap, pip headers)
    finally:
        sys.path.pop(0)
    home = setup.find_cuda_home()
    if home is None:
        raise RuntimeError("no CUDA toolkit found (nvcc via CUDA_HOME, PATH or /usr/local/cuda*): "
                           "cannot compile csrc/ for the static reading")
    from torch.utils import cpp_extension
    includes = [str(ROOT / "csrc"), *cpp_extension.include_paths(), *setup.pip_cuda_include_dirs(home)]
    import sysconfig
    includes.append(sysconfig.get_paths()["include"])
    return os.path.join(home, "bin", "nvcc"), [f"-I{d}" for d in includes]


def nvcc_flags() -> list[str]:
    """setup.py's nvcc flags for the extension plus torch's common ones, for sm_90a."""
    from torch.utils import cpp_extension
    return ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-std=c++20", *cpp_extension.COMMON_NVCC_FLAGS,
            "-DTORCH_EXTENSION_NAME=_C", f"-gencode=arch=compute_{ARCH[3:]},code={ARCH}"]


def nvcc_version() -> str:
    """nvcc's release line, e.g. 'Cuda compilation tools, release 13.0, V13.0.88'."""
    version = subprocess.run([_nvcc()[0], "--version"], capture_output=True, text=True, check=True).stdout
    return [line for line in version.splitlines() if "release" in line][-1].strip()


def cuda_cubin(source: str) -> Path:
    """The sm_90a cubin of csrc/<source>, from the cache or compiled now."""
    nvcc, includes = _nvcc()
    flags = nvcc_flags()
    version = nvcc_version()
    headers = sorted((ROOT / "csrc").glob("*.h")) + sorted((ROOT / "csrc").glob("*.cuh"))
    key = _digest((ROOT / "csrc" / source).read_bytes(), *[h.read_bytes() for h in headers], " ".join(flags),
                  version, _torch_version())
    target = cache_dir() / f"{Path(source).stem}-{key}.cubin"
    if not target.exists():
        with tempfile.TemporaryDirectory() as scratch:
            out = Path(scratch) / "out.cubin"
            done = subprocess.run([nvcc, "-cubin", *flags, *includes, "-o", str(out), str(ROOT / "csrc" / source)],
                                  capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"nvcc failed on csrc/{source}:\n{done.stderr[-3000:]}")
            shutil.move(str(out), target)
    return target


def _torch_version() -> str:
    import torch
    return torch.__version__


# ---- Triton --------------------------------------------------------------------------------

def _triton_key(spec: dict) -> str:
    import triton
    sources = [p.read_bytes() for p in sorted((ROOT / "kernels").glob("*.py"))]
    aot = (ROOT / "tests" / "hopper_aot.py").read_bytes()
    return _digest(json.dumps(spec, sort_keys=True), *sources, aot, triton.__version__)


def triton_cubins(specs: list[dict]) -> list[tuple[Path, dict]]:
    """[(cubin, compile record)] per spec: cached ones read back, the rest compiled in one child."""
    keys = [_triton_key(spec) for spec in specs]
    folder = cache_dir()
    missing = [n for n, key in enumerate(keys) if not (folder / f"{key}.json").exists()]
    if missing:
        sys.path.insert(0, str(ROOT))
        try:
            from tests.hopper_aot import compile_for_hopper
        finally:
            sys.path.pop(0)
        with tempfile.TemporaryDirectory() as scratch:
            records = compile_for_hopper([specs[n] for n in missing], cubin_dir=scratch)
            for n, record in zip(missing, records):
                shutil.move(record["cubin_path"], folder / f"{keys[n]}.cubin")
                record = {k: v for k, v in record.items() if k not in ("ptx", "cubin_path")}
                (folder / f"{keys[n]}.json").write_text(json.dumps(record))
    return [(folder / f"{key}.cubin", json.loads((folder / f"{key}.json").read_text())) for key in keys]
