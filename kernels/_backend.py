"""Backend selection: which implementation of an op runs for a given input.

Backends:
  auto       CUDA tensors: the fastest implementation present for the op (the CUDA
             extension, then Triton, then the reference); CPU tensors: the reference.
  cuda       the hand-written kernels of the compiled extension `kernels._C`.
  triton     the Triton kernels; on CPU tensors they run in Triton's interpreter, which
             needs TRITON_INTERPRET=1 in the environment *before* `kernels` is imported.
  reference  plain PyTorch (kernels/reference.py), the spec, on any device.

An explicit backend that the op has no kernel for (say `cuda` for an op that only has a
Triton kernel yet) falls back to what `auto` would pick for that op; an explicit backend
that the op does have but that cannot run here (extension not built, CPU tensor without
the interpreter) raises RuntimeError saying why, rather than silently running something
else.  The choice is made in Python before any custom op is called, so it is fixed at
trace time under torch.compile and costs nothing per step.
"""
from __future__ import annotations

import contextlib
import importlib
import os

import torch

BACKEND_NAMES = ("auto", "cuda", "triton", "reference")
ENV_VAR = "KERNELS_BACKEND"

# op name -> the fast backends that have a kernel for it; filled by each op module.
_OP_KERNELS: dict[str, tuple[str, ...]] = {}


def _validated(name: str, source: str) -> str:
    if name not in BACKEND_NAMES:
        raise ValueError(f"{source} must be one of {BACKEND_NAMES}, got {name!r}")
    return name


_selected = _validated(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto",
                       f"environment variable {ENV_VAR}")


def set_backend(name: str) -> None:
    """Choose the backend for every op: one of "auto", "cuda", "triton", "reference"."""
    global _selected
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    _selected = _validated(name.lower(), "name")


def get_backend() -> str:
    """The backend set by set_backend() or KERNELS_BACKEND (default "auto")."""
    return _selected


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: run the enclosed code with backend `name`, then restore."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def register_op(op: str, kernels: tuple[str, ...]) -> None:
    """Called by each op module: which fast backends (cuda, triton) implement `op`."""
    _OP_KERNELS[op] = tuple(kernels)


# ---- what is present -------------------------------------------------------------

_extension = None
_extension_error: str | None = None
_extension_tried = False


def extension():
    """The compiled extension module kernels._C, or None if it is not built/loadable."""
    global _extension, _extension_error, _extension_tried
    if not _extension_tried:
        _extension_tried = True
        try:
            _extension = importlib.import_module("kernels._C")
        except ImportError as exc:  # not built, or built against another torch
            _extension_error = f"{type(exc).__name__}: {exc}"
    return _extension


def extension_error() -> str | None:
    extension()
    return _extension_error


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _unavailable_reason(backend: str, device: torch.device) -> str | None:
    if backend == "cuda":
        if extension() is None:
            return ("the CUDA extension kernels._C is not built or failed to load "
                    f"({extension_error()}); reinstall with a CUDA toolkit present")
        if device.type != "cuda":
            return f"the inputs are on {device}; the CUDA backend needs CUDA tensors"
    if backend == "triton":
        if triton_version() is None:
            return "triton is not installed"
        if device.type == "cpu" and not interpreter_enabled():
            return ("the inputs are on the CPU; set TRITON_INTERPRET=1 before importing "
                    "kernels to run Triton kernels in the interpreter")
        if device.type not in ("cpu", "cuda"):
            return f"Triton does not run on {device}"
    return None


def _auto(op: str, device: torch.device) -> str:
    if device.type == "cuda":
        for backend in ("cuda", "triton"):
            if backend in _OP_KERNELS.get(op, ()) and _unavailable_reason(backend, device) is None:
                return backend
    return "reference"


def choose(op: str, device: torch.device) -> str:
    """The implementation ("cuda", "triton" or "reference") that runs `op` on `device`."""
    selected = get_backend()
    if selected == "reference":
        return "reference"
    if selected == "auto" or selected not in _OP_KERNELS.get(op, ()):
        return _auto(op, device)
    reason = _unavailable_reason(selected, device)
    if reason is not None:
        raise RuntimeError(f"{op}: backend {selected!r} was requested but {reason}")
    return selected


def backends() -> dict:
    """What is built and available, and what each op would run on CUDA and CPU tensors."""
    cuda_device = torch.device("cuda")
    cpu_device = torch.device("cpu")

    def outcome(op, device):
        try:
            return choose(op, device)
        except RuntimeError as exc:
            return f"error: {exc}"

    return {
        "selected": get_backend(),
        "cuda_extension": {"built": extension() is not None, "error": extension_error()},
        "triton": {"version": triton_version(), "interpreter": interpreter_enabled()},
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "ops": {
            op: {"kernels": list(kernels),
                 "on_cuda_tensors": outcome(op, cuda_device),
                 "on_cpu_tensors": outcome(op, cpu_device)}
            for op, kernels in sorted(_OP_KERNELS.items())
        },
    }
