"""Where the Triton kernel tests can run, shared by the kernel test modules.

Without CUDA the kernels read CPU tensors under the interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 then); with CUDA they need CUDA tensors. The C++ extension's CUDA ops
(``cuda_ext`` marks) need a CUDA device, nvcc and ninja.
"""
import importlib.util
import os

import pytest
import torch

from rmtkd.ops.cuda_ext import cuda_runnable

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
CAN_RUN = HAS_TRITON and (HAS_CUDA or INTERPRETING)
DEVICE = torch.device("cpu") if INTERPRETING or not HAS_CUDA else torch.device("cuda")

interpreter = [pytest.mark.interpreter,
               pytest.mark.skipif(not CAN_RUN, reason="needs Triton and CUDA or "
                                  "TRITON_INTERPRET=1")]
gpu = [pytest.mark.gpu,
       pytest.mark.skipif(not (HAS_TRITON and HAS_CUDA and not INTERPRETING),
                          reason="needs a CUDA device and Triton (not the interpreter)")]

# The C++ extension's CUDA ops (csrc/, rmtkd.ops.cuda_ext): a CUDA device plus nvcc and ninja
# to build them on first use (Triton not needed).
CUDA_EXT_OK, CUDA_EXT_WHY = (cuda_runnable(torch.device("cuda")) if HAS_CUDA
                             else (False, "no CUDA device"))
cuda_ext = [pytest.mark.gpu,
            pytest.mark.skipif(not CUDA_EXT_OK, reason=f"the CUDA extension cannot run here: "
                               f"{CUDA_EXT_WHY}")]

# Unit roundoff of the low-precision dtypes; the fp32 tolerance of the kernels.
U = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
FP32_TOL = 1e-5


def marked(mark_list):
    """Decorator applying every mark in ``mark_list`` (e.g. ``interpreter``, ``gpu``)."""
    def deco(fn):
        for m in reversed(mark_list):
            fn = m(fn)
        return fn
    return deco
