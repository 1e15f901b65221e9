"""Static performance evidence (bench/static): the AOT helper's specialization, the SASS
reader, and the budgets that the compiled code of every kernel is held to.
"""
from __future__ import annotations

import re

import pytest

from tests.hopper_aot import compile_for_hopper

# ---- tests/hopper_aot.py specializes as the JIT does ------------------------------------

SCALE_ROWS = {"module": "kernels.softcap_ce", "kernel": "_scale_rows_kernel", "num_warps": 16}


def _ptx_params(ptx: str) -> list[str]:
    return re.findall(r"\.param \.\w+ \.ptr \.global \.align \d+ (\w+)|\.param \.\w+ (\w+)", ptx)


def test_aot_hints_follow_argument_names_not_spec_order():
    # The signature listed in an order unlike the kernel's (grad_ptr, factor_ptr, n_cols,
    # factor_stride): hints must land on the named arguments.
    scrambled = {"n_cols": "i32", "factor_stride": "i32", "factor_ptr": "*fp32", "grad_ptr": "*bf16"}
    aligned, misaligned = compile_for_hopper([
        {**SCALE_ROWS, "signature": scrambled, "constexprs": {"BLOCK": 4096},
         "divisible_by_16": ["grad_ptr", "n_cols"]},
        {**SCALE_ROWS, "signature": scrambled, "constexprs": {"BLOCK": 4096}, "divisible_by_16": ["n_cols"]},
    ])
    assert aligned["divisible_by_16"] == ["grad_ptr", "n_cols"]
    assert misaligned["divisible_by_16"] == ["n_cols"]
    # What the hints buy: 16-byte vector accesses to the gradient only when it is aligned.
    assert re.search(r"st\.global\S*\.v4\.b32", aligned["ptx"])
    assert not re.search(r"st\.global\S*\.v4", misaligned["ptx"])


def test_aot_specializes_values_like_the_jit():
    # factor_stride = 1 becomes a constant (one parameter less), 50304 and aligned pointers
    # get divisibility hints (0 too: the JIT tests value % 16), a misaligned pointer and
    # 50301 do not.
    one, other = compile_for_hopper([
        {**SCALE_ROWS, "args": {"grad_ptr": "*bf16", "factor_ptr": "*fp32", "n_cols": 50304, "factor_stride": 1,
                                "BLOCK": 4096}},
        {**SCALE_ROWS, "args": {"BLOCK": 4096, "factor_stride": 0, "n_cols": 50301, "factor_ptr": "*fp32",
                                "grad_ptr": {"ptr": "bf16", "aligned": False}}},
    ])
    assert one["specialized_to_constexpr"] == {"factor_stride": 1}
    assert one["divisible_by_16"] == ["factor_ptr", "grad_ptr", "n_cols"]
    assert list(one["signature"]) == ["grad_ptr", "factor_ptr", "n_cols"]
    assert len(_ptx_params(one["ptx"])) == len(_ptx_params(other["ptx"])) - 1
    assert other["specialized_to_constexpr"] == {}
    assert other["divisible_by_16"] == ["factor_ptr", "factor_stride"]
    assert other["signature"]["factor_stride"] == "i32"


def test_aot_rejects_unknown_argument_names():
    with pytest.raises(RuntimeError, match="has no arguments \\['factor'\\]"):
        compile_for_hopper([{**SCALE_ROWS, "args": {"grad_ptr": "*bf16", "factor": "*fp32", "n_cols": 16,
                                                   "factor_stride": 1, "BLOCK": 4096}}])
