"""SmolLM2: what a final KL distillation on the logits wins back after the block-wise cut
(an experiment, issue 15; not yet part of the budget). Two steps, run one after the other:

    python bench/bench_smollm2_kl.py cut 1.5 /tmp/smol15 res     # block-wise, budget 1.5, residual cut
    python bench/bench_smollm2_kl.py kd /tmp/smol15 200 3e-5 0 8  # steps, lr, extra seqs, batch

``kd`` distils the saved model on the original's log-probabilities (precomputed, fp16) over
the 128 calibration sequences plus ``extra`` further sequences of the calibration documents
(never the budget slice's 16 sequences, never the held-out documents), and prints the
perplexity on the budget slice and on the held-out documents every 50 steps.
"""
import sys

if sys.argv[1] == "cut":
    sys.argv = sys.argv[1:]
    import time
    from pathlib import Path
    from rmtkd.engine import BlockwiseSettings, CompressConfig, compress_blockwise, format_blocks
    from rmtkd.examples import smollm2
    ratio = float(sys.argv[1]); out = Path(sys.argv[2]); residual = len(sys.argv) > 3
    model_dir = smollm2.model_dir()
    calib, held = smollm2.texts()
    cfg = CompressConfig(blockwise=BlockwiseSettings(ppl_ratio=ratio, residual=residual))
    t0 = time.perf_counter()
    res = compress_blockwise(model_dir, calib, out=out, config=cfg)
    print(format_blocks(res)); print("params", res.params_before, res.params_after, "ppl", res.original_ppl, res.final_ppl, "s", time.perf_counter()-t0)
else:
    sys.argv = sys.argv[1:]
    import time
    from pathlib import Path
    import torch, torch.nn.functional as F
    import rmtkd
    from transformers import LlamaForCausalLM
    from rmtkd.engine import CompressConfig
    from rmtkd.engine.blockwise import load_tokenizer, split_tokens
    from rmtkd.examples import smollm2
    from rmtkd.llm import token_sequences, perplexity
    out = Path(sys.argv[1]); steps = int(sys.argv[2]); lr = float(sys.argv[3]); n_extra = int(sys.argv[4]); bs = int(sys.argv[5]) if len(sys.argv) > 5 else 8
    torch.manual_seed(0)
    md = smollm2.model_dir(); tok = load_tokenizer(md)
    calib, held = smollm2.texts()
    seqs = token_sequences(calib, 128, tokenizer=tok)
    cal, budget = split_tokens(seqs, CompressConfig())   # the job's calibration and budget slice
    rest = seqs[cal.shape[0]:]
    mask = ~(rest[:, None, :] == budget[None]).all(-1).any(-1)   # rows not in the slice
    train = torch.cat([cal, rest[mask][:n_extra]])
    docs = token_sequences(held, 128, max_tokens=8192, tokenizer=tok)
    print("total seqs", seqs.shape[0], "train", train.shape[0], flush=True)
    teacher = LlamaForCausalLM.from_pretrained(str(md), dtype=torch.float32).eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        tl = torch.cat([teacher(input_ids=train[i:i+8]).logits.log_softmax(-1).half() for i in range(0, train.shape[0], 8)])
        p_t_b, p_t_d = perplexity(teacher, budget), perplexity(teacher, docs)
    print("teacher", p_t_b, p_t_d, "precompute s", time.perf_counter()-t0, flush=True)
    del teacher
    student = rmtkd.load(out).float()
    def ev(step):
        student.eval()
        pb, pd = perplexity(student, budget), perplexity(student, docs)
        student.train()
        print(f"step {step}: budget {pb:.3f} ({pb/p_t_b:.4f}x) docs {pd:.3f} ({pd/p_t_d:.4f}x) t {time.perf_counter()-t0:.0f}s", flush=True)
    ev(0)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s+1)/10) * max(0.0, 1 - s/steps))
    gen = torch.Generator().manual_seed(1)
    student.train()
    for s in range(steps):
        i = torch.randint(0, train.shape[0], (bs,), generator=gen)
        st = student(input_ids=train[i]).logits.float().log_softmax(-1)
        loss = F.kl_div(st.flatten(0,1), tl[i].float().flatten(0,1), log_target=True, reduction="batchmean")
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step(); sched.step()
        if s % 10 == 0: print(f"  {s} loss {loss.item():.4f} t {time.perf_counter()-t0:.0f}", flush=True)
        if (s+1) % 50 == 0: ev(s+1)
