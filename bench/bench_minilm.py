"""Issue 3, demonstration 3: all-MiniLM-L6-v2 compressed as a sentence encoder, on CPU.

Runs the ``minilm`` example the way the Python API documents it:

    model, _, meta = EXAMPLES["minilm"](seed)            # pretrained, no training
    train, val, test = EXAMPLE_DATA["minilm"](seed)      # topic + docstring / topic / topic
    cfg = CompressConfig(**MINILM_COMPRESS)
    calib = example_calibration("minilm", seed, cfg)     # 10% of the topic training split
    result = compress(model, train, eval_data=val, calib_data=calib, config=cfg)
    cosine = evaluate(result.model, test, task="embedding", reference=model)

(the validation split decides the epsilon roll-backs; the test split is reported), then
measures the CPU latency at batch size 1 (median of ``--passes`` forward passes, the two
models' passes interleaved, two rounds, ``rmtkd.report.latency_pair``) of the original and the
compressed encoder on a test sentence of median length, and checks that ``rmtkd.save`` /
``rmtkd.load`` round-trips the compressed encoder. Records parameters (total and encoder
= the 6 transformer layers, embeddings and pooler excluded), cosine similarity on the test
split, latencies, wall time (the whole job, from loading the model to the end of
compression), the per-site d -> k and the machine (2 shared cores: other jobs may run,
the load average is recorded).

With ``--compare`` it then runs the two heuristic rank rules of issue 3 at (about) the MP
run's final encoder parameter count, each a full compress run with the same config and
distillation (only ``rank_rule`` differs): ``uniform:<r>`` and ``energy:<f>``, with r and f
picked *before* the run by a cheap search on the teacher's spectra (the per-site
covariances of the calibration subset on the original model): the value whose predicted
encoder parameter count (sites reduced as the rule says, attention sites counted as the
MP run treats them) is closest to the MP run's final count. The causal runs re-calibrate
each site on the reduced network and may roll steps back, so the final counts differ a
little from the prediction; the table says by how much.

    python bench/bench_minilm.py                 # the demo (about 20 minutes here)
    python bench/bench_minilm.py --compare       # + uniform / energy at equal params
    python bench/bench_minilm.py --set distill_features=null   # ablation: embeddings only

Writes bench/results/minilm-<host>-<time>.json and prints the tables.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_table, write_json  # noqa: E402


def _site_rows(result: Any) -> list[dict]:
    return [{"site": r.site, "d": r.d, "k": r.k, "mp_k": r.mp_k, "status": r.status,
             "estimator": r.estimator, "sigma2": r.sigma2, "lambda_plus": r.lambda_plus,
             "params_before": r.params_before, "params_after": r.params_after,
             "metric_before": r.metric_before, "metric_reduced": r.metric_reduced,
             "metric_after": r.metric_after, "seconds": r.seconds, "reason": r.reason}
            for r in result.history]


def calibration(cfg: Any, seed: int, pool: str, train: Any) -> list:
    """compress's calibration subset: ``calib_fraction`` of the example's pool (the topic
    training split; ``rmtkd compress --example minilm`` does the same) or, with ``--calib-pool
    train``, of all the training sentences (topic + docstring)."""
    from rmtkd.engine import calibration_subset
    from rmtkd.examples import example_calibration

    if pool == "train":
        return calibration_subset(train, cfg.calib_fraction, cfg.seed)
    return example_calibration("minilm", seed, cfg)


def run_compress(model: Any, train: Any, val: Any, test: Any, overrides: dict, rule: str,
                 seed: int, progress: bool, pool: str) -> tuple[Any, dict]:
    from rmtkd.engine import CompressConfig, compress, evaluate
    from rmtkd.examples.minilm import encoder_params

    t0 = time.perf_counter()
    cfg = CompressConfig(**{**overrides, "rank_rule": rule, "seed": seed,
                            "progress": progress})
    result = compress(model, train, eval_data=val,
                      calib_data=calibration(cfg, seed, pool, train), config=cfg)
    seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    test_cos = evaluate(result.model, test, task="embedding", reference=model)
    return result, {
        "rule": rule, "config": cfg.to_dict(), "compress_seconds": seconds,
        "test_eval_seconds": time.perf_counter() - t1,
        "params_total": [result.original_params, result.final_params],
        "params_encoder": [encoder_params(model), encoder_params(result.model)],
        "encoder_reduction": 1 - encoder_params(result.model) / encoder_params(model),
        "total_reduction": result.reduction,
        "val_cosine": [result.original_metric, result.final_metric],
        "test_cosine": test_cos,
        "applied": sum(r.status == "applied" for r in result.history),
        "rolled_back": sum(r.status == "rolled back" for r in result.history),
        "skipped": sum(r.status == "skipped" for r in result.history),
        "sites": _site_rows(result)}


def latency_example(test: list[dict]) -> dict:
    """One test sentence of median token count, as a batch of 1 (no padding)."""
    rows = [(int(b["attention_mask"][i].sum()), b, i) for b in test
            for i in range(b["input_ids"].shape[0])]
    rows.sort(key=lambda r: r[0])
    n, b, i = rows[len(rows) // 2]
    return {k: v[i:i + 1, :n].clone() for k, v in b.items()}


def spectra(model: Any, overrides: dict, seed: int, pool: str, train: Any) -> dict:
    """Per-site covariances of the calibration subset on the teacher (as compress's first
    step sees them)."""
    from rmtkd.capture import collect_statistics, find_sites
    from rmtkd.engine import CompressConfig

    cfg = CompressConfig(**{**overrides, "seed": seed})
    calib = calibration(cfg, seed, pool, train)
    sites = find_sites(model, calib[0], include=cfg.sites)
    stats = collect_statistics(model, calib, sites, progress=False)
    out = {}
    for s in sites:
        cov = stats[s.name].cov.double()
        ev = torch.linalg.eigvalsh((cov + cov.T) / 2).flip(0).clamp_min(0)
        out[s.name] = {"d": s.dim, "eigenvalues": ev}
    return out


def predicted_encoder_params(spec: dict, rule: str, mp: dict, enc0: int) -> int:
    """Encoder parameters if every feed-forward site took the k of ``rule`` on the teacher's
    spectrum (width mode: 2 * hidden * (d - k) + (d - k) parameters fewer); attention sites
    are counted as the MP run left them (the same change in parameters)."""
    from rmtkd.rank_rules import parse_rule

    kind, p = parse_rule(rule)
    hidden = 384
    n = enc0
    for name, s in spec.items():
        d = s["d"]
        if "attention" in name:
            row = next((r for r in mp["sites"] if r["site"] == name), None)
            if row is not None and row["status"] == "applied":
                n -= row["params_before"] - row["params_after"]
            continue
        if kind == "uniform":
            k = max(1, round(p * d))
        else:
            ev = s["eigenvalues"]
            frac = (ev.cumsum(0) / ev.sum()).tolist()
            k = next((i + 1 for i, f in enumerate(frac) if f >= p), d)
        n -= (d - k) * (2 * hidden + 1)
    return n


def pick_param(spec: dict, kind: str, target: int, mp: dict, enc0: int) -> tuple[float, int]:
    """Grid search (step 0.001) of the rule's parameter for the predicted encoder count
    closest to ``target``."""
    best = None
    for i in range(1, 1000):
        p = i / 1000
        n = predicted_encoder_params(spec, f"{kind}:{p:g}", mp, enc0)
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (p, n)
    return best


def git_state() -> dict:
    """HEAD and the files that differ from it (the code that ran)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"head": head, "changed_files": [d[3:] for d in dirty]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--passes", type=int, default=300, help="latency passes (>= 200)")
    ap.add_argument("--compare", action="store_true",
                    help="also run uniform:<r> and energy:<f> at the MP run's encoder count")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a MINILM_COMPRESS entry (tuning), e.g. --set lr=5e-5")
    ap.add_argument("--rules", nargs="+", default=["uniform", "energy"],
                    choices=["uniform", "energy"], help="heuristics run by --compare")
    ap.add_argument("--mp-json", metavar="PATH", type=Path,
                    help="with --compare: take the MP run from this earlier result JSON "
                    "(same settings) instead of running it again; only the heuristics run")
    ap.add_argument("--calib-pool", choices=["topics", "train"], default="topics",
                    help="draw the calibration subset from the topic training split (the "
                    "example's, default) or from all training sentences (topic + docstring: "
                    "about 8x more calibration tokens)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import json

    import rmtkd
    from rmtkd.report import format_history, latency_pair
    from rmtkd.examples import EXAMPLE_COMPRESS, EXAMPLE_DATA, EXAMPLES
    from rmtkd.examples.minilm import encoder_params

    overrides = dict(EXAMPLE_COMPRESS["minilm"])
    for kv in args.set:
        k, v = kv.split("=", 1)
        try:
            overrides[k] = json.loads(v)
        except ValueError:
            overrides[k] = v
    machine_before = machine_info()
    t_all, cpu_all = time.perf_counter(), time.process_time()
    torch.manual_seed(args.seed)
    model, _, meta = EXAMPLES["minilm"](seed=args.seed, progress=False)
    train, val, test = EXAMPLE_DATA["minilm"](seed=args.seed)
    load_seconds = time.perf_counter() - t_all
    if args.mp_json is not None:
        if not args.compare:
            ap.error("--mp-json goes with --compare")
        earlier = json.loads(args.mp_json.read_text())
        mp = earlier["runs"][0]
        if (mp["rule"] != "mp" or earlier["overrides"] != overrides
                or earlier.get("calib_pool", "topics") != args.calib_pool):
            ap.error(f"{args.mp_json}: its MP run used other settings ({earlier['overrides']})")
        wall, cpu = earlier["wall_seconds_job"], earlier.get("cpu_seconds_job")
        lat, example = earlier["latency"], None
        same, diff, size = (earlier["save_load_identical"],
                            earlier.get("save_load_max_abs_diff"), earlier["saved_bytes"])
    else:
        result, mp = run_compress(model, train, val, test, overrides, "mp", args.seed,
                                  not args.quiet, args.calib_pool)
        wall = time.perf_counter() - t_all
        cpu = time.process_time() - cpu_all   # this process's CPU time (all its threads)
        print(format_history(result.history))
        print(result.summary())

        example = latency_example(test)
        orig_ms, comp_ms, rounds = latency_pair(model, result.model, example,
                                                passes=args.passes)
        lat = {"original": {"median_ms": orig_ms, "runs_ms": rounds["before"]},
               "compressed": {"median_ms": comp_ms, "runs_ms": rounds["after"]}}
        lat = {"tokens": int(example["input_ids"].shape[1]), "passes": args.passes, **lat}
        with tempfile.TemporaryDirectory() as tmp:
            path = rmtkd.save(result, Path(tmp) / "minilm")
            back = rmtkd.load(path)
            with torch.no_grad():
                b = test[0]
                diff = (back(**b) - result.model(**b)).abs().max().item()
                same = diff <= 1e-5
            size = sum(f.stat().st_size for f in Path(path).iterdir())

    runs = [mp]
    compare: dict[str, Any] = {}
    if args.compare:
        enc0 = encoder_params(model)
        spec = spectra(model, overrides, args.seed, args.calib_pool, train)
        target = mp["params_encoder"][1]
        for kind in args.rules:
            p, pred = pick_param(spec, kind, target, mp, enc0)
            res, run = run_compress(model, train, val, test, overrides, f"{kind}:{p:g}",
                                    args.seed, not args.quiet, args.calib_pool)
            run["picked"] = {"param": p, "predicted_encoder_params": pred,
                             "target_encoder_params": target,
                             "final_vs_target": (run["params_encoder"][1] - target) / target}
            runs.append(run)
        compare = {"method": "parameter picked on the teacher's spectra (calibration subset "
                   "of the original model), grid step 0.001, closest predicted encoder "
                   "count to the MP run's final count; one full compress run each"}

    rows = []
    for r in runs:
        rows.append([r["rule"], f"{r['params_total'][1]:,}", f"{r['params_encoder'][1]:,}",
                     f"{100 * r['encoder_reduction']:.1f}", f"{r['val_cosine'][1]:.2f}",
                     f"{r['test_cosine']:.2f}",
                     " ".join(f"{s['d']}->{s['k']}{'' if s['status'] == 'applied' else '*'}"
                              for s in r["sites"]),
                     f"{r['compress_seconds']:.0f}"])
    headers = ["rule", "params", "encoder params", "encoder reduction %", "val cos %",
               "test cos %", "d->k per site (* = not applied)", "compress s"]
    print()
    print(f"original: {mp['params_total'][0]:,} parameters, encoder {mp['params_encoder'][0]:,}")
    print_table(headers, rows)
    print(f"latency at batch 1 ({lat['tokens']} tokens, median of "
          f"{lat['passes']} passes, {torch.get_num_threads()} threads): original "
          f"{lat['original']['median_ms']:.2f} ms, compressed "
          f"{lat['compressed']['median_ms']:.2f} ms "
          f"({lat['original']['median_ms'] / lat['compressed']['median_ms']:.2f}x)")
    print(f"save/load round trip: max |difference| {diff:.2g} "
          f"({'same outputs' if same else 'MISMATCH'}); "
          f"{size / 2**20:.1f} MiB on disk")
    print(f"whole job (load + data + compress): {wall:.0f} s wall, {cpu:.0f} s CPU time of "
          f"this process{' (MP run from ' + str(args.mp_json) + ')' if args.mp_json else ''}"
          f"; load average now {machine_info().get('loadavg_1_5_15')}")
    payload = {"bench": "minilm", "seed": args.seed, "example": meta,
               "overrides": overrides, "calib_pool": args.calib_pool,
               "load_seconds": load_seconds,
               "wall_seconds_job": wall, "cpu_seconds_job": cpu,
               "latency": lat, "mp_from": str(args.mp_json) if args.mp_json else None,
               "save_load_identical": same, "save_load_max_abs_diff": diff, "saved_bytes": size,
               "runs": runs, "compare": compare,
               "targets": {"encoder_reduction": ">= 0.40", "test_cosine": ">= 95",
                           "wall_seconds_job": "< 1800"},
               "met": {"encoder_reduction": mp["encoder_reduction"] >= 0.40,
                       "test_cosine": mp["test_cosine"] >= 95.0,
                       "wall": wall < 1800},
               "table": {"headers": headers, "rows": rows},
               "command": "python bench/bench_minilm.py "
               + " ".join(argv if argv is not None else sys.argv[1:]),
               "git": git_state(),
               "machine_before": machine_before, "machine": machine_info()}
    path = write_json("minilm", payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
