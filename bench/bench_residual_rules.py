"""The residual-stream cut on SmolLM2-135M, cut only (no distillation): rmtkd's one basis
for the whole model against SliceGPT's rule (a basis per block, the same slicing fraction
for every block), at equal width k.

Both rotate the stream into the eigenbasis of the second moment of the RMS-normalised norm
inputs (calibration: the first ``--calib-tokens`` of the job's calibration text):

- ``global`` (rmtkd, :mod:`rmtkd.reduce.residual`): one basis from every norm input pooled;
  the cut model is the stock class with ``hidden_size = k``.
- ``per-block`` (SliceGPT, arXiv 2401.15024): block l's basis from its own two norm
  inputs, the head's from the final norm's input; between blocks the stream changes basis
  through a (k x k) matrix Q_l^T Q_(l+1) on the residual path (30 more k x k matrices).

Each is evaluated as the equivalent projection of the original model (stream projected
onto span(Q_l) entering block l and after each of its sub-layers; with the tied head, onto
span(Q_0) before the head), which is what the sliced model computes; held-out perplexity
on the budget's slice and the held-out documents, as ``bench/bench_smollm2.py``.

    python bench/bench_residual_rules.py            # k = 504 and 432 (12.5%, 25% sliced)
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", default="504,432")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    a = ap.parse_args()

    import torch
    from transformers import LlamaForCausalLM

    from rmtkd.engine import CompressConfig
    from rmtkd.engine.blockwise import load_tokenizer, split_tokens
    from rmtkd.examples import smollm2
    from rmtkd.llm import token_sequences
    from rmtkd.reduce.residual import basis_of, second_moment

    t_start = time.perf_counter()
    md = smollm2.model_dir()
    model = LlamaForCausalLM.from_pretrained(str(md), dtype=torch.float32).eval()
    tok = load_tokenizer(md)
    calib_text, held_docs = smollm2.texts()
    seqs = token_sequences(calib_text, 128, tokenizer=tok)
    cfg = CompressConfig().resolved("blockwise")
    cal, slice_ = split_tokens(seqs, cfg)
    cal = cal[: math.ceil(a.calib_tokens / 128)]
    docs = token_sequences(held_docs, 128, max_tokens=a.eval_tokens, tokenizer=tok)
    layers = model.model.layers
    L, d = len(layers), model.config.hidden_size
    moments = [torch.zeros(d, d, dtype=torch.float64) for _ in range(L + 1)]

    def feeder(i):
        def feed(_m, args):
            moments[i].add_(second_moment(args[0].detach())[0])
        return feed

    hooks = [n.register_forward_pre_hook(feeder(i)) for i, layer in enumerate(layers)
             for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    hooks.append(model.model.norm.register_forward_pre_hook(feeder(L)))
    with torch.no_grad():
        for i in range(0, cal.shape[0], 8):
            model(input_ids=cal[i:i + 8])
    for h in hooks:
        h.remove()
    per_block = [basis_of(m)[1] for m in moments]
    pooled = basis_of(sum(moments))[1]

    def ppl(ids, bases, k):
        P = [(b[:, :k] @ b[:, :k].T).float() for b in bases]
        hs = [model.model.embed_tokens.register_forward_hook(lambda _m, _a, o: o @ P[0])]
        for i, layer in enumerate(layers):
            hs.append(layer.register_forward_pre_hook(
                lambda _m, args, kw, i=i: (args, {**kw, "hidden_states":
                                                  kw["hidden_states"] @ P[i]})
                if "hidden_states" in kw else ((args[0] @ P[i],) + args[1:], kw),
                with_kwargs=True))
            hs.append(layer.self_attn.o_proj.register_forward_hook(
                lambda _m, _a, o, i=i: o @ P[i]))
            hs.append(layer.mlp.down_proj.register_forward_hook(
                lambda _m, _a, o, i=i: o @ P[i]))
        hs.append(model.model.norm.register_forward_pre_hook(lambda _m, args: (args[0] @ P[L],)))
        hs.append(model.lm_head.register_forward_pre_hook(lambda _m, args: (args[0] @ P[0],)))
        nll = n = 0.0
        try:
            with torch.no_grad():
                for i in range(0, ids.shape[0], 8):
                    x = ids[i:i + 8]
                    lg = model(input_ids=x).logits
                    nll += float(torch.nn.functional.cross_entropy(
                        lg[:, :-1].reshape(-1, lg.shape[-1]), x[:, 1:].reshape(-1),
                        reduction="sum"))
                    n += x[:, 1:].numel()
        finally:
            for h in hs:
                h.remove()
        return math.exp(nll / n)

    def n_params(k, shortcuts):
        p = model.config.vocab_size * k + k * k   # tied table + final-norm mix
        for layer in layers:
            a_, m = layer.self_attn, layer.mlp
            p += k * (a_.q_proj.out_features + a_.k_proj.out_features
                      + a_.v_proj.out_features) + a_.o_proj.in_features * k
            p += 3 * k * m.gate_proj.out_features + 2 * k
        return p + k + (L * k * k if shortcuts else 0)

    orig = {"slice": ppl(slice_, [torch.eye(d, dtype=torch.float64)] * (L + 1), d),
            "docs": ppl(docs, [torch.eye(d, dtype=torch.float64)] * (L + 1), d)}
    rows = []
    for k in [int(x) for x in a.widths.split(",")]:
        for rule, bases, short in (("global (rmtkd)", [pooled] * (L + 1), False),
                                   ("per-block (SliceGPT)", per_block, True)):
            r = {"k": k, "rule": rule, "params": n_params(k, short),
                 "ppl_slice": ppl(slice_, bases, k), "ppl_docs": ppl(docs, bases, k)}
            rows.append(r)
            print(r, flush=True)
    total = sum(p.numel() for p in model.parameters())
    print(f"original: {total:,} parameters, ppl slice {orig['slice']:.3f}, "
          f"docs {orig['docs']:.3f}")
    path = write_json("residual_rules", {
        "machine": machine_info(), "settings": vars(a), "params_original": total,
        "original": orig, "rows": rows, "seconds": time.perf_counter() - t_start,
        "command": "python bench/bench_residual_rules.py " + " ".join(sys.argv[1:])})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
