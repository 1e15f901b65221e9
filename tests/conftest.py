"""Test setup: without a GPU, Triton kernels run in Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before `kernels` (and so @triton.jit) is imported, which is
why it is set here, at collection time, rather than inside a test.

Also here: the `compat` marker (the tests that the CI's second job runs on the oldest
supported stack, torch 2.11 + triton 3.6), given by node id from COMPAT_TESTS so the test
files stay as they are, and a fix for an interpreter bug of triton < 3.7 (see
patch_old_interpreter).
"""
import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

requires_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")

# Per kernel family: the interpreter correctness tests against the float64 reference and
# the ahead-of-time build for sm_90; then the extension's build and load.  A test function
# named here is marked with every parametrization.  "file.py" alone marks the whole file.
COMPAT_TESTS = {
    "tests/test_softcap_ce.py": ["test_triton_matches_reference",
                                 "test_triton_reductions_and_upstream_gradients",
                                 "test_triton_kernel_writes_every_gradient_element",
                                 "test_triton_kernels_compile_for_sm90"],
    "tests/test_fp8_head.py": ["test_triton_fp8_gemm_matches_fp64",
                               "test_triton_ce_grad_e5m2_matches_torch",
                               "test_triton_gemm_row_stats_match_fp64",
                               "test_loss_from_row_stats_matches_the_softcap_ce_reference",
                               "test_linear_softcap_ce_under_every_backend",
                               "test_triton_fused_head_scales_dx_and_dw_by_the_upstream_after_the_gemms",
                               "test_extension_ops_are_registered",
                               "test_extension_ops_refuse_cpu_tensors_before_launch",
                               "test_gemm_sass_has_qgmma_for_each_operand_type_and_no_local_memory",
                               "test_fp8_head_kernels_have_no_spills"],
    "tests/test_newton_schulz.py": ["test_triton_matches_float64_iteration",
                                    "test_triton_writes_every_element_of_poisoned_buffers",
                                    "test_triton_passes_over_the_stack_match_one_pass_exactly",
                                    "test_triton_kernels_compile_for_sm90_with_wgmma"],
    "tests/test_relu2_mlp.py": ["test_triton_relu2_mlp_matches_float64",
                                "test_triton_linear_relu2_matches_float64",
                                "test_gemm_variants_write_every_element",
                                "test_triton_relu2_mlp_fp8_matches_float64",
                                "test_gemm_fp8_operands_scale_and_bf16_sized_output",
                                "test_every_kernel_compiles_for_sm90_with_wgmma"],
    "tests/test_sliding_window_attention.py": ["test_triton_matches_reference",
                                               "test_every_output_element_is_written",
                                               "test_tensors_that_tma_cannot_read_in_place_are_copied",
                                               "test_launch_order_is_longest_work_first",
                                               "test_triton_kernels_compile_for_sm90_with_wgmma",
                                               "test_gluon_ranges_are_the_visible_blocks_and_order_is_longest_first",
                                               "test_gluon_forward_compiles_for_sm90_with_the_softmax_wait_leaving_one_group"],
    # Not the sm_90a/spill listing: triton 3.6's bundled cuobjdump names the cubins sm_90
    # (no "a"); the main job reads them with triton 3.8's tool.
    "tests/test_extension.py": ["test_backends_report_the_extension_as_built",
                                "test_ops_are_registered_with_their_schemas",
                                "test_ops_refuse_cpu_tensors_without_touching_memory"],
    "tests/test_backend.py": ["test_python_m_kernels_summarizes_every_op",
                              "test_python_m_kernels_names_the_mlp_path_this_triton_gives"],
    # The first light's rehearsal on the GPU machines' own versions: every stage, both
    # trainers and the bench's no-GPU exit under torch 2.11 / triton 3.6 / Python 3.12.
    "tests/test_gpu_session.py": ["test_dry_run_runs_every_stage_and_writes_the_summary"],
}


def _is_compat(nodeid: str) -> bool:
    path, _, rest = nodeid.partition("::")
    if path not in COMPAT_TESTS:
        return False
    names = COMPAT_TESTS[path]
    return names is None or rest.split("[")[0] in names


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _is_compat(item.nodeid):
            item.add_marker(pytest.mark.compat)
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


def _triton_version() -> tuple[int, int]:
    import triton
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


def patch_old_interpreter() -> bool:
    """Make triton < 3.7's interpreter index with scalar kernel arguments; True if patched.

    The interpreter holds a scalar as a numpy array of shape (1,), and triton 3.6 defines
    tensor.__index__ as int(array).  NumPy >= 2.4 refuses int() of an array with ndim > 0
    ("only 0-dimensional arrays can be converted to Python scalars"), so any kernel that
    uses a scalar argument where Python wants an int -- range(0, n_cols, BLOCK), for one --
    fails.  Triton 3.7 squeezes the array first; this applies the same one-line fix,
    wrapping the function that installs __index__ on every launch.  It changes how the
    interpreter reads its own scalars, nothing in the kernels or the results.
    """
    if os.environ.get("TRITON_INTERPRET") != "1" or _triton_version() >= (3, 7):
        return False
    from triton.runtime import interpreter

    install = interpreter._patch_lang_tensor

    def install_then_fix_index(tensor, scope):
        install(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = install_then_fix_index
    return True


OLD_INTERPRETER_PATCHED = patch_old_interpreter()


@pytest.fixture
def interpreter_device():
    """The device Triton kernels run on in this session: CUDA if present, else the CPU interpreter."""
    return torch.device("cuda" if HAS_GPU else "cpu")
