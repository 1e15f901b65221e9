"""Ahead-of-time compilation of Triton kernels for Hopper (sm_90) on a machine without a GPU.

The tests run Triton in its interpreter (TRITON_INTERPRET=1), where @triton.jit functions
are interpreted objects that triton.compile cannot take.  So compilation runs in a child
process with the interpreter off: `compile_for_hopper(specs)` sends it a list of kernel
specs as JSON and gets back, per spec, the PTX, the size of the cubin and what the JIT
would have specialized.

The specialization is the JIT's own: the argument values of a spec go through the
kernel's binder (the function Triton builds from the kernel's signature to specialize a
launch), bound by argument name, so the AOT build gets exactly the signature,
constexprs and divisibility hints that a launch with those values would get: ints
divisible by 16 get the hint, ints equal to 1 become constexprs, pointers 16-byte
aligned get the hint, floats and `do_not_specialize` arguments are left alone.

A spec names the values the launch passes:
    {"module": "kernels.softcap_ce", "kernel": "_softcap_ce_forward_kernel",
     "args": {"logits_ptr": "*bf16", "n_cols": 50304, "cap": 30.0, "BLOCK": 4096, ...},
     "num_warps": 8, "num_stages": 3}
where "*bf16" is a 16-byte aligned bf16 tensor, {"ptr": "bf16", "aligned": false} one that
is not, "tensordesc<bf16[128, 64]>" a host TensorDescriptor with that block,
"gluon_tensordesc<bf16[128, 64]>" the same for a Gluon kernel (Gluon's host descriptor,
with the default NVMMA shared layout of that block), and any other value is passed as is.

The older form, {"signature": {name: type}, "constexprs": {...}, "divisible_by_16":
[names]}, is translated to such values (an int or pointer in divisible_by_16 gets an
aligned value, any other a misaligned one; i64 ints get a value beyond 32 bits), so it
goes through the same binder.  It cannot say that an argument is 1 at run time: state
that with "args".

`compile_for_hopper(specs, cubin_dir=...)` also writes each cubin to
cubin_dir/<index>.cubin and returns its path (bench.static reads their SASS).
"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = ("cuda", 90, 32)


def compile_for_hopper(specs: list[dict], cubin_dir: str | None = None) -> list[dict]:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    request = {"specs": specs, "cubin_dir": cubin_dir}
    done = subprocess.run([sys.executable, "-m", "tests.hopper_aot"], input=json.dumps(request),
                          capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"AOT compilation failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout)


# ---- in the child process ---------------------------------------------------------------

class _Pointer:
    """What the binder needs of a tensor argument: its dtype and its address."""

    def __init__(self, dtype, aligned: bool):
        self.dtype = dtype
        self._address = 0 if aligned else 4  # a 4-byte aligned address is legal for every dtype here

    def data_ptr(self) -> int:
        return self._address


_TYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64", "i8": "int8",
               "i16": "int16", "i32": "int32", "i64": "int64", "u8": "uint8", "fp8e4nv": "float8_e4m3fn",
               "fp8e5": "float8_e5m2", "i1": "bool"}


def _torch_dtype(name: str):
    import torch
    if name not in _TYPE_NAMES:
        raise ValueError(f"unknown element type {name!r} (known: {sorted(_TYPE_NAMES)})")
    return getattr(torch, _TYPE_NAMES[name])


def _value(value):
    """A spec value -> the object a launch would pass."""
    if isinstance(value, str) and value.startswith("*"):
        return _Pointer(_torch_dtype(value[1:]), aligned=True)
    if isinstance(value, dict) and "ptr" in value:
        return _Pointer(_torch_dtype(value["ptr"]), aligned=value.get("aligned", True))
    if isinstance(value, str) and value.startswith(("tensordesc<", "gluon_tensordesc<")):
        match = re.fullmatch(r"(gluon_)?tensordesc<(\w+)\[([\d, ]+)\]>", value)
        if match is None:
            raise ValueError(f"cannot read the tensor descriptor {value!r}")
        gluon, dtype, block = match.group(1), _torch_dtype(match.group(2)), [int(x) for x in match.group(3).split(",")]
        strides = [1] * len(block)
        for axis in range(len(block) - 2, -1, -1):
            strides[axis] = strides[axis + 1] * block[axis + 1]
        if gluon:
            from triton.experimental.gluon import language as gl
            from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
            layout = gl.NVMMASharedLayout.get_default_for(block, getattr(gl, _TYPE_NAMES[match.group(2)]))
            return TensorDescriptor(_Pointer(dtype, aligned=True), block, strides, block, layout)
        from triton.tools.tensor_descriptor import TensorDescriptor
        return TensorDescriptor(_Pointer(dtype, aligned=True), block, strides, block)
    return value


def _legacy_args(spec: dict) -> dict:
    """The values that the older spec form stands for (see the module docstring)."""
    divisible = set(spec.get("divisible_by_16", []))
    unknown = divisible - set(spec["signature"])
    if unknown:
        raise ValueError(f"divisible_by_16 names arguments not in the signature: {sorted(unknown)}")
    args = {}
    for name, ty in spec["signature"].items():
        hinted = name in divisible
        if ty.startswith("*"):
            args[name] = {"ptr": ty[1:], "aligned": hinted}
        elif ty in ("i32", "i64", "u32", "u64"):
            args[name] = (16 if hinted else 17) + (2**32 if ty.endswith("64") else 0)
        elif ty.startswith("fp") or ty.startswith("bf"):
            args[name] = 1.5
        elif ty == "i1":
            args[name] = True
        else:
            args[name] = ty  # tensordesc<...>
    return {**args, **spec.get("constexprs", {})}


def _specialize(spec: dict):
    """(kernel, signature, constexprs, attrs, options) exactly as a JIT launch would build them."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    args = spec["args"] if "args" in spec else _legacy_args(spec)
    unknown = set(args) - set(fn.arg_names)
    if unknown:
        raise ValueError(f"{spec['kernel']} has no arguments {sorted(unknown)} (it takes {fn.arg_names})")
    backend = make_backend(GPUTarget(*TARGET))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    launch_options = {"num_warps": spec.get("num_warps", 4), "debug": False,
                      **{key: spec[key] for key in ("num_stages", "maxnreg") if key in spec}}
    bound, specialization, options = binder(**{name: _value(v) for name, v in args.items()}, **launch_options)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch_options, bound, specialization, options)
    return fn, signature, constexprs, attrs, options


def _compile_one(spec: dict, cubin_path: str | None) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, signature, constexprs, attrs, options = _specialize(spec)
    if fn.is_gluon():  # Gluon kernels are built from their own AST source (explicit layouts)
        from triton.experimental.gluon._runtime import GluonASTSource as ASTSource
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget(*TARGET), options=options.__dict__)
    if cubin_path is not None:
        with open(cubin_path, "wb") as f:
            f.write(compiled.asm["cubin"])
    names = fn.arg_names
    return {"ptx": compiled.asm["ptx"], "cubin_bytes": len(compiled.asm["cubin"]), "cubin_path": cubin_path,
            "name": compiled.metadata.name, "shared": compiled.metadata.shared,
            "num_warps": compiled.metadata.num_warps, "num_stages": options.num_stages,
            "signature": {name: ty for name, ty in signature.items() if ty != "constexpr"},
            # int arguments that the JIT turned into constants (value 1), by name
            "specialized_to_constexpr": {names[path[0]]: value for path, value in constexprs.items()
                                         if len(path) == 1 and not fn.params[path[0]].is_constexpr},
            "divisible_by_16": sorted(names[path[0]] for path, values in attrs.items()
                                      if len(path) == 1 and ["tt.divisibility", 16] in values)}


if __name__ == "__main__":
    request = json.load(sys.stdin)
    directory = request["cubin_dir"]
    print(json.dumps([_compile_one(spec, os.path.join(directory, f"{i}.cubin") if directory else None)
                      for i, spec in enumerate(request["specs"])]))
