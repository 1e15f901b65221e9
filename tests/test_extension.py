"""The compiled extension kernels._C: it loads, registers its ops with the schemas the
Python side calls, and its Hopper code is what we meant (sm_90a SASS, no spills).

Skipped when the extension is not built (no CUDA toolkit at install time, or
KERNELS_SKIP_EXTENSION=1); CI builds it, so there these run.  Loading needs no GPU.
"""
import os
import re
import subprocess

import pytest
import torch
import triton

import kernels
from kernels import _backend

extension = _backend.extension()
pytestmark = pytest.mark.skipif(extension is None, reason=f"kernels._C not built: {_backend.extension_error()}")

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def test_backends_report_the_extension_as_built():
    report = kernels.backends()
    assert report["cuda_extension"] == {"built": True, "error": None}
    assert "cuda" in report["ops"]["softcap_cross_entropy"]["kernels"]


@pytest.mark.parametrize("name,schema", [
    ("softcap_ce_forward", "softcap_ce_forward(Tensor logits, Tensor targets, Tensor grad_scale, float cap, "
                           "int kind, float scale, int ignore_index, bool need_grad) -> (Tensor, Tensor)"),
    ("softcap_ce_scale_rows_", "softcap_ce_scale_rows_(Tensor(a!) grad, Tensor factor) -> ()"),
])
def test_ops_are_registered_with_their_schemas(name, schema):
    op = getattr(torch.ops.speedrun_cuda, name)
    assert str(op.default._schema) == f"speedrun_cuda::{schema}"


def test_ops_refuse_cpu_tensors_without_touching_memory():
    logits = torch.randn(4, 16)
    with pytest.raises(RuntimeError):
        torch.ops.speedrun_cuda.softcap_ce_forward(logits, torch.zeros(4, dtype=torch.long), torch.ones(1),
                                                   30.0, 2, 7.5, -100, True)


def _resource_usage():
    if not os.path.exists(CUOBJDUMP):
        pytest.skip("cuobjdump not shipped with this triton")
    text = subprocess.run([CUOBJDUMP, "--dump-resource-usage", extension.__file__],
                          capture_output=True, text=True, check=True).stdout
    # "Function <mangled>:\n  REG:64 STACK:0 SHARED:1288 LOCAL:0 ..."
    return dict(re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", text))


def test_kernels_are_compiled_for_sm90a_without_spills():
    listing = subprocess.run([CUOBJDUMP, "--list-elf", extension.__file__], capture_output=True, text=True,
                             check=True).stdout
    assert "sm_90a" in listing
    usage = _resource_usage()
    softcap = {name: line for name, line in usage.items() if "softcap_ce" in name or "scale_rows" in name}
    assert len(softcap) >= 3 * 8, "expected the cached (8 widths), streaming and scale kernels per dtype"
    spilled = {name: line for name, line in softcap.items() if "STACK:0" not in line or "LOCAL:0" not in line}
    assert not spilled, f"register spills: {spilled}"
    # The register-cached kernel runs 1024 threads per CTA, so it must fit 64 registers.
    for name, line in softcap.items():
        assert int(re.search(r"REG:(\d+)", line).group(1)) <= 64, (name, line)
