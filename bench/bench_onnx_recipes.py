"""ONNX export recipes at batch 1 on CPU: the Rotten Tomatoes teacher and a compressed
student (a directory written by ``rmtkd compress``), each exported with the model's SDPA
attention (what ``rmtkd.hf.onnx.export_onnx`` does) and with eager attention, each file run
by ONNX Runtime as is and after ``onnxruntime.transformers.optimizer`` (BERT fusions,
portable level 0). Every session's runs are interleaved (``rmtkd.report.paired_medians``),
so the ratios compare the same moments. Writes bench/results/onnx-recipes-*.json:

    python bench/bench_onnx_recipes.py /tmp/rtkeep/model [--seq 38] [--passes 40]
"""
import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification

import rmtkd
from rmtkd.examples import rotten_tomatoes
from rmtkd.hf.onnx import export_onnx
from rmtkd.report import paired_medians

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_json  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("student", type=Path)
p.add_argument("--seq", type=int, default=38)
p.add_argument("--passes", type=int, default=40)
p.add_argument("--threads", type=int, default=2)
a = p.parse_args()
import onnxruntime as ort  # noqa: E402
from onnxruntime.transformers import optimizer  # noqa: E402

warnings.filterwarnings("ignore")
torch.set_num_threads(a.threads)
g = torch.Generator().manual_seed(0)
example = {"input_ids": torch.randint(1000, 20000, (1, a.seq), generator=g),
           "attention_mask": torch.ones(1, a.seq, dtype=torch.long),
           "token_type_ids": torch.zeros(1, a.seq, dtype=torch.long)}
models = {"teacher": AutoModelForSequenceClassification.from_pretrained(
    str(rotten_tomatoes.teacher_dir())).eval(), "student": rmtkd.load(a.student).eval()}
cfg = models["teacher"].config
opts = ort.SessionOptions()
opts.intra_op_num_threads, opts.inter_op_num_threads = a.threads, 1
opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
fns, errors = {}, {}
with tempfile.TemporaryDirectory() as tmp:
    for name, model in models.items():
        with torch.no_grad():
            want = model(**example).logits.numpy()
        for attn in ("sdpa", "eager"):
            model.set_attn_implementation(attn)
            path = export_onnx(model, Path(tmp) / f"{name}-{attn}.onnx", example)
            fused = Path(tmp) / f"{name}-{attn}-fused.onnx"
            optimizer.optimize_model(str(path), model_type="bert",
                                     num_heads=cfg.num_attention_heads,
                                     hidden_size=cfg.hidden_size,
                                     opt_level=0).save_model_to_file(str(fused))
            for recipe, f in ((attn, path), (f"{attn}+fused", fused)):
                s = ort.InferenceSession(str(f), sess_options=opts,
                                         providers=["CPUExecutionProvider"])
                feeds = {i.name: example[i.name].numpy() for i in s.get_inputs()}
                errors[f"{name}/{recipe}"] = float(np.abs(s.run(None, feeds)[0] - want).max())
                fns[f"{name}/{recipe}"] = (lambda s=s, feeds=feeds:
                                           [s.run(None, feeds) for _ in range(10)])
        model.set_attn_implementation("sdpa")
    ms = {k: v / 10 for k, v in paired_medians(fns, passes=a.passes, warmup=3).items()}
recipes = sorted({k.split("/")[1] for k in ms})
rows = []
for r in recipes:
    t, s = ms[f"teacher/{r}"], ms[f"student/{r}"]
    rows.append({"recipe": r, "teacher_ms": t, "student_ms": s, "ratio": t / s,
                 "max_abs_err_teacher": errors[f"teacher/{r}"],
                 "max_abs_err_student": errors[f"student/{r}"]})
    print(f"{r:12s} teacher {t:6.2f} ms  student {s:6.2f} ms  {t / s:.3f}x  "
          f"(|logit err| {errors[f'teacher/{r}']:.1e} / {errors[f'student/{r}']:.1e})")
best_t = min(ms[f"teacher/{r}"] for r in recipes)
best_s = min(ms[f"student/{r}"] for r in recipes)
print(f"each model's fastest recipe: {best_t:.2f} -> {best_s:.2f} ms ({best_t / best_s:.3f}x)")
print("wrote", write_json("onnx-recipes", {
    "machine": machine_info(), "student": str(a.student), "seq": a.seq, "passes": a.passes,
    "threads": a.threads, "rows": rows, "best_ratio": best_t / best_s,
    "command": "python bench/bench_onnx_recipes.py " + " ".join(sys.argv[1:])}))
