"""Test-wide setup.

Without CUDA the Triton kernels can only run under Triton's numpy interpreter, which is chosen when
a kernel is *defined*, so the variable has to be set before `kernels` is imported.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
