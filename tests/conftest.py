"""Test setup: without a GPU, Triton kernels run in Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before `kernels` (and so @triton.jit) is imported, which is
why it is set here, at collection time, rather than inside a test.
"""
import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

requires_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture
def interpreter_device():
    """The device Triton kernels run on in this session: CUDA if present, else the CPU interpreter."""
    return torch.device("cuda" if HAS_GPU else "cpu")
