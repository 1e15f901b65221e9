"""Ahead-of-time compilation of Triton kernels for Hopper (sm_90) on a machine without a GPU.

The tests run Triton in its interpreter (TRITON_INTERPRET=1), where @triton.jit functions
are interpreted objects that triton.compile cannot take.  So compilation runs in a child
process with the interpreter off: `compile_for_hopper(specs)` sends it a list of kernel
specs as JSON and gets back, per spec, the PTX and the size of the cubin.

A spec: {"module": "kernels.softcap_ce", "kernel": "_softcap_ce_forward_kernel",
         "signature": {"x_ptr": "*bf16", "n": "i32", ...}, "constexprs": {"BLOCK": 1024},
         "num_warps": 8, "divisible_by_16": ["x_ptr", "n"]}

`divisible_by_16` names the pointer and integer arguments that the JIT would specialize
as multiples of 16 at run time (16-byte aligned pointers, sizes like V = 50304): that
is what lets Triton emit vector loads, so an AOT check of vectorization needs it too.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compile_for_hopper(specs: list[dict]) -> list[dict]:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-m", "tests.hopper_aot"], input=json.dumps(specs),
                          capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"AOT compilation failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout)


def _compile_one(spec: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    constexprs = spec.get("constexprs", {})
    signature = {**spec["signature"], **{name: "constexpr" for name in constexprs}}
    names = list(signature)
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in spec.get("divisible_by_16", [])}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": spec.get("num_warps", 4)})
    return {"ptx": compiled.asm["ptx"], "cubin_bytes": len(compiled.asm["cubin"])}


if __name__ == "__main__":
    print(json.dumps([_compile_one(spec) for spec in json.load(sys.stdin)]))
