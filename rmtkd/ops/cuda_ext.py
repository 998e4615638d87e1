"""The ``cuda`` backend's C++ extension (csrc/): build on first use, load, and call.

``load_extension()`` compiles csrc/ with ``torch.utils.cpp_extension.load`` (ninja) into a
cache folder keyed by the torch version and a hash of the sources and flags
(``$RMTKD_CACHE`` or ``~/.cache/rmtkd``, then ``ext/<key>``), loads it once per process and
registers the ops ``torch.ops.rmtkd.*``:

- ``covariance_update(x, shift, mask, c, colsum)``: ``c``'s upper triangle += Xs^T Xs and
  ``colsum`` += Xs.sum(0), Xs = x - shift over the kept rows (csrc/covariance.cu, CUDA only);
- ``projected_linear(x, V, W, bias)``: ``(x V) W^T + bias`` (csrc/projected_linear.cu, CUDA
  only, rank <= ``MAX_RANK``), differentiable: its backward is torch GEMMs;
- ``krylov_top(c, unit, trace, d_alive, n, ...)``: the randomized spike solver's whole loop
  (csrc/eigen.cpp, ATen calls: CPU and CUDA tensors).

Where torch has CUDA the extension is built with the .cu kernels (nvcc, ``-std=c++17``, the
architecture from ``TORCH_CUDA_ARCH_LIST`` or else the current device); elsewhere a CPU build
holds only the solver (the two CUDA ops then raise a clear error on any call). Fake
implementations are registered for all three ops, so they trace under ``torch.compile``.

The functions of this module also take CuPy arrays (zero-copy through DLPack) and return the
caller's array type; CuPy is imported only when a non-torch array comes in.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_extension", "cuda_runnable", "extension_status", "ExtensionBuildError",
           "covariance_update", "projected_linear", "krylov_top", "MAX_RANK"]

_NAME = "rmtkd_csrc"
_CPP_SOURCES = ("bindings.cpp", "eigen.cpp", "cuda_ops.cpp")
_CUDA_SOURCES = ("covariance.cu", "projected_linear.cu")
_HEADERS = ("rmtkd_ops.h", "rmtkd_cuda.h")
# Rank limit of the fused projected-linear kernel (kProjectedLinearMaxRank in rmtkd_cuda.h).
MAX_RANK = 256
# Undo torch's defaults that hide the half/bfloat16 operators of cuda_fp16.h / cuda_bf16.h, so
# the .cu files compile here exactly as with plain nvcc (how CI compile-checks them).
_NVCC_UNDEFS = ["-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__"]


class ExtensionBuildError(RuntimeError):
    """The C++ extension could not be built or loaded (the message says why and where the
    compiler output is)."""


_lock = threading.Lock()
_loaded: dict[str, Any] = {}   # "cuda": bool, "path": str, "seconds": float, "build_dir": str


def csrc_dir() -> Path:
    """The folder holding the C++/CUDA sources (the package data ``rmtkd.csrc``)."""
    spec = importlib.util.find_spec("rmtkd.csrc")
    if spec is not None and spec.origin:
        return Path(spec.origin).resolve().parent
    return Path(__file__).resolve().parents[2] / "csrc"


def cache_dir() -> Path:
    """Root of the build cache: ``$RMTKD_CACHE`` or ``~/.cache/rmtkd``."""
    root = os.environ.get("RMTKD_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "rmtkd"


@functools.lru_cache(maxsize=None)
def _find_nvcc() -> str | None:
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME or os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


@functools.lru_cache(maxsize=None)
def _has_ninja() -> bool:
    """Whether ninja runs; a pip-installed ninja in this Python's environment (the ``ninja``
    package, or the venv's bin/ when the venv is not activated) is put on PATH for the
    build, since torch looks for ``ninja`` on PATH only."""
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:
        dirs = [os.path.dirname(sys.executable)]
        try:
            import ninja  # the PyPI package ships the binary

            dirs.insert(0, ninja.BIN_DIR)
        except (ImportError, AttributeError):
            pass
        for folder in dirs:
            if os.access(os.path.join(folder, "ninja"), os.X_OK):
                os.environ["PATH"] = folder + os.pathsep + os.environ.get("PATH", "")
                break
    return cpp_extension.is_ninja_available()


def _why_no_cuda() -> str:
    if torch.version.cuda is None:
        return (f"this torch ({torch.__version__}) is built without CUDA; the cuda backend "
                f"needs a CUDA build of torch and a GPU")
    return "torch sees no CUDA device (torch.cuda.is_available() is False)"


def cuda_runnable(device: torch.device) -> tuple[bool, str]:
    """Whether the cuda backend can run on ``device``: CUDA tensors, a CUDA device, and nvcc
    and ninja to build the extension (checked without building it)."""
    if device.type != "cuda":
        return False, (f"the cuda backend runs on CUDA tensors, got {device.type} tensors; "
                       f"use backend='torch' (or 'auto') on the CPU")
    if not torch.cuda.is_available():
        return False, _why_no_cuda()
    if _find_nvcc() is None:
        return False, ("nvcc was not found (set CUDA_HOME or put nvcc on PATH) to build the "
                       "C++ extension")
    if not _has_ninja():
        return False, "ninja was not found (pip install ninja) to build the C++ extension"
    return True, ""


def _arch_flags() -> tuple[list[str], str]:
    """nvcc architecture flags and a label for the cache key: TORCH_CUDA_ARCH_LIST if set
    (torch turns it into flags), else the current device's (sm_90a on Hopper, for wgmma)."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return [], f"list:{env}"
    major, minor = torch.cuda.get_device_capability()
    cc = f"{major}{minor}" + ("a" if major == 9 else "")
    return [f"-gencode=arch=compute_{cc},code=sm_{cc}"], f"sm_{cc}"


def _build_key(paths: list[Path], cuda: bool, flags: list[str], arch: str) -> str:
    h = hashlib.sha256()
    for part in (torch.__version__, str(torch.version.cuda), str(cuda), arch, *flags):
        h.update(part.encode() + b"\0")
    for p in paths:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def extension_status() -> dict[str, Any]:
    """What is loaded in this process: {} before ``load_extension``, else ``cuda`` (bool),
    ``path`` (the shared library), ``build_dir`` and ``seconds`` (build + load time)."""
    return dict(_loaded)


def load_extension(*, with_cuda: bool | None = None, verbose: bool = False) -> str:
    """Build (first use, cached on disk) and load the extension; return the library path.

    with_cuda: build the CUDA ops too (default: ``torch.cuda.is_available()``); False builds
    the CPU-only library (the solver). Loaded once per process: later calls return at once
    (with_cuda=True then raises if the CPU-only library is the one loaded).

    Raises:
        ExtensionBuildError: ninja or nvcc missing, torch without CUDA for a CUDA build, a
            missing source, or a compiler error (the message names the log file).
    """
    if _loaded:
        if with_cuda and not _loaded["cuda"]:
            raise ExtensionBuildError(
                "the CPU-only build of the rmtkd extension is already loaded in this process; "
                "the CUDA ops need a fresh process (load_extension(with_cuda=True) first)")
        return _loaded["path"]
    cuda = torch.cuda.is_available() if with_cuda is None else bool(with_cuda)
    with _lock:
        if _loaded:
            return _loaded["path"]
        t0 = time.perf_counter()
        path, build_dir = _build(cuda, verbose)
        _register_python_side()
        _loaded.update(cuda=cuda, path=path, build_dir=str(build_dir),
                       seconds=time.perf_counter() - t0)
        return path


def _build(cuda: bool, verbose: bool) -> tuple[str, Path]:
    from torch.utils import cpp_extension

    if not _has_ninja():
        raise ExtensionBuildError("ninja is required to build the rmtkd C++ extension and was "
                                  "not found: pip install ninja (or 'rmtkd[cuda]')")
    if cuda:
        if torch.version.cuda is None:
            raise ExtensionBuildError(f"cannot build the CUDA ops: {_why_no_cuda()}")
        if _find_nvcc() is None:
            raise ExtensionBuildError("cannot build the CUDA ops: nvcc was not found (set "
                                      "CUDA_HOME to the CUDA toolkit or put nvcc on PATH)")
    src = csrc_dir()
    names = _CPP_SOURCES + (_CUDA_SOURCES if cuda else ())
    sources = [src / s for s in names]
    missing = [str(p) for p in sources if not p.is_file()]
    if missing:
        raise ExtensionBuildError(f"rmtkd C++ sources missing: {', '.join(missing)}")
    headers = [src / h for h in _HEADERS if (src / h).is_file()]
    cflags = ["-O3"] + (["-DWITH_CUDA"] if cuda else [])
    cuda_flags: list[str] = []
    arch = "cpu"
    if cuda:
        arch_flags, arch = _arch_flags()
        cuda_flags = ["-O3", "-std=c++17", "-DWITH_CUDA", *_NVCC_UNDEFS, *arch_flags]
    key = _build_key(sources + headers, cuda, cflags + cuda_flags, arch)
    flavour = f"cu{torch.version.cuda}" if cuda else "cpu"
    build_dir = cache_dir() / "ext" / f"torch{torch.__version__}-{flavour}-{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        path = cpp_extension.load(
            name=_NAME, sources=[str(p) for p in sources], extra_cflags=cflags,
            extra_cuda_cflags=cuda_flags or None, extra_include_paths=[str(src)],
            build_directory=str(build_dir), with_cuda=cuda, is_python_module=False,
            verbose=verbose)
    except Exception as err:  # noqa: BLE001 - compiler, linker or loader failure
        log = build_dir / "build_error.log"
        text = f"{type(err).__name__}: {err}"
        log.write_text(text)
        tail = "\n".join(text.strip().splitlines()[-15:])
        raise ExtensionBuildError(
            f"building the rmtkd C++ extension ({'CUDA' if cuda else 'CPU'}) failed; the "
            f"compiler output is in {log} (build files in {build_dir}). Last lines:\n{tail}"
        ) from err
    return str(path), build_dir


# --- Python side of the ops: fake (meta) kernels and autograd ------------------------------

def _register_python_side() -> None:
    @torch.library.register_fake("rmtkd::covariance_update")
    def _covariance_update_fake(x, shift, mask, c, colsum):
        return None  # updates c and colsum in place (declared in the schema)

    @torch.library.register_fake("rmtkd::projected_linear")
    def _projected_linear_fake(x, V, W, bias):
        return x.new_empty((*x.shape[:-1], W.shape[0]))

    @torch.library.register_fake("rmtkd::krylov_top")
    def _krylov_top_fake(c, unit, trace, d_alive, n, tau=0.5, block=16, tol=1e-4,
                         max_basis=-1, seed=0):
        ctx = torch.library.get_ctx()
        m, k = ctx.new_dynamic_size(), ctx.new_dynamic_size()
        return (torch.empty(m, dtype=torch.float64, device="cpu"),
                c.new_empty((c.shape[0], k)),
                torch.empty(6, dtype=torch.float64, device="cpu"))

    torch.library.register_autograd("rmtkd::projected_linear", _projected_linear_backward,
                                    setup_context=_projected_linear_setup)


def _projected_linear_setup(ctx, inputs, output) -> None:
    x, V, W, bias = inputs
    ctx.save_for_backward(x, V, W)
    ctx.has_bias = bias is not None


def _projected_linear_backward(ctx, gy):
    """Torch GEMMs: gt = g W, grad_x = gt V^T, grad_V = x^T gt, grad_W = g^T (x V),
    grad_b = g.sum(0) in fp32; only the gradients asked for are formed."""
    x, V, W = ctx.saved_tensors
    need_x, need_v, need_w, need_b = ctx.needs_input_grad[:4]
    d_in, k = V.shape
    x2 = x.reshape(-1, d_in)
    g2 = gy.reshape(-1, W.shape[0])
    gx = gV = gW = gb = None
    if need_x or need_v:
        gt = g2 @ W
        if need_x:
            gx = (gt @ V.T).reshape(x.shape)
        if need_v:
            gV = x2.T @ gt
    if need_w:
        gW = g2.T @ (x2 @ V)
    if need_b and ctx.has_bias:
        gb = g2.sum(0, dtype=torch.float32).to(gy.dtype)
    return gx, gV, gW, gb


# --- public entry points: torch tensors or CuPy (any DLPack) arrays -------------------------

def _as_tensor(a: Any) -> Any:
    """``a`` as a torch tensor (zero-copy through DLPack for CuPy arrays); None stays None."""
    if a is None or isinstance(a, torch.Tensor):
        return a
    if not hasattr(a, "__dlpack__"):
        raise TypeError(f"expected a torch tensor or a DLPack array (e.g. CuPy), got "
                        f"{type(a).__name__}")
    return torch.from_dlpack(a)


def like_caller(t: torch.Tensor, caller: Any) -> Any:
    """``t`` in the array type of ``caller`` (CuPy in, CuPy out; imported only then)."""
    if isinstance(caller, torch.Tensor):
        return t
    root = type(caller).__module__.split(".")[0]
    if root == "cupy":
        import cupy

        return cupy.from_dlpack(t)
    if root == "numpy":
        return t.cpu().numpy()
    raise TypeError(f"cannot return a {type(caller).__name__}: only torch tensors, CuPy and "
                    f"NumPy arrays are supported")


def covariance_update(x: Any, shift: Any, mask: Any, c: Any, colsum: Any) -> None:
    """``c[i, j] += sum_r (x[r, i] - shift[i]) (x[r, j] - shift[j])`` for i <= j (the lower
    triangle is left untouched) and ``colsum += sum_r (x[r] - shift)``, over the rows r with
    ``mask[r]`` (all rows if mask is None), in place.

    x: (n, d) float32/float16/bfloat16, unit column stride; shift: (d,) float32 or None;
    mask: (n,) bool/uint8 or None; c: (d, d) float32; colsum: (d,) float32; all CUDA tensors
    or CuPy arrays on one device.
    """
    load_extension(with_cuda=True)
    torch.ops.rmtkd.covariance_update(_as_tensor(x), _as_tensor(shift), _as_tensor(mask),
                                      _as_tensor(c), _as_tensor(colsum))


def projected_linear(x: Any, V: Any, W: Any, bias: Any = None) -> Any:
    """``(x V) W^T + bias`` by the fused CUDA kernel. x (..., d_in), V (d_in, k), W (d_out, k),
    bias (d_out,) or None, one dtype (float32/float16/bfloat16), k <= MAX_RANK. Returns
    (..., d_out) in the type of ``x`` (torch tensor or CuPy array)."""
    load_extension(with_cuda=True)
    y = torch.ops.rmtkd.projected_linear(_as_tensor(x), _as_tensor(V), _as_tensor(W),
                                         _as_tensor(bias))
    return like_caller(y, x)


def krylov_top(c: Any, *, unit: float, trace: float, d_alive: int, n: int, tau: float = 0.5,
               block: int = 16, tol: float = 1e-4, max_basis: int | None = None,
               seed: int = 0):
    """The randomized spike solver in one C++ call (see ``rmtkd.ops.eigen.block_krylov_top``,
    whose result type it returns; ``vectors`` in the type of ``c``).

    c: (d, d) symmetric, float32/float64, any device (CPU tensors too). unit: the detection
    threshold over sigma^2 (``rmtkd.spectral.fit._threshold_unit``); trace: tr C; d_alive, n:
    the features and samples behind C, for the 'moments' noise estimate.
    """
    import numpy as np

    from .eigen import KrylovResult

    load_extension()
    ct = _as_tensor(c)
    vals, vecs, info = torch.ops.rmtkd.krylov_top(
        ct, float(unit), float(trace), int(d_alive), int(n), float(tau), int(block),
        float(tol), -1 if max_basis is None else int(max_basis), int(seed))
    thr, _sigma2, k, converged, m, matvecs = info.tolist()
    return KrylovResult(values=vals.numpy().astype(np.float64, copy=False),
                        vectors=like_caller(vecs, c), k=int(k), threshold=float(thr),
                        basis_size=int(m), matvecs=int(matvecs), converged=bool(converged))
