"""The issue-3 demonstrations: `rmtkd compress --example NAME` (default settings) per seed.

Each run is the CLI itself (teacher trained from scratch, or loaded for minilm; compressed
with the default config and the example's own settings; the validation split decides the
roll-backs, the test split is reported), timed end to end. Prints one row per run and writes
bench/results/compress_examples-<host>-<time>.json with every report.json summary.

    python bench/bench_compress_examples.py --example digits-mlp --seeds 0 1 2
    python bench/bench_compress_examples.py --example mnist-cnn --seeds 0
    python bench/bench_compress_examples.py --example digits-mlp -- --epsilon 1 --past-edge 2

Arguments after ``--`` go to ``rmtkd compress`` as they are (recorded in the JSON).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_table, write_json  # noqa: E402


def run(example: str, seed: int, threads: int, extra: list[str]) -> dict:
    from rmtkd.cli import main

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="rmtkd-bench-") as tmp:
        out = Path(tmp) / "report"
        t0 = time.perf_counter()
        main(["compress", "--example", example, "--seed", str(seed), "--quiet",
              "--out", str(out), *extra])
        wall = time.perf_counter() - t0
        report = json.loads((out / "report.json").read_text())
    s = report["summary"]
    return {"example": example, "seed": seed, "wall_seconds": wall,
            "summary": {k: v for k, v in s.items() if k != "table"}, "table": s["table"],
            "steps": [{"site": h["site"], "d": h["d"], "k": h["k"], "mp_k": h.get("mp_k"),
                       "share": h.get("share"), "status": h["status"],
                       "metric_reduced": h["metric_reduced"], "metric_after": h["metric_after"]}
                      for h in report["history"]],
            "teacher": report["meta"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--example", default="digits-mlp")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("cli_args", nargs="*", help="after --: passed to rmtkd compress")
    args = ap.parse_args(argv)
    runs = [run(args.example, seed, args.threads, args.cli_args) for seed in args.seeds]
    rows = []
    for r in runs:
        s = r["summary"]
        rows.append([r["seed"], f"{s['original_params']:,}", f"{s['final_params']:,}",
                     f"{100 * s['reduction']:.1f}", f"{s['test_metric_before']:.2f}",
                     f"{s['test_metric_after']:.2f}",
                     f"{s['test_metric_after'] - s['test_metric_before']:+.2f}",
                     f"{s['latency_ms_before'] / s['latency_ms_after']:.2f}x",
                     " ".join(f"{t['d']}->{t['k']}(MP {t['mp_k']})"
                              f"{'' if t['status'] == 'applied' else '*'}"
                              for t in r["steps"]),
                     f"{r['wall_seconds']:.0f}"])
    headers = ["seed", "params", "after", "reduction %", "test before", "test after", "delta",
               "latency speedup (b=1)", "d->k per site (* = not applied)", "job s"]
    print_table(headers, rows)
    path = write_json("compress_examples", {
        "bench": "compress_examples", "example": args.example, "seeds": args.seeds,
        "cli_args": args.cli_args,
        "command": "python bench/bench_compress_examples.py "
                   + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(), "runs": runs, "table": {"headers": headers, "rows": rows}})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
