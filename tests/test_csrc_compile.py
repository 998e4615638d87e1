"""Compile check of the CUDA C++ sources (csrc/) with plain nvcc, no GPU needed.

Every ``csrc/*.cu`` (globbed, so new files are covered) is compiled to an object file for
sm_90 and sm_80 with warnings as errors, host and device side; the public header must also
compile on its own from a C++ file that uses nothing else, with the exact signatures the
torch binding relies on. Skipped only when nvcc is not on the PATH. The files compile in
parallel (one nvcc per file, both architectures in one call).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))
NVCC = shutil.which("nvcc")
# Kernels that must exist (the glob may find more; each found file is checked).
REQUIRED = {"covariance.cu", "projected_linear.cu"}

FLAGS = [
    "-std=c++17", "-O2",
    "--Werror", "all-warnings",
    "-Xcompiler", "-Wall,-Wextra,-Werror",
    "-gencode", "arch=compute_90,code=sm_90",
    "-gencode", "arch=compute_80,code=sm_80",
    f"-I{CSRC}",
]
TIMEOUT_S = 600

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on the PATH: the CUDA C++ "
                                "compile check needs the CUDA toolkit")


def _nvcc(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([NVCC, *args], capture_output=True, text=True, timeout=TIMEOUT_S)


def _problem(res: subprocess.CompletedProcess) -> str | None:
    """None if the compile succeeded without any warning, else what nvcc said."""
    text = (res.stderr or "") + (res.stdout or "")
    if res.returncode != 0 or "warning" in text.lower():
        return f"nvcc exit status {res.returncode}:\n{text}"
    return None


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, tuple[str | None, Path]]:
    """Compile every csrc/*.cu once, in parallel: {file name: (problem or None, object)}."""
    out_dir = tmp_path_factory.mktemp("csrc_obj")

    def one(src: Path) -> tuple[str, tuple[str | None, Path]]:
        obj = out_dir / (src.stem + ".o")
        res = _nvcc([*FLAGS, "-c", str(src), "-o", str(obj)])
        return src.name, (_problem(res), obj)

    workers = max(1, min(len(CU_FILES), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(pool.map(one, CU_FILES))


def test_required_sources_present():
    names = {p.name for p in CU_FILES}
    assert REQUIRED <= names, f"csrc/ lacks {sorted(REQUIRED - names)}"
    assert (CSRC / "rmtkd_cuda.h").is_file()


@needs_nvcc
@pytest.mark.parametrize("src", CU_FILES, ids=[p.name for p in CU_FILES])
def test_cu_compiles_without_warnings(src: Path, compiled):
    problem, obj = compiled[src.name]
    assert problem is None, f"csrc/{src.name} does not compile cleanly for sm_90/sm_80:\n{problem}"
    assert obj.is_file() and obj.stat().st_size > 0


_HEADER_USER = r"""
#include "rmtkd_cuda.h"
#include <type_traits>

// The exact signatures the torch binding is written against.
using CovFn = cudaError_t (*)(const void*, rmtkd::DType, int64_t, int64_t, int64_t, const float*,
                              const uint8_t*, float*, float*, cudaStream_t);
using PlFn = cudaError_t (*)(const void*, const void*, const void*, const void*, void*, rmtkd::DType,
                             int64_t, int64_t, int64_t, int64_t, cudaStream_t);
static_assert(std::is_same<decltype(&rmtkd::covariance_update), CovFn>::value, "covariance_update");
static_assert(std::is_same<decltype(&rmtkd::projected_linear_forward), PlFn>::value,
              "projected_linear_forward");
static_assert(rmtkd::kProjectedLinearMaxRank == 256, "rank limit");
static_assert(static_cast<int>(rmtkd::DType::F32) == 0 && static_cast<int>(rmtkd::DType::F16) == 1 &&
              static_cast<int>(rmtkd::DType::BF16) == 2, "dtype codes");

int header_user() { return static_cast<int>(rmtkd::DType::BF16); }
"""


@needs_nvcc
def test_header_compiles_standalone(tmp_path):
    """rmtkd_cuda.h is plain C++: a .cpp including only it compiles (host compiler via nvcc,
    which supplies the CUDA include path), warnings as errors."""
    src = tmp_path / "header_user.cpp"
    src.write_text(_HEADER_USER)
    res = _nvcc(["-std=c++17", "-x", "c++", "--Werror", "all-warnings",
                 "-Xcompiler", "-Wall,-Wextra,-Werror,-pedantic", f"-I{CSRC}",
                 "-c", str(src), "-o", str(tmp_path / "header_user.o")])
    problem = _problem(res)
    assert problem is None, f"csrc/rmtkd_cuda.h does not compile on its own:\n{problem}"
