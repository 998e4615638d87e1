"""Distillation with and without the teacher-output cache (rmtkd.distill.TeacherCache), on
the Rotten Tomatoes MiniLM classifier as the whole-model job distils it: the student is the
teacher with layer 0's MLP cut to its MP k, feature distillation on the 6 blocks, batches
of 32 training texts, ``--epochs`` passes over ``--batches`` batches. Times are medians of
``--repeats`` runs per variant, interleaved; the trained students are checked to be equal.

    python bench/bench_teacher_cache.py [--batches 30] [--epochs 2] [--repeats 2]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()

    import torch

    from rmtkd.adapters import adapter_for, block_modules
    from rmtkd.capture import collect_statistics
    from rmtkd.distill import TeacherCache, distill
    from rmtkd.engine import CompressConfig
    from rmtkd.engine.step import plan_cut, reduction
    from rmtkd.examples import rotten_tomatoes
    from rmtkd.hf.job import text_job
    from rmtkd.reduce import reduce_site
    from rmtkd.reduce.transformer import dim_site

    d = rotten_tomatoes.teacher_dir()
    files = rotten_tomatoes.data_files(d)
    job = text_job(d, files["train"], eval_data=files["validation"],
                   test_data=files["test"])
    teacher = job.hf.model.eval()
    batches = job.splits["train"][: a.batches]
    cfg = CompressConfig(solver="full")
    dim = adapter_for(teacher).select_dims(teacher, ["mlp_width"])[0]
    site = dim_site(dim, teacher)
    stats = collect_statistics(teacher, batches[:10], [site], progress=False)[site.name]
    student0 = copy.deepcopy(teacher)
    cut = plan_cut(site, stats, stats.n, cfg)
    reduce_site(student0, reduction(cut, cfg))
    features = [n for n, _ in block_modules(teacher)]
    times: dict[str, list[float]] = {"recompute": [], "cached": []}
    students = {}
    for _ in range(a.repeats):
        for name in times:
            torch.manual_seed(0)
            student = copy.deepcopy(student0)
            cache = TeacherCache(2**31) if name == "cached" else None
            t0 = time.perf_counter()
            distill(student, teacher, batches, epochs=a.epochs, lr=1e-4, warmup_steps=5,
                    progress=False, features=features, teacher_cache=cache)
            times[name].append(time.perf_counter() - t0)
            students[name] = student
    same = all(torch.equal(x, y) for x, y in zip(students["recompute"].parameters(),
                                                 students["cached"].parameters()))
    med = {k: statistics.median(v) for k, v in times.items()}
    summary = {"median_seconds": med, "speedup": med["recompute"] / med["cached"],
               "students_equal": same, "k": cut.k, "d": cut.d, "steps": a.batches * a.epochs}
    print(summary)
    path = write_json("teacher_cache", {"machine": machine_info(), "settings": vars(a),
                                        "times": times, "summary": summary,
                                        "command": "python bench/bench_teacher_cache.py "
                                        + " ".join(sys.argv[1:])})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
