"""GPU benchmark: the Triton streaming-covariance kernel vs ``torch.mm(X.T, X)`` + ``X.sum(0)``.

For bf16 rows ``X`` (n x d), fp32 accumulation, it times, with ``triton.testing.do_bench``
medians and rotating among several input tensors (each larger than L2; do_bench also clears
L2 before every call):
- ``triton``: ``rmtkd.kernels.covariance.shifted_gram`` (one launch: shifted Gram upper
  tiles + column sums; split-K partials summed where used),
- ``update``: a full ``CovarianceAccumulator(backend="triton").update`` (kernel, finiteness
  check, ``G - s s^T / m``, Chan merge),
- ``cuda`` / ``cuda update``: the same two for the C++ extension (``rmtkd::covariance_update``,
  csrc/covariance.cu, and ``CovarianceAccumulator(backend="cuda").update``), side by side in
  the same run; the columns read "-" (and the JSON says why) where the extension cannot be
  built,
- ``baseline``: ``torch.mm(X.T, X, out_dtype=torch.float32)`` where this torch supports it for
  bf16, else ``(X.T @ X).float()`` (recorded in the JSON as ``baseline_kind``), plus
  ``X.sum(0, dtype=torch.float32)``.
Rates count ``n d (d + 1)`` FLOPs (the symmetric product), also for the baseline, and are
compared with a bf16 dense matmul peak measured in the same run (8192^3 ``torch.mm``). One fp32
row (ieee kernel vs torch fp32 with TF32 off) is added for reference.

    python bench/bench_covariance.py                 # H100: n = 65536, d in {1024, 4096, 8192}
    python bench/bench_covariance.py --quick         # tiny smoke run (CPU: Triton interpreter)

Without CUDA, ``--quick`` runs under the Triton interpreter on CPU (fp16 instead of bf16, which
the interpreter handles poorly; timed with the torch median timer): a smoke test of the code
path, not a measurement.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch

if not torch.cuda.is_available():  # must precede the first Triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (cuda_extension_status, gpu_info, machine_info,  # noqa: E402
                     median_interleaved, print_table,
                     write_json)

from rmtkd.kernels import covariance as kc  # noqa: E402
from rmtkd.ops.covariance import CovarianceAccumulator, ieee_fp32_matmul  # noqa: E402

CUDA = torch.cuda.is_available()


def _cuda_ext() -> tuple[Any, str]:
    """``(torch.ops.rmtkd, "")`` if the C++ extension builds and loads, else ``(None, why)``."""
    why = cuda_extension_status()
    return (None, why) if why else (torch.ops.rmtkd, "")


def _timer(rep_ms: int) -> Callable[[Callable[[], Any]], float]:
    """Median seconds of a call: do_bench on CUDA, the interleaved torch timer on CPU."""
    if CUDA:
        from triton.testing import do_bench

        def t(fn: Callable[[], Any]) -> float:
            fn()  # compile / autotune outside the timed region
            torch.cuda.synchronize()
            return do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms,
                            return_mode="median") * 1e-3
        return t

    def t_cpu(fn: Callable[[], Any]) -> float:
        return median_interleaved({"f": fn}, repeats=3, warmup=1)["f"]["median_s"]
    return t_cpu


def _rotating(xs: list[torch.Tensor], fn: Callable[[torch.Tensor], Any]) -> Callable[[], Any]:
    """A closure calling ``fn`` on the next input each time (caches do not flatter)."""
    state = {"i": 0}

    def call() -> Any:
        state["i"] = (state["i"] + 1) % len(xs)
        return fn(xs[state["i"]])
    return call


def _baseline_mm(dtype: torch.dtype) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """``X -> X^T X`` in fp32 the way torch does it best for ``dtype``, and its description."""
    if dtype in (torch.bfloat16, torch.float16) and CUDA:
        try:
            probe = torch.ones(32, 16, dtype=dtype, device="cuda")
            torch.mm(probe.T, probe, out_dtype=torch.float32)
            return (lambda x: torch.mm(x.T, x, out_dtype=torch.float32),
                    "torch.mm(X.T, X, out_dtype=torch.float32)")
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    if dtype == torch.float32:
        return lambda x: x.T @ x, "X.T @ X (fp32, TF32 off)"
    return lambda x: (x.T @ x).float(), f"(X.T @ X).float() ({dtype} output)"


def measure_peak(timer: Callable, size: int, dtype: torch.dtype, device: str) -> dict:
    """Dense ``size^3`` matmul rate in ``dtype`` (the device's practical peak)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    t = timer(lambda: torch.mm(a, b))
    return {"size": size, "dtype": str(dtype), "median_s": t, "tflops": 2 * size ** 3 / t / 1e12}


def bench_one(n: int, d: int, dtype: torch.dtype, timer: Callable, n_inputs: int,
              device: str, peak_tflops: float, ext: Any = None) -> dict:
    g = torch.Generator(device=device).manual_seed(d)
    # Zero-mean rows and a zero shift: the kernel still subtracts it (timing does not depend
    # on the values), and its output must then equal the baseline's X^T X (exact products,
    # fp32 sums) up to summation order: a correctness check of what was timed.
    xs = [torch.randn(n, d, generator=g, device=device).to(dtype) for _ in range(n_inputs)]
    shift = torch.zeros(d, device=device)
    mm, baseline_kind = _baseline_mm(dtype)

    def baseline(x: torch.Tensor) -> None:
        mm(x)
        x.sum(0, dtype=torch.float32)

    acc = CovarianceAccumulator(d, backend="triton", device=device)
    acc.update(xs[0])

    # shift_exact=True: the accumulator's case (a shift representable in the input dtype,
    # subtracted in that dtype); for bf16 also the general fp32-subtraction path.
    t_tri = timer(_rotating(xs, lambda x: kc.shifted_gram(x, shift, rows_used=n,
                                                          shift_exact=True)))
    t_f32sub = None
    if dtype != torch.float32:
        t_f32sub = timer(_rotating(xs, lambda x: kc.shifted_gram(x, shift, rows_used=n,
                                                                 shift_exact=False)))
    t_upd = timer(_rotating(xs, acc.update))
    with ieee_fp32_matmul():
        t_base = timer(_rotating(xs, baseline))
        ref = mm(xs[0]).double()
    out, colsum, _ = kc.shifted_gram(xs[0], shift, shift_exact=True)
    iu = torch.triu_indices(d, d, device=device)
    rel_err = ((out.double()[iu[0], iu[1]] - ref[iu[0], iu[1]]).norm()
               / ref[iu[0], iu[1]].norm()).item()
    t_cuda = t_cuda_upd = cuda_err = None
    if ext is not None:  # the C++ extension: kernel alone, then the accumulator's update
        c_buf = torch.zeros(d, d, device=device)
        s_buf = torch.zeros(d, device=device)
        t_cuda = timer(_rotating(xs, lambda x: ext.covariance_update(x, shift, None, c_buf,
                                                                     s_buf)))
        acc_c = CovarianceAccumulator(d, backend="cuda", device=device)
        acc_c.update(xs[0])
        t_cuda_upd = timer(_rotating(xs, acc_c.update))
        c_buf.zero_()
        ext.covariance_update(xs[0], shift, None, c_buf, s_buf)
        cuda_err = ((c_buf.double()[iu[0], iu[1]] - ref[iu[0], iu[1]]).norm()
                    / ref[iu[0], iu[1]].norm()).item()
        del acc_c, c_buf, s_buf
    flops = n * d * (d + 1)
    bytes_read = n * d * xs[0].element_size()
    splits = kc.choose_split(n, d, kc.choose_config(n, d, dtype, xs[0].device)["BLOCK_D"],
                             xs[0].device)
    row = {"dtype": str(dtype).replace("torch.", ""), "n": n, "d": d,
           "triton_s": t_tri, "triton_fp32_subtract_s": t_f32sub, "update_s": t_upd,
           "baseline_s": t_base,
           "speedup_kernel": t_base / t_tri, "speedup_update": t_base / t_upd,
           "triton_tflops": flops / t_tri / 1e12, "update_tflops": flops / t_upd / 1e12,
           "baseline_tflops": flops / t_base / 1e12,
           "frac_of_bf16_peak": flops / t_tri / 1e12 / peak_tflops,
           "triton_gbps": bytes_read / t_tri / 1e9,
           "rel_err_vs_baseline": rel_err, "split_k": splits,
           "cuda_s": t_cuda, "cuda_update_s": t_cuda_upd, "cuda_rel_err_vs_baseline": cuda_err,
           "speedup_cuda_kernel": t_base / t_cuda if t_cuda else None,
           "speedup_cuda_update": t_base / t_cuda_upd if t_cuda_upd else None,
           "cuda_tflops": flops / t_cuda / 1e12 if t_cuda else None,
           "config": kc.best_config(dtype) if CUDA else "interpreter",
           "baseline_kind": baseline_kind, "n_inputs": n_inputs}
    del xs, acc
    if CUDA:
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke run (n=4096 d=256,1024 on GPU; n=128 d=32,48 on CPU)")
    p.add_argument("--n", type=int, default=None, help="rows per batch (default 65536)")
    p.add_argument("--dims", type=int, nargs="+", default=None,
                   help="widths d (default 1024 4096 8192)")
    p.add_argument("--fp32-dim", type=int, default=None,
                   help="d of the fp32 reference row (default 4096; 0 = skip)")
    p.add_argument("--inputs", type=int, default=3, help="input tensors rotated per shape")
    p.add_argument("--rep-ms", type=int, default=200, help="do_bench time per measurement")
    p.add_argument("--no-json", action="store_true", help="do not write bench/results/*.json")
    p.add_argument("--out-dir", type=Path, default=None, help="JSON folder (bench/results/)")
    args = p.parse_args(argv)

    device = "cuda" if CUDA else "cpu"
    if CUDA:
        n = args.n or (4096 if args.quick else 65536)
        dims = args.dims or ([256, 1024] if args.quick else [1024, 4096, 8192])
        fp32_dim = args.fp32_dim if args.fp32_dim is not None else (256 if args.quick else 4096)
        low = torch.bfloat16
        peak = measure_peak(_timer(args.rep_ms), 8192 if not args.quick else 4096, low, device)
    else:
        if not args.quick:
            print("no CUDA device: only --quick (a smoke run under the Triton interpreter) "
                  "runs here", file=sys.stderr)
            return 2
        n = args.n or 128
        dims = args.dims or [32, 48]
        fp32_dim = args.fp32_dim if args.fp32_dim is not None else 32
        low = torch.float16  # bf16 is unreliable under the interpreter
        peak = measure_peak(_timer(args.rep_ms), 256, torch.float32, device)
    timer = _timer(args.rep_ms)
    ext, ext_why = _cuda_ext()

    rows = [bench_one(n, d, low, timer, args.inputs, device, peak["tflops"], ext)
            for d in dims]
    if fp32_dim:
        rows.append(bench_one(n, fp32_dim, torch.float32, timer, args.inputs, device,
                              peak["tflops"], ext))

    print(f"peak {peak['dtype']} matmul {peak['size']}^3: {peak['tflops']:.4g} TFLOP/s  "
          f"({gpu_info().get('gpu_name', 'CPU, Triton interpreter: not a measurement')})")
    print_table(
        ["dtype", "n", "d", "triton ms", "f32sub ms", "update ms", "base ms", "x kern", "x upd",
         "tri TF/s", "% peak", "base TF/s", "GB/s", "rel err", "split"],
        [[r["dtype"], r["n"], r["d"], r["triton_s"] * 1e3,
          "-" if r["triton_fp32_subtract_s"] is None else r["triton_fp32_subtract_s"] * 1e3,
          r["update_s"] * 1e3,
          r["baseline_s"] * 1e3, r["speedup_kernel"], r["speedup_update"], r["triton_tflops"],
          100 * r["frac_of_bf16_peak"], r["baseline_tflops"], r["triton_gbps"],
          r["rel_err_vs_baseline"], r["split_k"]] for r in rows])
    print(f"baseline: {rows[0]['baseline_kind']}; FLOPs counted n*d*(d+1); "
          f"x = baseline time / Triton time")
    if ext is not None:
        print("\ncuda backend (C++ extension), same inputs and baseline:")
        print_table(["dtype", "n", "d", "cuda ms", "cuda upd ms", "base ms", "x kern", "x upd",
                     "cuda TF/s", "rel err"],
                    [[r["dtype"], r["n"], r["d"], r["cuda_s"] * 1e3, r["cuda_update_s"] * 1e3,
                      r["baseline_s"] * 1e3, r["speedup_cuda_kernel"], r["speedup_cuda_update"],
                      r["cuda_tflops"], r["cuda_rel_err_vs_baseline"]] for r in rows])
    else:
        print(f"cuda backend: skipped ({ext_why})")
    for r in rows:
        if r["config"] not in (None, "interpreter"):
            print(f"  {r['dtype']} d={r['d']}: autotuned {r['config']}")
    if not args.no_json:
        path = write_json("covariance_gpu" if CUDA else "covariance_gpu_smoke",
                          {"bench": "covariance_gpu", "machine": machine_info(),
                           "gpu": gpu_info(), "quick": args.quick, "peak": peak,
                          "cuda_ext": ext_why or "built",
                           "flops_formula": "n*d*(d+1)", "rows": rows,
                           "summary": [dict(shape=f"{r['dtype']} n={r['n']} d={r['d']}",
                                            rmtkd_s=r["update_s"], baseline_s=r["baseline_s"],
                                            note=f"kernel alone {r['speedup_kernel']:.2f}x, "
                                                 f"{r['frac_of_bf16_peak']:.0%} of bf16 peak")
                                       for r in rows]
                          + [dict(shape=f"cuda {r['dtype']} n={r['n']} d={r['d']}",
                                  rmtkd_s=r["cuda_update_s"], baseline_s=r["baseline_s"],
                                  note=f"cuda kernel alone {r['speedup_cuda_kernel']:.2f}x")
                             for r in rows if r["cuda_update_s"]]}, args.out_dir)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
