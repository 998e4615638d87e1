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


@pytest.fixture(scope="session")
def digits():
    """(trained DigitsMLP, train batches, held-out batches), trained once per session."""
    from rmtkd.examples import digits_mlp_data, train_digits_mlp

    model, _ = train_digits_mlp(seed=0, progress=False)
    train, _, test = digits_mlp_data(seed=0)
    return model, train, test


@pytest.fixture
def outputs():
    """``outputs(model, batches)``: the model's outputs (eval mode) on every batch."""
    def run(model, batches):
        with torch.no_grad():
            return torch.cat([model.eval()(x) for x, _ in batches])
    return run
