"""CPU benchmark: ``CovarianceAccumulator.update`` vs ``X.T @ X`` + ``X.sum(0)`` in torch.

The accumulator already holds one batch, so each timed call is a steady-state update: shift
by the running mean, shifted Gram + column sums, finiteness check and pairwise merge. The
baseline is the bare unshifted product a naive implementation would do. Both are timed in the
same run, interleaved, and reported as a ratio (baseline / rmtkd; > 1 means rmtkd is faster).

    python bench/bench_covariance_cpu.py            # n = 16384, d in {1024, 2048, 4096}
    python bench/bench_covariance_cpu.py --quick    # small smoke run
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, median_interleaved, print_table, write_json  # noqa: E402

from rmtkd.ops.covariance import CovarianceAccumulator, _cpu_method  # noqa: E402


def bench_one(n: int, d: int, repeats: int, seed: int = 0) -> dict:
    """Time one shape; also check the timed path against the fp32 baseline's covariance."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)  # n*d*4 bytes >> last-level cache at full size
    acc = CovarianceAccumulator(d, backend="torch")
    acc.update(x)

    def baseline() -> None:
        x.T @ x
        x.sum(0)

    def rmtkd() -> None:
        acc.update(x)

    t = median_interleaved({"baseline": baseline, "rmtkd": rmtkd}, repeats=repeats)
    # Zero-mean data, so the unshifted fp32 formula is accurate enough to check against.
    s = x.sum(0, dtype=torch.float64) / n
    ref = (x.T @ x).double() / n - torch.outer(s, s)
    out = CovarianceAccumulator(d).update(x).finalize().cov.double()
    rel_err = ((out - ref).norm() / ref.norm()).item()
    tb, tr = t["baseline"]["median_s"], t["rmtkd"]["median_s"]
    flops = 2.0 * n * d * d  # of the full product, so both rates are comparable
    return {"n": n, "d": d, "method": _cpu_method(n, d), "repeats": repeats,
            "baseline_s": tb, "rmtkd_s": tr, "ratio": tb / tr,
            "baseline_gflops": flops / tb / 1e9, "rmtkd_equiv_gflops": flops / tr / 1e9,
            "rel_err_vs_baseline": rel_err, "times": t}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small smoke run (n=4096, d=256,1024)")
    p.add_argument("--n", type=int, default=None, help="rows per batch (default 16384)")
    p.add_argument("--dims", type=int, nargs="+", default=None, help="widths d")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per shape (default 5)")
    p.add_argument("--no-json", action="store_true", help="do not write bench/results/*.json")
    args = p.parse_args(argv)

    n = args.n or (4096 if args.quick else 16384)
    dims = args.dims or ([256, 1024] if args.quick else [1024, 2048, 4096])
    repeats = args.repeats or (3 if args.quick else 5)
    info = machine_info()
    print(f"covariance update, fp32, n={n}; {info['cpu_model']} ({info['cpu_count']} cpus, "
          f"torch {info['torch']} threads={info['torch_num_threads']}, "
          f"scipy {info['scipy']} / {info.get('scipy_blas', '?')})")
    results = [bench_one(n, d, repeats) for d in dims]
    print_table(["d", "method", "baseline s", "rmtkd s", "ratio", "rel err"],
                [[r["d"], r["method"], r["baseline_s"], r["rmtkd_s"], round(r["ratio"], 2),
                  f"{r['rel_err_vs_baseline']:.1e}"] for r in results])
    if not args.no_json:
        path = write_json("covariance_cpu", {
            "bench": "covariance_cpu", "quick": args.quick, "dtype": "float32",
            "baseline": "X.T @ X + X.sum(0) (torch)",
            "rmtkd": "CovarianceAccumulator.update(X), steady state", "machine": info,
            "results": results})
        print(f"wrote {path}")
    bad = [r["d"] for r in results if not r["rel_err_vs_baseline"] < 1e-5]
    if bad:
        print(f"ERROR: covariance differs from the baseline at d={bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
