"""MP rank rule vs two heuristic rank choices at equal parameter count (issue 3).

For each seed: train the example's teacher (as ``rmtkd compress --example`` does), run
:func:`rmtkd.compress` with the default config (``rank_rule="mp"``), then, for each
heuristic rule, search its parameter (energy fraction f of ``"energy:<f>"``, ratio r of
``"uniform:<r>"``) for the run whose *final* parameter count is closest to the MP run's,
each candidate being a full compress run (same config, same distillation, same epsilon
roll-back rule; only ``rank_rule`` differs). The search: a coarse grid, then bisection
inside the grid interval whose final counts straddle the target, stopping once within
``--tol`` (default 1%) or after ``--max-runs`` runs per rule. The pick is the closest final
parameter count (never the best accuracy); every candidate run is kept in the JSON.

    python bench/bench_rank_rules.py                     # digits-mlp, seeds 0 1 2
    python bench/bench_rank_rules.py --example mnist-cnn --seeds 0 --max-runs 8   # slow

Writes bench/results/rank_rules-<host>-<time>.json and docs/rank_rules-<example>.md, prints
the table.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_table, write_json  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"

GRIDS = {"energy": [0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99,
                    0.995, 0.998, 0.999],
         "uniform": [0.02, 0.04, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.25, 0.35, 0.5]}


def run_once(model: Any, train: Any, val: Any, test: Any, rule: str, seed: int,
             overrides: dict) -> dict:
    from rmtkd import CompressConfig, compress
    from rmtkd.engine import evaluate

    t0 = time.perf_counter()
    cfg = CompressConfig(**{**overrides, "rank_rule": rule, "seed": seed, "progress": False})
    res = compress(model, train, eval_data=val, config=cfg)
    reference = model if cfg.task == "embedding" else None
    return {"rule": rule, "final_params": res.final_params,
            "original_params": res.original_params, "reduction": res.reduction,
            "val_before": res.original_metric, "val_after": res.final_metric,
            "metric_before": evaluate(model, test, task=cfg.task, reference=reference),
            "metric_after": evaluate(res.model, test, task=cfg.task, reference=reference),
            "applied": sum(r.status == "applied" for r in res.history),
            "rolled_back": sum(r.status == "rolled back" for r in res.history),
            "skipped": sum(r.status == "skipped" for r in res.history),
            "steps": [{"site": r.site, "d": r.d, "k": r.k, "mp_k": r.mp_k,
                       "status": r.status} for r in res.history],
            "seconds": time.perf_counter() - t0}


def search(kind: str, target: int, run: Any, tol: float, max_runs: int) -> tuple[dict, list]:
    """Closest final parameter count to ``target`` over ``kind``'s parameter (see module
    docstring). Returns (best run, all runs)."""
    runs: list[dict] = []

    def at(p: float) -> dict:
        r = run(f"{kind}:{p:.6g}")
        r["param"] = p
        r["rel_diff"] = (r["final_params"] - target) / target
        runs.append(r)
        return r

    best = lambda: min(runs, key=lambda r: (abs(r["rel_diff"]), r["param"]))  # noqa: E731
    for p in GRIDS[kind]:
        if len(runs) >= max_runs:
            break
        at(p)
    # bisection inside the straddling grid interval nearest the best grid point
    while len(runs) < max_runs and abs(best()["rel_diff"]) > tol:
        pts = sorted(runs, key=lambda r: r["param"])
        pairs = [(a, b) for a, b in zip(pts, pts[1:])
                 if (a["rel_diff"] < 0) != (b["rel_diff"] < 0) and b["param"] - a["param"] > 1e-4]
        if not pairs:
            break
        b0 = best()
        a, b = min(pairs, key=lambda ab: min(abs(ab[0]["param"] - b0["param"]),
                                             abs(ab[1]["param"] - b0["param"])))
        at(0.5 * (a["param"] + b["param"]))
    return best(), runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--example", default="digits-mlp")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--tol", type=float, default=0.01)
    ap.add_argument("--max-runs", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true",
                    help="search each heuristic's parameter on runs without distillation (no "
                    "roll-backs: surgery only, seconds each), then make one full run with the "
                    "parameter found (for examples whose full runs take minutes)")
    ap.add_argument("--no-docs", action="store_true", help="do not write docs/rank_rules-*.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from rmtkd.examples import EXAMPLE_COMPRESS, EXAMPLE_DATA, EXAMPLES

    t_all = time.perf_counter()
    rows, results = [], []
    for seed in args.seeds:
        torch.manual_seed(seed)   # as rmtkd compress --example does
        model, _, meta = EXAMPLES[args.example](seed=seed, progress=False)
        train, val, test = EXAMPLE_DATA[args.example](seed=seed)
        overrides = EXAMPLE_COMPRESS.get(args.example, {})
        run = lambda rule: run_once(model, train, val, test, rule, seed,  # noqa: E731
                                    overrides)
        mp = run("mp")
        mp["param"], mp["rel_diff"] = None, 0.0
        entry = {"seed": seed, "teacher": meta, "mp": mp, "heuristics": {}}
        picked = [("mp", mp)]
        for kind in ("energy", "uniform"):
            if args.quick:
                fast = {**overrides, "distill_epochs": 0, "distill_min_steps": 0,
                        "epsilon": 1e9}
                probe = lambda rule: run_once(model, train, val, test, rule,  # noqa: E731
                                              seed, fast)
                guess, runs = search(kind, mp["final_params"], probe, args.tol, args.max_runs)
                best = run(guess["rule"])
                best["param"] = guess["param"]
                best["rel_diff"] = (best["final_params"] - mp["final_params"]) / mp[
                    "final_params"]
                runs = [*runs, best]
            else:
                best, runs = search(kind, mp["final_params"], run, args.tol, args.max_runs)
            entry["heuristics"][kind] = {"best": best, "runs": runs,
                                         "within_2pct": abs(best["rel_diff"]) <= 0.02}
            picked.append((kind, best))
        results.append(entry)
        for kind, r in picked:
            rows.append([seed, r["rule"], r["final_params"], f"{100 * r['rel_diff']:+.1f}",
                         f"{100 * r['reduction']:.1f}", f"{r['metric_before']:.2f}",
                         f"{r['metric_after']:.2f}",
                         f"{r['metric_after'] - r['metric_before']:+.2f}",
                         " ".join(f"{s['d']}->{s['k']}{'' if s['status'] == 'applied' else '*'}"
                                  for s in r["steps"]),
                         r["applied"], r["rolled_back"]])
    headers = ["seed", "rule", "params", "vs MP %", "reduction %", "test before",
               "test after", "delta", "k per site (* = not applied)", "applied", "rolled back"]
    seconds = time.perf_counter() - t_all
    print_table(headers, rows)
    payload = {"bench": "rank_rules", "example": args.example, "seeds": args.seeds,
               "tol": args.tol, "max_runs_per_rule": args.max_runs, "grids": GRIDS,
               "quick": args.quick,
               "seconds": seconds, "command": "python bench/bench_rank_rules.py "
               + " ".join(argv if argv is not None else sys.argv[1:]),
               "machine": machine_info(), "results": results, "table": {
                   "headers": headers, "rows": rows}}
    path = write_json("rank_rules", payload)
    print(f"wrote {path}")
    if not args.no_docs:
        doc = DOCS / f"rank_rules-{args.example}.md"
        doc.write_text(markdown(payload, path))
        print(f"wrote {doc}")
    return 0


def markdown(payload: dict, path: Path) -> str:
    headers, rows = payload["table"]["headers"], payload["table"]["rows"]
    md = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    md += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    n_runs = sum(len(h["runs"]) for e in payload["results"] for h in e["heuristics"].values())
    return "\n".join([
        "# Rank rules: Marchenko-Pastur vs heuristics at equal parameter count",
        "",
        f"Example `{payload['example']}`, seeds {payload['seeds']}; every row is one full "
        "`rmtkd.compress` run with the default config (width mode, epsilon = 2 points, the "
        "same self-distillation after every reduction and the same roll-back rule); only "
        "`rank_rule` differs:",
        "",
        "- `mp` (default): k = spikes above the Marchenko-Pastur threshold;",
        "- `energy:f`: the smallest k whose top eigen-directions hold a fraction f of the "
        "site's variance;",
        "- `uniform:r`: k = max(1, round(r d)) at every site.",
        "",
        "For each heuristic the parameter (f or r) was searched (a grid, then bisection; "
        f"{payload['max_runs_per_rule']} runs at most per rule, {n_runs} heuristic runs in all) "
        "for the final parameter count closest to the MP run's"
        + (" on runs without distillation (surgery only), then one full run was made with "
           "the parameter found (`--quick`)" if payload.get("quick") else "")
        + "; the pick is the closest count, never the best accuracy, and every candidate "
        "run is in the JSON. "
        "`vs MP %` is the final count's difference to the MP run's. Metric: the example's "
        "held-out test split; the roll-backs are decided on its validation split. "
        "`k per site`: d -> k at each site, `*` = rolled back (or skipped), so that site "
        "kept its width.",
        "",
        *md,
        "",
        f"Reproduce: `{payload['command'].strip()}` "
        f"({payload['seconds']:.0f} s on {payload['machine'].get('torch_num_threads')} "
        f"threads, {payload['machine'].get('cpu_model')}). Raw results: "
        f"`bench/results/{path.name}`.",
        "",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
