"""Small helpers shared by the benchmarks: machine info, interleaved medians, JSON and tables."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, else what ``platform`` reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Host, CPU, core and thread counts, and library versions (torch, numpy, scipy, BLAS)."""
    import numpy as np
    import scipy
    import torch

    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "torch_blas": "mkl" if torch.backends.mkl.is_available() else "other",
        "env_threads": {k: os.environ[k] for k in
                        ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
                        if k in os.environ},
    }
    try:
        blas = scipy.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info["scipy_blas"] = f"{blas['name']} {blas['version']}"
    except (TypeError, KeyError):
        pass
    try:
        load = os.getloadavg()
        info["loadavg_1_5_15"] = [round(v, 2) for v in load]
    except OSError:
        pass
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def median_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                       sync: Callable[[], None] | None = None) -> dict[str, dict[str, Any]]:
    """Time several functions interleaved (:func:`rmtkd.report.interleaved_times`: A B B A
    ...) so load drifts hit them alike. Returns ``{name: {"median_s", "min_s", "times_s"}}``.
    """
    from rmtkd.report import interleaved_times

    times = interleaved_times(fns, repeats, warmup, sync)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "times_s": v}
            for k, v in times.items()}


def write_json(name: str, payload: dict[str, Any], out_dir: Path | None = None) -> Path:
    """Write ``payload`` to ``bench/results/<name>-<host>-<UTC time>.json``; return the path."""
    out_dir = out_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = out_dir / f"{name}-{socket.gethostname()}-{stamp}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a plain aligned table; floats are shown with 4 significant digits."""
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def gpu_info() -> dict[str, Any]:
    """GPU name, capability, SM count and memory, CUDA and Triton versions ({} without CUDA;
    Triton's version is reported if it is installed)."""
    import importlib.util

    import torch

    info: dict[str, Any] = {}
    if importlib.util.find_spec("triton") is not None:
        import triton

        info["triton"] = triton.__version__
        info["triton_interpret"] = os.environ.get("TRITON_INTERPRET") == "1"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(gpu_name=p.name, gpu_capability=f"{p.major}.{p.minor}",
                    gpu_sm_count=p.multi_processor_count,
                    gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def cuda_extension_status() -> str:
    """Why the C++ extension's CUDA ops cannot run here ("" if they can: it is then built
    and loaded, and its ops are ``torch.ops.rmtkd``); a bench then skips its cuda column."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        from rmtkd.ops.cuda_ext import load_extension

        load_extension(with_cuda=True)
        return ""
    except Exception as err:  # noqa: BLE001 - any build failure skips the column
        print(f"cuda column skipped: {err}", file=sys.stderr)
        return f"{type(err).__name__}: {str(err).splitlines()[0]}"
