"""Test-session setup.

Without a CUDA device, Triton kernels can only run in its interpreter, which must be chosen
before Triton is first imported: set TRITON_INTERPRET=1 here, before any test module loads.
Tests marked ``interpreter`` exercise the Triton kernels that way (small shapes only).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def float64_default():
    """Run a test with float64 as torch's default dtype (surgery exactness checks)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def one_thread():
    """One torch thread (tiny shapes gain nothing from more, and the CPUs are shared)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
