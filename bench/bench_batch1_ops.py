"""Where the batch-1 CPU time of a (compressed) BERT classifier goes: the torch profiler's
self time per operator, the matmuls (``aten::addmm``) against everything else, for the
Rotten Tomatoes teacher and each model directory given (an ``rmtkd.save`` directory or a
Hugging Face one), on one random sequence of ``--seq`` tokens, 2 threads.

    python bench/bench_batch1_ops.py DIR [DIR ...] [--seq 38] [--passes 100]

The latency of each model is measured by :func:`rmtkd.report.paired_medians` (all models'
passes interleaved), so the ratios are taken at the same moments on a shared machine.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_json  # noqa: E402


def load(path: str):
    """An ``rmtkd.save`` directory, else a Hugging Face sequence-classification one."""
    from transformers import AutoModelForSequenceClassification

    from rmtkd import load as rmtkd_load

    try:
        return rmtkd_load(path).eval()
    except Exception:   # not the rmtkd.save format
        return AutoModelForSequenceClassification.from_pretrained(path).eval()


def op_table(model, example: dict, passes: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        for _ in range(20):
            model(**example)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(passes):
                model(**example)
    rows = {e.key: e.self_cpu_time_total / passes / 1e3 for e in prof.key_averages()}
    total = sum(rows.values())
    top = dict(sorted(rows.items(), key=lambda kv: -kv[1])[:8])
    return {"profiled_ms_per_pass": total, "addmm_ms": rows.get("aten::addmm", 0.0),
            "other_ms": total - rows.get("aten::addmm", 0.0), "top_ops_ms": top}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--seq", type=int, default=38)
    ap.add_argument("--passes", type=int, default=100)
    a = ap.parse_args()

    import torch

    from rmtkd.examples import rotten_tomatoes
    from rmtkd.report import paired_medians

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    example = {"input_ids": torch.randint(1000, 20000, (1, a.seq), generator=g),
               "attention_mask": torch.ones(1, a.seq, dtype=torch.long),
               "token_type_ids": torch.zeros(1, a.seq, dtype=torch.long)}
    models = {"teacher": load(str(rotten_tomatoes.teacher_dir(progress=False)))}
    models.update({m: load(m) for m in a.models})
    with torch.inference_mode():
        lat = paired_medians({k: (lambda m=m: m(**example)) for k, m in models.items()},
                             passes=200)
    out = {}
    for name, m in models.items():
        row = {"params": sum(p.numel() for p in m.parameters()), "latency_ms": lat[name],
               "speedup": lat["teacher"] / lat[name], **op_table(m, example, a.passes)}
        out[name] = row
        print(f"{name}: {row['params']:,} params, {row['latency_ms']:.2f} ms "
              f"({row['speedup']:.2f}x); profiled {row['profiled_ms_per_pass']:.2f} ms: "
              f"addmm {row['addmm_ms']:.2f}, other {row['other_ms']:.2f}")
    path = write_json("batch1_ops", {"machine": machine_info(), "seq": a.seq,
                                     "models": out, "command": "python bench/bench_batch1_ops.py "
                                     + " ".join(sys.argv[1:])})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
