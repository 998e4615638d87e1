"""SmolLM2's tied embedding / head at rank k, cut only: is the embedding rank worth offering
to decoders whose head is tied to the token table?

The table E (V x d) serves the input embedding and the output head (logits = h E^T), so a
rank-k table E P (P = B B^T, B: d x k) changes both. Two bases: the top-k eigenvectors of
the embedding output over the calibration tokens (the rule of ``embedding_rank``: token
frequency weights, mean-centred, its MP k from n = the distinct tokens) and those of the
head input (the final norm's outputs over the calibration tokens). Prints and writes the
held-out perplexity per k and the table's parameters (V k + k d factorised).

    python bench/bench_tied_embedding.py
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_table, write_json  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib-tokens", type=int, default=128 * 64)
    p.add_argument("--eval-tokens", type=int, default=128 * 8)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()

    import torch
    from transformers import LlamaForCausalLM

    from rmtkd.engine.blockwise import load_tokenizer
    from rmtkd.examples import smollm2
    from rmtkd.llm import perplexity, token_sequences
    from rmtkd.spectral.fit import analyze

    if a.threads:
        torch.set_num_threads(a.threads)
    d_path = smollm2.model_dir(progress=False)
    tok = load_tokenizer(d_path)
    calib, held = smollm2.texts()
    cs = token_sequences(calib, 128, max_tokens=a.calib_tokens, tokenizer=tok)
    hs = token_sequences(held, 128, max_tokens=a.eval_tokens, tokenizer=tok)
    model = LlamaForCausalLM.from_pretrained(str(d_path), dtype=torch.float32).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    E = model.model.embed_tokens.weight.detach().double().clone()
    V, D = E.shape

    ids, counts = cs.flatten().unique(return_counts=True)
    w = counts.double() / counts.sum()
    mu = (w[:, None] * E[ids]).sum(0)
    X = E[ids] - mu
    ev, U = torch.linalg.eigh((X.T * w) @ X)
    ev, U = ev.flip(0), U.flip(1)
    mp_emb = analyze(ev.numpy(), n=int(ids.numel())).k
    with torch.no_grad():
        H = torch.cat([model.model(input_ids=cs[i:i + 4]).last_hidden_state.reshape(-1, D)
                       for i in range(0, min(16, cs.shape[0]), 4)]).double()
    evh, Uh = torch.linalg.eigh(H.T @ H / H.shape[0])
    evh, Uh = evh.flip(0), Uh.flip(1)
    mp_head = analyze(evh.numpy(), n=H.shape[0]).k
    with torch.no_grad():
        base = perplexity(model, hs)

    rows = []
    for k in sorted({D, 512, 448, 384, 320, 256, mp_emb}, reverse=True):
        for basis, B in (("embedding output", U[:, :k]), ("head input", Uh[:, :k])):
            P = B @ B.T
            Ek = mu + (E - mu) @ P if basis == "embedding output" else E @ P
            with torch.no_grad():
                model.model.embed_tokens.weight.copy_(Ek.float())
                ppl = perplexity(model, hs)
                model.model.embed_tokens.weight.copy_(E.float())
            rows.append({"k": k, "basis": basis, "ppl": ppl, "ratio": ppl / base,
                         "table_params": V * D if k == D else V * k + k * D})
    print(f"SmolLM2 tied table {V} x {D}; MP k: embedding output {mp_emb} (n = "
          f"{ids.numel()} distinct tokens), head input {mp_head} (n = {H.shape[0]}); "
          f"original perplexity {base:.3f} on {hs.numel()} held-out tokens")
    print_table(["k", "basis", "table parameters", "perplexity", "ratio"],
                [[r["k"], r["basis"], f"{r['table_params']:,}", f"{r['ppl']:.3f}",
                  f"{r['ratio']:.3f}x"] for r in rows])
    print("wrote", write_json("tied-embedding", {
        "machine": machine_info(), "vocab": V, "hidden": D, "mp_k_embedding": mp_emb,
        "mp_k_head_input": mp_head, "distinct_tokens": int(ids.numel()),
        "eval_tokens": int(hs.numel()), "original_ppl": base, "rows": rows,
        "command": "python bench/bench_tied_embedding.py"}))


if __name__ == "__main__":
    main()
