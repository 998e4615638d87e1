"""The Rotten Tomatoes example as a user runs it: ``rmtkd compress --example rotten-tomatoes``
(the fine-tuned MiniLM teacher and the CSV splits are made once and cached; the job is
``rmtkd compress --model DIR --data train.csv --eval-data validation.csv --test-data
test.csv`` with the task defaults), optionally with ``--onnx``. Records parameters (total
and in the transformer blocks), test accuracy, CPU latency, wall time of the whole command
and of the compression, per-site k.

    python bench/bench_rotten_tomatoes.py [--onnx] [--config job.toml] [--tag NAME] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--onnx", action="store_true")
    ap.add_argument("--config", type=Path, help="a job file with [compress] overrides")
    ap.add_argument("--tag", default="")
    ap.add_argument("--keep", type=Path, help="copy the compressed model directory here")
    a = ap.parse_args()

    from rmtkd.cli import main as rmtkd_main
    from rmtkd.examples import rotten_tomatoes

    teacher = rotten_tomatoes.teacher_dir()   # made once (not timed with the job)
    with tempfile.TemporaryDirectory(prefix="bench-rt-") as tmp:
        out = Path(tmp) / "out"
        argv = ["compress", "--example", "rotten-tomatoes", "--out", str(out), "--quiet"]
        argv += ["--onnx"] * a.onnx + (["--config", str(a.config)] if a.config else [])
        t0 = time.perf_counter()
        rmtkd_main(argv)
        wall = time.perf_counter() - t0
        report = json.loads((out / "report.json").read_text())
        if a.keep:
            shutil.copytree(out, a.keep, dirs_exist_ok=True)
    s = report["summary"]
    summary = {k: s[k] for k in ("original_params", "final_params", "reduction",
                                 "block_params_before", "block_params_after",
                                 "test_metric_before", "test_metric_after",
                                 "val_metric_before", "val_metric_after",
                                 "latency_ms_before", "latency_ms_after", "seconds")}
    summary["block_reduction"] = 1 - s["block_params_after"] / s["block_params_before"]
    summary["test_points"] = s["test_metric_after"] - s["test_metric_before"]
    summary["wall_seconds"] = wall
    if "onnx" in s:
        summary["onnx"] = {str(b): r for b, r in s["onnx"]["batches"].items()}
    sites = [{"site": r["site"], "d": r["d"], "k": r["k"], "mp_k": r.get("mp_k"),
              "share": r.get("share"), "status": r["status"], "reason": r["reason"],
              "metric_after": r["metric_after"], "seconds": r["seconds"]}
             for r in report["history"]]
    for k, v in summary.items():
        print(f"{k}: {v}")
    teacher_meta = json.loads((teacher / "rmtkd_teacher.json").read_text())
    path = write_json(f"rotten_tomatoes{'-' + a.tag if a.tag else ''}", {
        "machine": machine_info(), "settings": vars(a) | {"config": str(a.config)},
        "teacher": teacher_meta, "config": report["meta"]["config"], "summary": summary,
        "sites": sites, "command": "python bench/bench_rotten_tomatoes.py "
        + " ".join(sys.argv[1:])})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
