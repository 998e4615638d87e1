"""Spike detection on the GPU: rmtkd.spikes(solver="randomized") vs torch.linalg.eigh.

    python bench/bench_eigen.py [--quick]

Planted covariance (fp32, built on the device, TF32 off): d = 8192, n = 4d, k in {16, 64,
256} spikes from 3x to 30x the BBP threshold. Baseline: torch.linalg.eigh on the same GPU
followed by the same estimator (rmtkd.spikes(solver="full")), and plain eigh alone. Accuracy
against a float64 eigh of the same matrix (on the GPU). Medians over repeats timed with
CUDA synchronisation (the calls are seconds long, so events add nothing). --quick: d = 256
on whatever device there is (a smoke test of the script).

Side by side in the same run, the solver's ``cuda`` backend: the same loop and threshold in
one C++ call (csrc/eigen.cpp, ``rmtkd.spikes(..., backend="cuda")``); its column is left out
(the JSON says why) where the extension cannot be built or there is no GPU.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cuda_extension_status, machine_info, print_table, write_json  # noqa: E402

import rmtkd  # noqa: E402
from rmtkd.spectral import bbp_threshold  # noqa: E402


def planted_cov(d: int, k: int, device: torch.device, gamma: float = 0.25,
                seed: int = 0) -> tuple[torch.Tensor, int]:
    gen = torch.Generator(device=device).manual_seed(seed)
    n = int(d / gamma)
    thetas = torch.as_tensor(bbp_threshold(gamma) * np.geomspace(30.0, 3.0, k),
                             dtype=torch.float32, device=device)
    x = torch.randn(n, d, generator=gen, device=device)
    u = torch.linalg.qr(torch.randn(d, k, generator=gen, device=device))[0]
    x += (torch.randn(n, k, generator=gen, device=device) * thetas.sqrt()) @ u.T
    x -= x.mean(0)
    return (x.T @ x) / n, n


def timed(fn, device: torch.device, repeats: int) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cuda_ext_status(device: torch.device) -> str:
    """Why the solver's cuda backend cannot run on ``device`` ("" if it can)."""
    return "no CUDA device" if device.type != "cuda" else cuda_extension_status()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", nargs="+", metavar="D:K", help="e.g. 8192:64 (default: "
                    "8192 with 16, 64 and 256 spikes)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    cases = ([tuple(int(v) for v in c.split(":")) for c in args.cases] if args.cases else
             [(256, 8)] if args.quick else [(8192, 16), (8192, 64), (8192, 256)])
    ext_why = cuda_ext_status(device)
    if ext_why:
        print(f"cuda backend: skipped ({ext_why})", file=sys.stderr)
    rows, records, cuda_rows = [], [], []
    for d, k in cases:
        c, n = planted_cov(d, k, device)
        t_eigh = timed(lambda: torch.linalg.eigh(c), device, args.repeats)
        t_full = timed(lambda: rmtkd.spikes(c, n, solver="full"), device, args.repeats)
        t_rand = timed(lambda: rmtkd.spikes(c, n, solver="randomized"), device, args.repeats)
        fit = rmtkd.spikes(c, n, solver="randomized")
        # Share of the solver's time spent in the products C @ Z (cuBLAS GEMM, reads C once
        # per block): what a custom kernel could speed up.
        z = torch.randn(d, 16, device=device)
        t_prod = timed(lambda: [c @ z for _ in range(20)], device, args.repeats) / 20
        prod_share = t_prod * fit.info["matvecs"] / 16 / t_rand if "matvecs" in fit.info else None
        ref_vals, ref_vecs = torch.linalg.eigh(c.double())
        ref_vals, ref_vecs = ref_vals.flip(0)[: fit.k], ref_vecs.flip(1)[:, : fit.k]
        full = rmtkd.spikes(c.double(), n, solver="full")
        eig_err = float(np.max(np.abs(fit.spike_eigenvalues - ref_vals.cpu().numpy())
                               / ref_vals.cpu().numpy())) if fit.k else 0.0
        u = torch.linalg.qr(fit.eigenvectors.double())[0]
        sin = float(torch.linalg.matrix_norm(u - ref_vecs @ (ref_vecs.T @ u), ord=2)) if fit.k else 0.0
        rows.append([d, k, fit.k, full.k, t_eigh, t_full, t_rand, t_full / t_rand, eig_err, sin])
        records.append(dict(d=d, n=n, planted=k, k_randomized=fit.k, k_full_fp64=full.k,
                            eigh_s=t_eigh, eigh_plus_estimator_s=t_full, randomized_s=t_rand,
                            speedup_vs_eigh_plus_estimator=t_full / t_rand,
                            speedup_vs_eigh=t_eigh / t_rand, eig_rel_err=eig_err,
                            sin_angle=sin, info=fit.info, product_s=t_prod,
                            product_share=prod_share))
        if not ext_why:
            t_cuda = timed(lambda: rmtkd.spikes(c, n, backend="cuda"), device, args.repeats)
            cfit = rmtkd.spikes(c, n, backend="cuda")
            c_err = float(np.max(np.abs(cfit.spike_eigenvalues - ref_vals.cpu().numpy()[: cfit.k])
                                 / ref_vals.cpu().numpy()[: cfit.k])) if cfit.k else 0.0
            cu = torch.linalg.qr(cfit.eigenvectors.double())[0]
            rv = ref_vecs[:, : cfit.k]
            c_sin = float(torch.linalg.matrix_norm(cu - rv @ (rv.T @ cu), ord=2)) if cfit.k else 0.0
            records[-1].update(cuda_s=t_cuda, cuda_k=cfit.k, cuda_eig_rel_err=c_err,
                               cuda_sin_angle=c_sin, cuda_info=cfit.info,
                               speedup_cuda_vs_randomized=t_rand / t_cuda)
            cuda_rows.append([d, k, cfit.k, t_rand, t_cuda, t_rand / t_cuda, t_full / t_cuda,
                              c_err, c_sin])
    print_table(["d", "planted", "k rand", "k full", "eigh s", "eigh+est s", "randomized s",
                 "speedup", "eig rel err", "sin angle"], rows)
    if cuda_rows:
        print("\ncuda backend (the loop in C++), same matrices:")
        print_table(["d", "planted", "k cuda", "randomized s", "cuda s", "x vs randomized",
                     "x vs eigh+est", "eig rel err", "sin angle"], cuda_rows)
    summary = [dict(shape=f"d={r['d']} k={r['planted']}", rmtkd_s=r["randomized_s"],
                    baseline_s=r["eigh_plus_estimator_s"],
                    note=f"vs eigh+estimator; k {r['k_randomized']}/{r['k_full_fp64']}, "
                         f"sin {r['sin_angle']:.1e}") for r in records]
    summary += [dict(shape=f"cuda d={r['d']} k={r['planted']}", rmtkd_s=r["cuda_s"],
                     baseline_s=r["eigh_plus_estimator_s"],
                     note=f"C++ loop; {r['speedup_cuda_vs_randomized']:.2f}x the Python loop")
                for r in records if "cuda_s" in r]
    path = write_json("eigen_gpu" if device.type == "cuda" else "eigen_smoke",
                      {"machine": machine_info(), "device": str(device), "results": records,
                       "cuda_ext": ext_why or "built",
                       "summary": summary})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
