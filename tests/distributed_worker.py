"""One rank of tests/test_distributed.py, started by torchrun on gloo (2 CPU processes).

    python -m torch.distributed.run --standalone --nproc_per_node=2 \
        tests/distributed_worker.py OUT_DIR

Every rank runs the same checks and writes OUT_DIR/rank<r>.json with what it measured;
the test asserts on those files (so a failure shows the numbers of every rank):

- "calib": a small MLP calibrated on a sharded, uneven calibration set (odd batch sizes,
  7 batches over 2 ranks) and merged with all_reduce_accumulators, against a
  single-process accumulation of all the data on this rank (relative errors of n, mean,
  cov; spikes() fit of both); the merged covariance gathered from every rank.
- "ddp": distillation under DDP (distributed_distill) on this rank's shard; a flat copy
  of the student's parameters from every rank, and how far it moved.
- "compress": rmtkd.compress end to end on the 2 ranks with a checkpoint dir: the plan
  on every rank, the checkpoint writes per rank, the first site's fit against a
  single-process fit (and the single-process fit's own fp32 error, against fp64); then a
  resume from the finished checkpoint.
- "errors": all_reduce_accumulators with different sites per rank, and all_or_none with
  an error on rank 1 only, raise on every rank.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

torch.set_num_threads(1)

import rmtkd  # noqa: E402
from rmtkd import distributed as D  # noqa: E402
from rmtkd.capture import collect_statistics, find_sites  # noqa: E402
from rmtkd.ops.covariance import CovarianceAccumulator  # noqa: E402

import rmtkd.engine.whole as C  # noqa: E402  (the whole-model strategy)
from rmtkd.engine.data import Batches  # noqa: E402

CALIB_SIZES = (37, 41, 29, 53, 31, 47, 19)   # 7 odd batches: shards of 4 and 3 batches


def mlp(seed: int, d_in: int = 24, hidden: int = 48, n_out: int = 6) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                         nn.ReLU(), nn.Linear(hidden, n_out))


def spiked_inputs(sizes, d: int = 24, rank_: int = 3, seed: int = 1) -> list[torch.Tensor]:
    """Batches of rows with a rank-3 signal on noise and a mean far from 0."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(rank_, d, generator=g) * 4
    out = []
    for b in sizes:
        z = torch.randn(b, rank_, generator=g)
        out.append(z @ mix + torch.randn(b, d, generator=g) + 5.0)
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def fit_dict(fit) -> dict:
    return {"k": int(fit.k), "sigma2": float(fit.sigma2), "lambda_plus": float(fit.lambda_plus)}


def gathered(t: torch.Tensor) -> list[list[float]]:
    out = [torch.empty_like(t) for _ in range(D.world_size())]
    torch.distributed.all_gather(out, t.contiguous())
    return [x.flatten().tolist() for x in out]


def check_calibration() -> dict:
    model = mlp(0).eval()
    batches = [(x, torch.zeros(len(x), dtype=torch.long)) for x in spiked_inputs(CALIB_SIZES)]
    sites = find_sites(model, batches[0])
    res: dict = {"sites": [s.name for s in sites],
                 "shard_sizes": [len(x) for x, _ in D.shard(batches)]}
    for dt in (torch.float32, torch.float64):
        name = str(dt).replace("torch.", "")
        merged = D.collect_sharded_statistics(model, batches, sites, acc_dtype=dt,
                                              progress=False)
        single = collect_statistics(model, batches, sites, acc_dtype=dt, progress=False)
        per = {}
        for s in sites:
            m, r = merged[s.name], single[s.name]
            per[s.name] = {
                "n": [m.n, r.n], "mean_rel": rel(m.mean, r.mean), "cov_rel": rel(m.cov, r.cov),
                "dtype": str(m.cov.dtype),
                "fit": fit_dict(rmtkd.spikes(m.cov.double(), m.n, solver="full")),
                "fit_single": fit_dict(rmtkd.spikes(r.cov.double(), r.n, solver="full")),
                # bitwise identity of the merged statistics across ranks
                "cov_all_ranks_equal": all(c == gathered(m.cov)[0] for c in gathered(m.cov)),
                "mean_all_ranks_equal": all(c == gathered(m.mean)[0]
                                            for c in gathered(m.mean)),
            }
        res[name] = per
    return res


def check_ddp() -> dict:
    teacher = mlp(0).eval()
    student = mlp(1)   # a different start; DDP broadcasts rank 0's
    if D.rank() == 1:   # ... so make rank 1's differ too: DDP must still agree
        with torch.no_grad():
            for p in student.parameters():
                p.add_(1.0)
    xs = spiked_inputs((16, 17, 15, 16, 13, 16, 18), seed=2)
    train = Batches([(x, teacher(x).argmax(-1)) for x in xs], what="train", shuffle=True,
                       seed=0)
    start = torch.cat([p.detach().flatten() for p in mlp(1).parameters()])
    info = D.distributed_distill(student, teacher, train, epochs=2, warmup_steps=2, lr=1e-2,
                                 progress=False)
    flat = torch.cat([p.detach().flatten() for p in student.parameters()])
    sharded = D.ShardedBatches(train)
    seen = [int(b[0].shape[0]) for b in sharded]
    return {"steps": info["steps"], "params_all_ranks": gathered(flat),
            "moved": float((flat - start).norm()), "shard_len": len(sharded),
            "shard_rows": seen, "training": student.training}


def check_fsdp() -> dict:
    """The same distillation as check_ddp under DDP and under FSDP (sharded student)."""
    teacher = mlp(0).eval()
    xs = spiked_inputs((16, 17, 15, 16, 13, 16, 18), seed=2)
    data = [(x, teacher(x).argmax(-1)) for x in xs]
    flats = {}
    for how in ("ddp", "fsdp"):
        student = mlp(1)
        if D.rank() == 1:   # rank 0's start must win under both
            with torch.no_grad():
                for p in student.parameters():
                    p.add_(1.0)
        train = Batches(data, what="train", shuffle=True, seed=0)
        D.distributed_distill(student, teacher, train, epochs=2, warmup_steps=2, lr=1e-2,
                              progress=False, data_parallel=how)
        flats[how] = torch.cat([p.detach().flatten() for p in student.parameters()])
    diff = float((flats["fsdp"] - flats["ddp"]).norm() / flats["ddp"].norm())
    moved = float((flats["fsdp"] - torch.cat([p.detach().flatten()
                                              for p in mlp(1).parameters()])).norm())
    return {"fsdp_vs_ddp": diff, "moved": moved, "fsdp_all_ranks": gathered(flats["fsdp"]),
            "plain_tensors": all(type(p) is torch.nn.Parameter for p in student.parameters())}


def check_compress(tmp: Path) -> dict:
    teacher = mlp(0).eval()
    xs = spiked_inputs([25] * 8, seed=4)
    train = [(x, teacher(x).argmax(-1)) for x in xs]
    calib = spiked_inputs((33, 27, 41), seed=5)
    evals = [(x, teacher(x).argmax(-1)) for x in spiked_inputs((30, 30), seed=6)]
    writes = []
    real = C.write_checkpoint

    def counting(*a, **k):
        writes.append(D.rank())
        return real(*a, **k)

    C.write_checkpoint = counting
    cfg = rmtkd.CompressConfig(progress=False, distill_epochs=1, distill_min_steps=4,
                               warmup_steps=1, epsilon=100.0, seed=0,
                               acc_dtype="float64")
    ckpt = tmp / "ckpt"
    res = rmtkd.compress(teacher, train, eval_data=evals, calib_data=calib, config=cfg,
                         checkpoint_dir=ckpt)
    first = res.history[0].site
    site = [s for s in find_sites(teacher, calib[0]) if s.name == first]
    stats64 = collect_statistics(teacher, calib, site, acc_dtype=torch.float64,
                                 progress=False)[first]
    fp64_fit = rmtkd.spikes(stats64.cov, stats64.n, seed=0)
    flat = torch.cat([p.detach().flatten() for p in res.model.parameters()])
    n_writes = len(writes)
    resumed = rmtkd.compress(teacher, train, eval_data=evals, calib_data=calib, config=cfg,
                             checkpoint_dir=ckpt, resume=True)
    C.write_checkpoint = real
    return {"plan": D.plan_summary(res.history), "writes": n_writes,
            "writes_on_resume": len(writes) - n_writes,
            "fit": fit_dict(res.fits[first]),
            "fit_single_fp64": fit_dict(fp64_fit),
            "metrics": [res.original_metric, res.final_metric],
            "params_all_ranks": gathered(flat),
            "resumed_plan": D.plan_summary(resumed.history),
            "resumed_params_equal": bool(torch.equal(
                flat, torch.cat([p.detach().flatten() for p in resumed.model.parameters()]))),
            "latest": (ckpt / "LATEST").is_file()}


def check_errors() -> dict:
    out = {}
    dim = 4 if D.rank() == 0 else 5
    try:
        D.all_reduce_accumulators({"a": CovarianceAccumulator(dim)})
        out["layout"] = "no error"
    except ValueError as e:
        out["layout"] = str(e)
    try:
        with D.all_or_none("the test step"):
            if D.rank() == 1:
                raise KeyError("only on rank 1")
        out["all_or_none"] = "no error"
    except Exception as e:  # noqa: BLE001
        out["all_or_none"] = f"{type(e).__name__}: {e}"
    return out


def main() -> None:
    out = Path(sys.argv[1])
    owned = D.init_from_env()
    try:
        res = {"rank": D.rank(), "world": D.world_size(), "owned": owned,
               "backend": torch.distributed.get_backend()}
        res["calib"] = check_calibration()
        res["ddp"] = check_ddp()
        res["fsdp"] = check_fsdp()
        res["compress"] = check_compress(out)
        res["errors"] = check_errors()
        (out / f"rank{D.rank()}.json").write_text(json.dumps(res))
    finally:
        D.destroy()


if __name__ == "__main__":
    main()
