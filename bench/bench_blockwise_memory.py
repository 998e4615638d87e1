"""Issue 6: peak memory of block-wise LLM compression does not grow with the depth.

Builds random Llama models with L, 4L and 16L decoder layers (default L = 2, hidden 512,
intermediate 1376, 8 query / 4 key-value heads, vocab 32000: the 32-layer model is about
half a GB in fp32), saves each with ``save_pretrained`` to a temporary directory and, in a
fresh subprocess per model, runs ``rmtkd.engine.compress_blockwise`` on it (the
directory path: the model is read one block at a time) and records the child's peak RSS
and, with ``--device cuda``, its peak CUDA memory. The peak RSS is the child's ``VmHWM``
(``/proc/self/status``), its own high-water mark; ``ru_maxrss`` is recorded too, but Linux
carries the parent's peak over fork + exec into it, so it would show the benchmark parent
(which builds the models). For scale it also records, in another fresh subprocess, the
peak RSS of loading the same model whole (``LlamaForCausalLM.from_pretrained`` + one
forward pass, which touches every weight), and the peak RSS right after the imports
(torch, transformers' Llama modules, rmtkd's block-wise driver and surgery) in each child.

    python bench/bench_blockwise_memory.py                 # L = 2: 2, 8, 32 layers
    python bench/bench_blockwise_memory.py --layers 1 --calib-tokens 2048   # quicker
    python bench/bench_blockwise_memory.py --residual      # with the residual-stream cut

Writes bench/results/blockwise_memory-<host>-<UTC time>.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import gpu_info, machine_info, print_table, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
mode, model_dir, out, args = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
import torch
torch.set_num_threads(args["threads"])
import transformers  # noqa: F401
import transformers.masking_utils  # noqa: F401  (what the job imports lazily, so that
import transformers.models.llama.modeling_llama  # noqa: F401  the baseline holds it)
from rmtkd import engine
from rmtkd.reduce import transformer  # noqa: F401
from rmtkd.spectral import spikes  # noqa: F401


def hwm():
    # VmHWM: this process's own peak RSS (kB). ru_maxrss is not used: Linux carries the
    # parent's peak over fork + exec into it, so a child of a big parent reports that.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])


rss0 = hwm()
t0 = time.perf_counter()
info = {}
if mode == "compress":
    ids = torch.randint(0, args["vocab"], (args["calib_tokens"] // args["seq_len"],
                        args["seq_len"]), generator=torch.Generator().manual_seed(0))
    cfg = engine.CompressConfig(mode=args["mode"], distill_epochs=args["distill_epochs"],
                                progress=False, blockwise=engine.BlockwiseSettings(
                                    calib_tokens=args["calib_tokens"],
                                    seq_len=args["seq_len"], batch_size=args["batch_size"],
                                    device=args["device"], ppl_ratio=None,
                                    residual=args["residual"]))
    res = engine.compress_blockwise(model_dir, ids, out=out, config=cfg)
    info = {"params_before": res.params_before, "params_after": res.params_after,
            "residual_k": None if res.residual is None else res.residual["k"]}
elif mode == "load":
    m = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():   # touch every weight (they may be lazily mapped from the file)
        m(input_ids=torch.zeros(1, args["seq_len"], dtype=torch.long))
    info = {"params_before": sum(p.numel() for p in m.parameters())}
info["seconds"] = time.perf_counter() - t0
info["import_rss_mib"] = rss0 / 1024
info["peak_rss_mib"] = hwm() / 1024
info["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if torch.cuda.is_available() and args["device"].startswith("cuda"):
    info["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
print("RESULT " + json.dumps(info))
"""


def child(mode: str, model_dir: Path, out: Path, args: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, mode, str(model_dir), str(out),
                        json.dumps(args)], capture_output=True, text=True,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
                            "OMP_NUM_THREADS": str(args["threads"])})
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"child {mode} on {model_dir} failed ({r.returncode}):\n"
                           f"{r.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2, help="L: models get L, 4L, 16L layers")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--distill-epochs", type=int, default=1)
    ap.add_argument("--mode", default="width", choices=("width", "project"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--residual", action="store_true",
                    help="cut the residual stream too (BlockwiseSettings.residual)")
    ap.add_argument("--no-full-load", action="store_true",
                    help="skip the whole-model from_pretrained reference")
    a = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    args = {k: getattr(a, k) for k in ("calib_tokens", "seq_len", "batch_size",
                                        "distill_epochs", "mode", "device", "threads",
                                        "vocab", "residual")}
    rows, runs = [], []
    with tempfile.TemporaryDirectory(prefix="bench-blockwise-") as tmp:
        tmp = Path(tmp)
        for mult in (1, 4, 16):
            n_layers = a.layers * mult
            torch.manual_seed(0)
            cfg = LlamaConfig(hidden_size=a.hidden, intermediate_size=a.intermediate,
                              num_hidden_layers=n_layers, num_attention_heads=a.heads,
                              num_key_value_heads=a.kv_heads, vocab_size=a.vocab,
                              max_position_embeddings=max(2048, a.seq_len))
            model_dir = tmp / f"llama-{n_layers}"
            LlamaForCausalLM(cfg).save_pretrained(model_dir)
            size = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
            t0 = time.perf_counter()
            comp = child("compress", model_dir, tmp / f"out-{n_layers}", args)
            wall = time.perf_counter() - t0
            full = None if a.no_full_load else child("load", model_dir, tmp / "x", args)
            state_mib = 3 * a.calib_tokens * a.hidden * 4 / 2**20
            run = {"layers": n_layers, "model_mib": size / 2**20, "compress": comp,
                   "full_load": full, "states_files_mib": state_mib, "wall_s": wall}
            runs.append(run)
            rows.append([n_layers, round(size / 2**20, 1), round(comp["peak_rss_mib"], 1),
                         round(comp["peak_rss_mib"] - comp["import_rss_mib"], 1),
                         round(full["peak_rss_mib"], 1) if full else "-",
                         round(comp.get("peak_cuda_mib", float("nan")), 1),
                         f"{comp['params_before']:,} -> {comp['params_after']:,}",
                         round(comp["seconds"], 1)])
            for d in model_dir.parent.glob(f"*-{n_layers}"):
                import shutil
                shutil.rmtree(d, ignore_errors=True)
    headers = ["layers", "model MiB", "peak RSS MiB", "above import MiB",
               "full load RSS MiB", "peak CUDA MiB", "params", "compress s"]
    print_table(headers, rows)
    path = write_json("blockwise_memory" + ("-residual" if a.residual else ""), {
        "machine": machine_info(), "gpu": gpu_info(), "settings": vars(a),
        "note": "peak RSS = VmHWM of a fresh child running compress_blockwise on the "
                "save_pretrained directory (ru_maxrss_mib: the child's ru_maxrss, which "
                "Linux seeds with the parent's peak at fork); the calibration states live in "
                "three memory-mapped files (states_files_mib) whose touched pages count in "
                "RSS",
        "runs": runs, "table": {"headers": headers, "rows": rows}})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
