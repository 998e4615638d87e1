"""Print one summary table of the GPU benchmark results (the last step of gpu_suite.sh).

    python bench/summarize_gpu.py [--newer-than FILE]

Reads the newest covariance_gpu / projected_linear_gpu / eigen_gpu JSON under bench/results
and prints, per op and shape, the rmtkd time, the baseline time and the ratio.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, print_table  # noqa: E402


def newest(prefix: str, newer_than: float) -> dict | None:
    files = [p for p in RESULTS_DIR.glob(f"{prefix}-*.json") if p.stat().st_mtime > newer_than]
    return json.loads(max(files, key=lambda p: p.stat().st_mtime).read_text()) if files else None


def rows_of(prefix: str, data: dict) -> list[list]:
    """Rows (op, shape, rmtkd s, baseline s, ratio, note) from one benchmark's JSON: each
    benchmark stores a list under "summary" with those keys."""
    return [[prefix, r["shape"], r["rmtkd_s"], r["baseline_s"], r["baseline_s"] / r["rmtkd_s"],
             r.get("note", "")] for r in data.get("summary", [])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--newer-than", type=Path, help="only results written after this file")
    args = ap.parse_args()
    since = args.newer_than.stat().st_mtime if args.newer_than else 0.0
    rows, missing = [], []
    for prefix in ("covariance_gpu", "projected_linear_gpu", "eigen_gpu"):
        data = newest(prefix, since)
        if data is None:
            missing.append(prefix)
            continue
        device = data.get("machine", {}).get("cuda_device", "?")
        rows += rows_of(prefix, data)
    if rows:
        print(f"device: {device}")
        print_table(["op", "shape", "rmtkd s", "baseline s", "speedup", "note"], rows)
    if missing:
        print(f"no results from: {', '.join(missing)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
