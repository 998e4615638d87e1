"""Spike detection on the CPU: rmtkd.spikes(solver="auto") vs torch.linalg.eigh + the same
estimator, on planted models, with the accuracy against a float64 eigh.

    python bench/bench_spikes_cpu.py [--quick] [--repeats N]

d in {2048, 4096} (and the small widths that set solver="auto"'s switch-over: the
randomized column), 16-128
planted spikes, gamma = 0.25, fp32 covariance. The baseline is solver="full": exactly
torch.linalg.eigh on the same matrix followed by the same estimator and spike selection.
Writes bench/results/spikes_cpu-<host>-<stamp>.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, median_interleaved, print_table, write_json  # noqa: E402

import rmtkd  # noqa: E402
from rmtkd.spectral import bbp_threshold  # noqa: E402
from rmtkd.spectral.synthetic import spiked_samples  # noqa: E402


def planted_cov(d: int, k: int, gamma: float = 0.25, seed: int = 0) -> tuple[torch.Tensor, int]:
    """fp32 covariance of n = d / gamma samples with k spikes from 3x to 30x the BBP threshold."""
    n = int(d / gamma)
    thetas = bbp_threshold(gamma) * np.geomspace(30.0, 3.0, k)
    x = spiked_samples(d, n, thetas, seed=seed, dtype=torch.float32).x
    x = x - x.mean(0)
    return x.T @ x / n, n


def accuracy(fit, c: torch.Tensor) -> dict:
    """Spike eigenvalue relative error and subspace sine against a float64 eigh."""
    vals, vecs = torch.linalg.eigh(c.double())
    vals, vecs = vals.flip(0)[: fit.k], vecs.flip(1)[:, : fit.k]
    if fit.k == 0:
        return {"eig_rel_err": 0.0, "sin_angle": 0.0}
    rel = np.max(np.abs(fit.spike_eigenvalues - vals.numpy()) / vals.numpy())
    u = torch.linalg.qr(fit.eigenvectors.double())[0]
    sin = torch.linalg.matrix_norm(u - vecs @ (vecs.T @ u), ord=2)
    return {"eig_rel_err": float(rel), "sin_angle": float(sin)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small widths only (smoke run)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    cases = ([(256, 16), (512, 16)] if args.quick else
             [(256, 16), (512, 16), (512, 64), (1024, 16), (1024, 64), (2048, 16), (2048, 64), (2048, 128),
              (4096, 16), (4096, 64), (4096, 128)])
    rows, records = [], []
    for d, k in cases:
        c, n = planted_cov(d, k)
        fns = {"eigh+estimator": lambda: rmtkd.spikes(c, n, solver="full"),
               "randomized": lambda: rmtkd.spikes(c, n, solver="randomized"),
               "rmtkd auto": lambda: rmtkd.spikes(c, n, solver="auto")}
        reps = args.repeats if d < 4096 else max(3, args.repeats - 2)
        t = median_interleaved(fns, repeats=reps)
        fit = rmtkd.spikes(c, n, solver="auto")
        base = rmtkd.spikes(c, n, solver="full")
        acc = accuracy(fit, c)
        ratio = t["eigh+estimator"]["median_s"] / t["rmtkd auto"]["median_s"]
        rows.append([d, k, fit.k, base.k, fit.solver, t["eigh+estimator"]["median_s"],
                     t["randomized"]["median_s"], t["rmtkd auto"]["median_s"], ratio,
                     acc["eig_rel_err"], acc["sin_angle"]])
        records.append(dict(d=d, n=n, planted=k, k_auto=fit.k, k_full=base.k,
                            solver=fit.solver, sigma2_auto=fit.sigma2, sigma2_full=base.sigma2,
                            times=t, speedup=ratio, **acc, info=fit.info))
    print_table(["d", "planted", "k auto", "k full", "auto solver", "eigh+est s",
                 "randomized s", "auto s", "speedup", "eig rel err", "sin angle"], rows)
    path = write_json("spikes_cpu", {"machine": machine_info(), "results": records})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
