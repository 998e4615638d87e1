"""Greedy tokens/s at batch 1 of a saved rmtkd LLM against the original SmolLM2, the
models' generations interleaved (``rmtkd.report.paired_medians``, the same protocol as
``rmtkd.llm.compare_models``) at each thread count; ``--padded`` loads the model with
compact value heads (``modeling_rmtkd.COMPACT_VALUES = True``; the job must have kept one
width per block, i.e. run with it on) and adds the same weights with zero-padded value
heads: what compact heads buy on their own. Writes bench/results/llm-decode-*.json:

    python bench/bench_llm_decode.py /tmp/smol16 --threads 2 1 [--padded]
"""
import argparse
import sys
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

import rmtkd
from rmtkd.engine.blockwise import load_tokenizer
from rmtkd.examples import smollm2
from rmtkd.hf import modeling_rmtkd
from rmtkd.llm import count_params, token_sequences
from rmtkd.llm.evaluate import greedy_generation
from rmtkd.report import paired_medians

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_json  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("model", help="a directory written by rmtkd (compress-llm --out)")
p.add_argument("--threads", type=int, nargs="+", default=[2, 1])
p.add_argument("--new-tokens", type=int, default=32)
p.add_argument("--prompt-len", type=int, default=16)
p.add_argument("--rounds", type=int, default=15)
p.add_argument("--padded", action="store_true",
               help="also time the same weights with zero-padded value heads")
a = p.parse_args()
md = smollm2.model_dir()
seqs = token_sequences(smollm2.texts()[1], 128, max_tokens=2048, tokenizer=load_tokenizer(md))
prompt = seqs[0, :a.prompt_len]
modeling_rmtkd.COMPACT_VALUES = a.padded
models = {"before": LlamaForCausalLM.from_pretrained(str(md), dtype=torch.float32).eval(),
          "after": rmtkd.load(a.model).float().eval()}
if a.padded:
    modeling_rmtkd.COMPACT_VALUES = False
    models["after_padded"] = rmtkd.load(a.model).float().eval()
    compact = [getattr(m.self_attn.v_proj, "compact", None)
               for m in models["after"].model.layers]
    print(f"compact value heads in {sum(bool(c) for c in compact)} of {len(compact)} blocks")
params = {k: count_params(m) for k, m in models.items()}
rows = []
for th in a.threads:
    torch.set_num_threads(th)
    gens = {k: greedy_generation(m, prompt, new_tokens=a.new_tokens) for k, m in models.items()}
    with torch.no_grad():
        ms = paired_medians(gens, passes=a.rounds, warmup=1)
    tps = {k: a.new_tokens / (v / 1e3) for k, v in ms.items()}
    row = {"threads": th, "params": params, "tokens_per_s": tps,
           "ratio": tps["after"] / tps["before"]}
    if a.padded:
        row["ratio_padded"] = tps["after_padded"] / tps["before"]
        row["compact_over_padded"] = tps["after"] / tps["after_padded"]
    rows.append(row)
    print(f"threads {th}: " + "; ".join(f"{k} {params[k]:,} params {v:.2f} tokens/s"
                                        for k, v in tps.items())
          + f"; after/before {row['ratio']:.3f}x"
          + (f", padded/before {row['ratio_padded']:.3f}x" if a.padded else ""), flush=True)
print("wrote", write_json("llm-decode", {"machine": machine_info(), "model": str(a.model),
                                         "new_tokens": a.new_tokens,
                                         "prompt_len": a.prompt_len, "rounds": a.rounds,
                                         "rows": rows,
                                         "command": "python bench/bench_llm_decode.py "
                                         + " ".join(sys.argv[1:])}))
