"""GPU benchmark: fused projected low-rank linear vs two torch matmuls (and a dense layer).

y = (x V) W^T + b, bf16, d_in = d_out = 4096, k in {256, 64}, tokens (rows of x) in
{1, 4, 16, 64, 256, 1024, 4096}. Timed forward paths, all in the same run:
- ``torch2``: ``F.linear(x @ V, W, b)`` -- two cuBLAS GEMMs, bias fused in the second (the
  baseline, and rmtkd's torch backend);
- ``tile`` / ``split_rank``: the two fused Triton kernels (rmtkd.kernels.projected_linear);
- ``auto``: ``rmtkd.ops.projected_linear`` as dispatched (fused below the thresholds in
  rmtkd/ops/projected_linear.py, two GEMMs above);
- ``dense``: ``F.linear(x, W_dense, b)`` with a 4096 x 4096 weight, as context;
- ``cuda``: the C++ extension's fused kernel (``rmtkd::projected_linear``,
  csrc/projected_linear.cu), side by side in the same run; left out (the JSON says why)
  where the extension cannot be built.
Plus forward+backward (autograd Function vs torch autograd, and the cuda backend) at 16 and
4096 tokens.

Medians of ``triton.testing.do_bench`` (it clears L2 before every run); inputs are also
rotated over several copies. Achieved TFLOP/s count 2 M k (d_in + d_out) (dense: 2 M d_in
d_out); GB/s count the bytes a perfect kernel must move (x, V, W, b, y once). Peaks measured
here: a bf16 8192^3 GEMM and a 1 GiB device copy. The JSON (bench/results/
projected_linear_gpu-*.json) also carries the thresholds the measurements recommend for
FUSED_MAX_TOKENS / SPLIT_RANK_MAX_TOKENS.

    python bench/bench_projected_linear.py            # GPU, ~1 minute on an H100
    python bench/bench_projected_linear.py --quick    # tiny smoke; on CPU under the interpreter
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (cuda_extension_status, machine_info, median_interleaved,  # noqa: E402
                     print_table, write_json)

TOKENS = [1, 4, 16, 64, 256, 1024, 4096]
RANKS = [256, 64]
D = 4096
FWD_BWD_TOKENS = [16, 4096]
SWEEP_TOKENS = [1, 16]
N_ROT = 4


def _cuda_ext() -> tuple[Any, str]:
    """``(torch.ops.rmtkd, "")`` if the C++ extension builds and loads, else ``(None, why)``."""
    why = cuda_extension_status()
    return (None, why) if why else (torch.ops.rmtkd, "")


def _auto_path(pl, tokens: int, k: int, dev: torch.device, dtype: torch.dtype) -> str:
    """What ``backend="auto"`` runs here: "torch", or the triton backend's variant."""
    if pl._resolve("auto", dev, dtype) != "triton":
        return "torch"
    v = pl.choose_variant(tokens, k)
    return "triton:gemm" if v == "gemm" else v


def _bytes_flops(m: int, d_in: int, d_out: int, k: int | None, es: int) -> tuple[float, float]:
    if k is None:  # dense
        return es * (m * d_in + d_in * d_out + d_out + m * d_out), 2.0 * m * d_in * d_out
    return es * (m * d_in + d_in * k + d_out * k + d_out + m * d_out), 2.0 * m * k * (d_in + d_out)


class Timer:
    """do_bench medians on the GPU; interleaved wall-clock medians on the CPU (smoke only)."""

    def __init__(self, gpu: bool, quick: bool):
        self.gpu = gpu
        self.warmup, self.rep = (5, 20) if quick else (10, 40)

    def __call__(self, fns: dict[str, Callable[[], Any]],
                 grad_to_none: list[torch.Tensor] | None = None) -> dict[str, float | str]:
        out: dict[str, float | str] = {}
        ok: dict[str, Callable[[], Any]] = {}
        for name, fn in fns.items():  # one failing path must not sink the whole bench
            try:
                fn()
                ok[name] = fn
            except Exception as err:  # noqa: BLE001
                out[name] = f"error: {type(err).__name__}: {err}"[:300]
                traceback.print_exc()
        if self.gpu:
            import triton

            torch.cuda.synchronize()
            for name, fn in ok.items():
                out[name] = triton.testing.do_bench(fn, warmup=self.warmup, rep=self.rep,
                                                    grad_to_none=grad_to_none,
                                                    return_mode="median") * 1e-3
        else:
            t = median_interleaved(ok, repeats=3, warmup=0)
            out.update({k: v["median_s"] for k, v in t.items()})
        return out


def _rotating(fn: Callable[[dict], Any], sets: list[dict]) -> Callable[[], Any]:
    state = {"i": 0}

    def call():
        s = sets[state["i"] % len(sets)]
        state["i"] += 1
        return fn(s)
    return call


def measure_peaks(timer: Timer, dev: torch.device) -> dict[str, float]:
    if not timer.gpu:
        return {}
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    src = torch.empty(1 << 29, device=dev, dtype=torch.float16)  # 1 GiB
    dst = torch.empty_like(src)
    t = timer({"mm": lambda: a @ b, "copy": lambda: dst.copy_(src)})
    peaks = {}
    if isinstance(t["mm"], float):
        peaks["bf16_matmul_tflops"] = 2 * 8192 ** 3 / t["mm"] / 1e12
    if isinstance(t["copy"], float):
        peaks["copy_gbs"] = 2 * src.numel() * 2 / t["copy"] / 1e9
    del a, b, src, dst
    torch.cuda.empty_cache()
    return peaks


def bench_forward(timer: Timer, dev: torch.device, dtype: torch.dtype, d: int, k: int,
                  tokens: int, kp, pl, ext: Any = None) -> dict[str, Any]:
    g = torch.Generator(device=dev).manual_seed(tokens * 1000 + k)
    sets = []
    for _ in range(N_ROT if timer.gpu else 1):
        sets.append({
            "x": torch.randn(tokens, d, device=dev, generator=g).to(dtype),
            "V": (torch.randn(d, k, device=dev, generator=g) / d ** 0.5).to(dtype),
            "W": (torch.randn(d, k, device=dev, generator=g) / k ** 0.5).to(dtype),
            "b": torch.randn(d, device=dev, generator=g).to(dtype),
            "Wd": (torch.randn(d, d, device=dev, generator=g) / d ** 0.5).to(dtype),
        })
    calls: dict[str, Callable[[dict], Any]] = {
        "torch2": lambda s: F.linear(s["x"] @ s["V"], s["W"], s["b"]),
        "tile": lambda s: kp.projected_linear_fwd(s["x"], s["V"], s["W"], s["b"],
                                                  variant="tile"),
        "split_rank": lambda s: kp.projected_linear_fwd(s["x"], s["V"], s["W"], s["b"],
                                                        variant="split_rank"),
        "auto": lambda s: pl.projected_linear(s["x"], s["V"], s["W"], s["b"]),
        "dense": lambda s: F.linear(s["x"], s["Wd"], s["b"]),
    }
    if ext is not None:
        calls["cuda"] = lambda s: ext.projected_linear(s["x"], s["V"], s["W"], s["b"])
    times = timer({name: _rotating(fn, sets) for name, fn in calls.items()})
    s0 = sets[0]
    ref = F.linear(s0["x"].double() @ s0["V"].double(), s0["W"].double(), s0["b"].double())
    errs = {}
    for name in ("torch2", "tile", "split_rank", "auto", "cuda"):
        if isinstance(times.get(name), float):
            y = calls[name](s0).double()
            errs[name] = ((y - ref).norm() / ref.norm()).item()
    es = torch.empty((), dtype=dtype).element_size()
    nbytes, flops = _bytes_flops(tokens, d, d, k, es)
    dbytes, dflops = _bytes_flops(tokens, d, d, None, es)
    row: dict[str, Any] = {"tokens": tokens, "d_in": d, "d_out": d, "k": k,
                           "dtype": str(dtype).replace("torch.", ""), "times_s": times,
                           "rel_err_vs_fp64": errs, "auto_variant": _auto_path(pl, tokens, k, dev,
                                                                              dtype)}
    rates = {}
    for name, t in times.items():
        if isinstance(t, float):
            b_, f_ = (dbytes, dflops) if name == "dense" else (nbytes, flops)
            rates[name] = {"tflops": f_ / t / 1e12, "gbs": b_ / t / 1e9}
    row["rates"] = rates
    try:
        row["configs"] = {v: kp.describe(v, tokens, d, d, k, dtype, dev)
                          for v in ("tile", "split_rank")}
    except Exception as err:  # noqa: BLE001
        row["configs"] = f"error: {err}"
    del sets
    return row


SWEEP = {
    "split_rank": [dict(BLOCK_K=bk, num_stages=st) for bk in (128, 256, 512) for st in (3, 4)]
    + [dict(BLOCK_R=32, BLOCK_K=256, num_stages=3), dict(BLOCK_N=64, BLOCK_K=256, num_stages=4)],
    "tile": [dict(BLOCK_N=bn, BLOCK_K=bk, num_stages=st)
             for bn, bk, st in ((32, 64, 3), (64, 64, 2), (64, 128, 2), (128, 64, 2),
                                (128, 32, 3))],
}


def bench_sweep(timer: Timer, dev: torch.device, dtype: torch.dtype, d: int, k: int,
                tokens: int, kp) -> list[dict[str, Any]]:
    """A few launch configurations around the defaults, for later tuning (forward only)."""
    g = torch.Generator(device=dev).manual_seed(99 + tokens)
    sets = [{"x": torch.randn(tokens, d, device=dev, generator=g).to(dtype),
             "V": (torch.randn(d, k, device=dev, generator=g) / d ** 0.5).to(dtype),
             "W": (torch.randn(d, k, device=dev, generator=g) / k ** 0.5).to(dtype),
             "b": torch.randn(d, device=dev, generator=g).to(dtype)}
            for _ in range(N_ROT if timer.gpu else 1)]
    sms = kp._device_limits(dev)[0]
    fns, cfgs = {}, {}
    for variant, changes in SWEEP.items():
        base = kp.pick_config(variant, tokens, d, d, k, dtype, dev)
        for i, ch in enumerate([{}] + changes):
            c = {**base, **ch}
            if variant == "split_rank":
                c["BLOCK_R"] = min(c["BLOCK_R"], max(16, 1 << (k - 1).bit_length()))
                c["TILES_PER_GROUP"] = kp.tiles_per_group(tokens, d, k, c, sms)
            name = f"{variant}#{i}"
            cfgs[name] = (variant, c)
            fns[name] = _rotating(lambda s, v=variant, c=c: kp.projected_linear_fwd(
                s["x"], s["V"], s["W"], s["b"], variant=v, config=c), sets)
    times = timer(fns)
    return [{"tokens": tokens, "k": k, "variant": cfgs[n][0], "default": n.endswith("#0"),
             "config": cfgs[n][1], "time_s": times[n]} for n in fns]


def bench_fwd_bwd(timer: Timer, dev: torch.device, dtype: torch.dtype, d: int, k: int,
                  tokens: int, pl, ext: Any = None) -> dict[str, Any]:
    g = torch.Generator(device=dev).manual_seed(7 + tokens)
    x = torch.randn(tokens, d, device=dev, generator=g).to(dtype).requires_grad_()
    V = (torch.randn(d, k, device=dev, generator=g) / d ** 0.5).to(dtype).requires_grad_()
    W = (torch.randn(d, k, device=dev, generator=g) / k ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(d, device=dev, generator=g).to(dtype).requires_grad_()
    gy = torch.randn(tokens, d, device=dev, generator=g).to(dtype)
    fns = {
        "torch": lambda: F.linear(x @ V, W, b).backward(gy),
        "auto": lambda: pl.projected_linear(x, V, W, b).backward(gy),
    }
    for v in ("tile", "split_rank"):
        fns[f"fn_{v}"] = (lambda v=v: pl.projected_linear_triton(x, V, W, b, variant=v)
                          .backward(gy))
    if ext is not None:
        fns["cuda"] = lambda: pl.projected_linear(x, V, W, b, backend="cuda").backward(gy)
    times = timer(fns, grad_to_none=[x, V, W, b])
    return {"tokens": tokens, "d_in": d, "d_out": d, "k": k,
            "dtype": str(dtype).replace("torch.", ""), "times_s": times,
            "auto_variant": _auto_path(pl, tokens, k, dev, dtype)}


def recommend(rows: list[dict]) -> dict[str, Any]:
    """Thresholds the forward table supports, per rank and combined (the smaller)."""
    per_k: dict[int, dict[str, int]] = {}
    for k in sorted({r["k"] for r in rows}):
        rk = sorted((r for r in rows if r["k"] == k), key=lambda r: r["tokens"])
        fused_max, split_max = 0, 0
        for r in rk:
            t = r["times_s"]
            cands = {v: t[v] for v in ("tile", "split_rank") if isinstance(t.get(v), float)}
            if not cands or not isinstance(t.get("torch2"), float):
                break
            best = min(cands, key=cands.get)
            if cands[best] >= t["torch2"]:
                break
            fused_max = r["tokens"]
            if best == "split_rank":
                split_max = r["tokens"]
        per_k[k] = {"FUSED_MAX_TOKENS": fused_max, "SPLIT_RANK_MAX_TOKENS": split_max}
    combined = {key: min(v[key] for v in per_k.values()) for key in
                ("FUSED_MAX_TOKENS", "SPLIT_RANK_MAX_TOKENS")} if per_k else {}
    return {"per_rank": per_k, "combined": combined}


def _fmt_us(t: Any) -> Any:
    return t * 1e6 if isinstance(t, float) else "ERR"


def _ratio(base: Any, t: Any) -> Any:
    return base / t if isinstance(base, float) and isinstance(t, float) else "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke run (d=64, k=16, tokens 1 and 20); on CPU under the "
                        "Triton interpreter")
    p.add_argument("--tokens", type=int, nargs="+", default=None)
    p.add_argument("--ranks", type=int, nargs="+", default=None)
    p.add_argument("--no-json", action="store_true", help="do not write a JSON result")
    p.add_argument("--no-sweep", action="store_true", help="skip the small config sweep")
    p.add_argument("--out-dir", type=Path, default=None, help="JSON directory (bench/results)")
    args = p.parse_args(argv)

    gpu = torch.cuda.is_available()
    if not gpu:
        if not args.quick:
            print("no CUDA device: the full benchmark needs a GPU; use --quick for a smoke run "
                  "under the Triton interpreter", file=sys.stderr)
            return 2
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is first imported
    import rmtkd.ops.projected_linear as pl
    from rmtkd.kernels import projected_linear as kp

    dev = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float16  # bf16 is unreliable in the interpreter
    d = 64 if args.quick else D
    tokens = args.tokens or ([1, 20] if args.quick else TOKENS)
    ranks = args.ranks or ([16] if args.quick else RANKS)
    fb_tokens = [t for t in ([20] if args.quick else FWD_BWD_TOKENS)]
    timer = Timer(gpu, args.quick)

    import _common
    import triton

    info = machine_info()
    info["triton"] = triton.__version__
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET")
    if hasattr(_common, "gpu_info"):  # GPU name, capability, SMs, memory, CUDA version
        info["gpu"] = _common.gpu_info()
    ext, ext_why = _cuda_ext()
    info["cuda_ext"] = ext_why or "built"
    peaks = measure_peaks(timer, dev)
    if peaks:
        print(f"measured peaks: {peaks['bf16_matmul_tflops']:.0f} TFLOP/s bf16 GEMM, "
              f"{peaks['copy_gbs']:.0f} GB/s copy")

    rows = []
    for k in ranks:
        for m in tokens:
            rows.append(bench_forward(timer, dev, dtype, d, k, m, kp, pl, ext))
    headers = ["k", "tokens", "torch2 us", "tile us", "split us", "auto us", "auto",
               "dense us", "tile x", "split x", "auto x", "best TFLOP/s", "best GB/s",
               "max err"]
    table = []
    for r in rows:
        t = r["times_s"]
        fused = {v: t[v] for v in ("tile", "split_rank") if isinstance(t.get(v), float)}
        best = min(fused, key=fused.get) if fused else None
        table.append([r["k"], r["tokens"], _fmt_us(t.get("torch2")), _fmt_us(t.get("tile")),
                      _fmt_us(t.get("split_rank")), _fmt_us(t.get("auto")), r["auto_variant"],
                      _fmt_us(t.get("dense")), _ratio(t.get("torch2"), t.get("tile")),
                      _ratio(t.get("torch2"), t.get("split_rank")),
                      _ratio(t.get("torch2"), t.get("auto")),
                      r["rates"][best]["tflops"] if best else "-",
                      r["rates"][best]["gbs"] if best else "-",
                      max(r["rel_err_vs_fp64"].values()) if r["rel_err_vs_fp64"] else "-"])
    print(f"\nforward, {str(dtype).replace('torch.', '')}, d_in = d_out = {d} "
          f"(x = torch2 time / path time; > 1 means faster than two torch matmuls)")
    print_table(headers, table)
    if ext is not None:
        print("\ncuda backend (C++ extension), same inputs (x = torch2 time / cuda time)")
        print_table(["k", "tokens", "torch2 us", "cuda us", "cuda x", "cuda TFLOP/s",
                     "cuda GB/s", "cuda err"],
                    [[r["k"], r["tokens"], _fmt_us(r["times_s"].get("torch2")),
                      _fmt_us(r["times_s"].get("cuda")),
                      _ratio(r["times_s"].get("torch2"), r["times_s"].get("cuda")),
                      r["rates"].get("cuda", {}).get("tflops", "-"),
                      r["rates"].get("cuda", {}).get("gbs", "-"),
                      r["rel_err_vs_fp64"].get("cuda", "-")] for r in rows])
    else:
        print(f"\ncuda backend: skipped ({ext_why})")

    fb_rows = [bench_fwd_bwd(timer, dev, dtype, d, ranks[0], m, pl, ext) for m in fb_tokens]
    print(f"\nforward + backward, k = {ranks[0]} (x = torch time / path time)")
    fb_table = []
    for r in fb_rows:
        t = r["times_s"]
        fb_table.append([r["tokens"], _fmt_us(t.get("torch")), _fmt_us(t.get("auto")),
                         r["auto_variant"], _fmt_us(t.get("fn_tile")),
                         _fmt_us(t.get("fn_split_rank")), _ratio(t.get("torch"), t.get("auto")),
                         _ratio(t.get("torch"), t.get("fn_tile")),
                         _ratio(t.get("torch"), t.get("fn_split_rank"))])
    print_table(["tokens", "torch us", "auto us", "auto", "Fn[tile] us", "Fn[split] us",
                 "auto x", "tile x", "split x"], fb_table)
    if ext is not None:
        print_table(["tokens", "torch us", "cuda us", "cuda x"],
                    [[r["tokens"], _fmt_us(r["times_s"].get("torch")),
                      _fmt_us(r["times_s"].get("cuda")),
                      _ratio(r["times_s"].get("torch"), r["times_s"].get("cuda"))]
                     for r in fb_rows])

    sweep = []
    if not args.no_sweep:
        for m in ([tokens[0]] if args.quick else SWEEP_TOKENS):
            sweep += bench_sweep(timer, dev, dtype, d, ranks[0], m, kp)
        print(f"\nconfig sweep, k = {ranks[0]} (#0 = the default; best per variant and tokens)")
        srows = []
        for m in sorted({r["tokens"] for r in sweep}):
            for v in ("tile", "split_rank"):
                rs = [r for r in sweep if r["tokens"] == m and r["variant"] == v
                      and isinstance(r["time_s"], float)]
                if not rs:
                    continue
                best = min(rs, key=lambda r: r["time_s"])
                dflt = next((r for r in rs if r["default"]), None)
                srows.append([m, v, _fmt_us(dflt["time_s"]) if dflt else "ERR",
                              _fmt_us(best["time_s"]),
                              " ".join(f"{a}={b}" for a, b in best["config"].items())])
        print_table(["tokens", "variant", "default us", "best us", "best config"], srows)

    rec = recommend(rows)
    print(f"\ncurrent thresholds: FUSED_MAX_TOKENS={pl.FUSED_MAX_TOKENS}, "
          f"SPLIT_RANK_MAX_TOKENS={pl.SPLIT_RANK_MAX_TOKENS}, FUSED_MAX_RANK={pl.FUSED_MAX_RANK}")
    print(f"measured recommendation (largest token count up to which a fused kernel beats "
          f"torch2 at every smaller tested count): {rec}")

    summary = []
    for r in rows:
        t = r["times_s"]
        if isinstance(t.get("auto"), float) and isinstance(t.get("torch2"), float):
            notes = [f"auto={r['auto_variant']}"] + [
                f"{v} {_ratio(t['torch2'], t[v]):.2f}x" for v in ("tile", "split_rank")
                if isinstance(t.get(v), float)]
            summary.append({"shape": f"fwd M={r['tokens']} d={d} k={r['k']}",
                            "rmtkd_s": t["auto"], "baseline_s": t["torch2"],
                            "note": ", ".join(notes)})
    for r in rows:
        t = r["times_s"]
        if isinstance(t.get("cuda"), float) and isinstance(t.get("torch2"), float):
            summary.append({"shape": f"cuda fwd M={r['tokens']} d={d} k={r['k']}",
                            "rmtkd_s": t["cuda"], "baseline_s": t["torch2"],
                            "note": "C++ extension, fused kernel"})
    for r in fb_rows:
        t = r["times_s"]
        if isinstance(t.get("cuda"), float) and isinstance(t.get("torch"), float):
            summary.append({"shape": f"cuda fwd+bwd M={r['tokens']} d={d} k={r['k']}",
                            "rmtkd_s": t["cuda"], "baseline_s": t["torch"],
                            "note": "C++ forward, torch GEMM backward"})
        if isinstance(t.get("auto"), float) and isinstance(t.get("torch"), float):
            summary.append({"shape": f"fwd+bwd M={r['tokens']} d={d} k={r['k']}",
                            "rmtkd_s": t["auto"], "baseline_s": t["torch"],
                            "note": f"auto={r['auto_variant']}"})
    payload = {"bench": "projected_linear", "gpu": gpu, "quick": args.quick,
               "machine": info, "peaks": peaks, "dtype": str(dtype), "forward": rows,
               "forward_backward": fb_rows, "config_sweep": sweep, "recommended": rec,
               "thresholds": {"FUSED_MAX_TOKENS": pl.FUSED_MAX_TOKENS,
                              "SPLIT_RANK_MAX_TOKENS": pl.SPLIT_RANK_MAX_TOKENS,
                              "FUSED_MAX_RANK": pl.FUSED_MAX_RANK},
               "summary": summary}
    if not args.no_json:
        name = "projected_linear_gpu" if gpu else "projected_linear_interp"
        path = write_json(name, payload, args.out_dir)
        print(f"\nwrote {path}")
    errors = [f"{r['k']}/{r['tokens']}/{n}" for r in rows + fb_rows
              for n, t in r["times_s"].items() if not isinstance(t, float)]
    if errors:
        print(f"\nFAILED paths: {errors}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
