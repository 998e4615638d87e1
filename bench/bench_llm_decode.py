"""Greedy tokens/s at batch 1 of a saved rmtkd LLM against the original SmolLM2, measured
interleaved (``rmtkd.llm.compare_models``) at each thread count; writes
bench/results/llm-decode-*.json:

    python bench/bench_llm_decode.py /tmp/smol16 --threads 2 1
"""
import argparse
import sys
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

import rmtkd
from rmtkd.engine.blockwise import load_tokenizer
from rmtkd.examples import smollm2
from rmtkd.llm import compare_models, token_sequences

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_json  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("model", help="a directory written by rmtkd (compress-llm --out)")
p.add_argument("--threads", type=int, nargs="+", default=[2, 1])
p.add_argument("--new-tokens", type=int, default=32)
a = p.parse_args()
md = smollm2.model_dir()
seqs = token_sequences(smollm2.texts()[1], 128, max_tokens=2048, tokenizer=load_tokenizer(md))
before = LlamaForCausalLM.from_pretrained(str(md), dtype=torch.float32).eval()
after = rmtkd.load(a.model).float().eval()
rows = []
for th in a.threads:
    torch.set_num_threads(th)
    c = compare_models(before, after, seqs, new_tokens=a.new_tokens)
    b, f = c["before"]["tokens_per_s"], c["after"]["tokens_per_s"]
    rows.append({"threads": th, "params_before": c["before"]["params"],
                 "params_after": c["after"]["params"], "tokens_per_s_before": b,
                 "tokens_per_s_after": f, "ratio": f / b})
    print(f"threads {th}: params {c['before']['params']:,} -> {c['after']['params']:,}; "
          f"tokens/s {b:.2f} -> {f:.2f} ({f / b:.3f}x)", flush=True)
print("wrote", write_json("llm-decode", {"machine": machine_info(), "model": str(a.model),
                                         "new_tokens": a.new_tokens, "rows": rows}))
