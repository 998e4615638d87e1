"""rmtkd on torch.distributed: the exact merge of covariance statistics (in one process),
and 2-rank runs under torchrun on gloo (tests/distributed_worker.py, and the CLI):
calibration identical to a single-process run, DDP distillation that keeps the replicas
identical, rmtkd.compress with the same plan on every rank and only rank 0 writing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import rmtkd
from rmtkd import distributed as D
from rmtkd.cli import main
from rmtkd.ops.covariance import CovarianceAccumulator

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node=2"]
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    return env


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _rel_f(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# ------------------------------------------------------------- merge math, one process


def _rows(sizes, d=19, seed=0) -> list[torch.Tensor]:
    """Rows with |mean| >> std (the case the pairwise update exists for) and a spike."""
    g = torch.Generator().manual_seed(seed)
    spike = torch.randn(d, generator=g)
    return [torch.randn(b, d, generator=g) + torch.randn(b, 1, generator=g) * 3 * spike + 50.0
            for b in sizes]


def _acc(batches, dtype) -> CovarianceAccumulator:
    acc = CovarianceAccumulator(batches[0].shape[-1] if batches else 19, acc_dtype=dtype)
    for x in batches:
        acc.update(x)
    return acc


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("world", [2, 3, 5])
def test_merge_states_equals_one_accumulation(dtype, tol, world):
    """Ranks simulated by sharding the batches (uneven shards, one empty for world=5):
    the merged n / mean / cov equal one accumulation of all rows, computed in fp64."""
    batches = _rows((37, 41, 29, 53))
    states = [_acc(D.shard(batches, r, world), dtype).state_dict() for r in range(world)]
    assert states[-1]["n"] == (0 if world == 5 else states[-1]["n"])
    merged = CovarianceAccumulator(19, acc_dtype=dtype)
    merged.load_state_dict(D.merge_states(states, dtype))
    got = merged.finalize()
    x = torch.cat(batches).double()
    mean = x.mean(0)
    cov = (x - mean).T @ (x - mean) / len(x)
    assert got.n == len(x) and got.cov.dtype == dtype
    assert _rel(got.mean, mean) < tol
    assert _rel(got.cov, cov) < tol
    # the same as folding the ranks' accumulators together with the pairwise merge
    chained = _acc(D.shard(batches, 0, world), dtype)
    for r in range(1, world):
        chained.merge(_acc(D.shard(batches, r, world), dtype))
    assert _rel(got.cov, chained.finalize().cov.double()) < tol


def test_merged_fit_equals_single_fit():
    batches = _rows((64, 61, 67, 59), d=40, seed=1)
    single = _acc(batches, torch.float64).finalize()
    merged = CovarianceAccumulator(40, acc_dtype=torch.float64)
    merged.load_state_dict(D.merge_states(
        [_acc(D.shard(batches, r, 2), torch.float64).state_dict() for r in range(2)],
        torch.float64))
    a = rmtkd.spikes(merged.finalize().cov, single.n, solver="full")
    b = rmtkd.spikes(single.cov, single.n, solver="full")
    assert a.k == b.k >= 1
    assert _rel_f(a.sigma2, b.sigma2) < 1e-10
    assert _rel_f(a.lambda_plus, b.lambda_plus) < 1e-10


def test_shards_and_sharded_batches():
    items = list(range(7))
    shards = [D.shard(items, r, 3) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert D.shard(items) == items   # one process: everything

    class Shuffled:   # re-iterable, a new seeded order every pass (like compress' _Batches)
        def __init__(self):
            self.gen = torch.Generator().manual_seed(0)

        def __iter__(self):
            return iter(torch.randperm(7, generator=self.gen).tolist())

        def __len__(self):
            return 7

    ranks = [D.ShardedBatches(Shuffled(), r, 2) for r in range(2)]   # same seed per rank
    for _ in range(3):   # three epochs: each a new order, split between the ranks
        passes = [list(s) for s in ranks]
        assert [len(p) for p in passes] == [4, 4] == [len(s) for s in ranks]
        # rank 1's shard is padded with the pass's first batch: every batch is used
        assert sorted(passes[0] + passes[1][:3]) == items
        assert passes[1][3] == passes[0][0]
    assert list(D.ShardedBatches([9], 1, 2)) == [9]   # fewer batches than ranks: padded


def test_single_process_fallbacks(monkeypatch):
    for var in TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    assert D.init_from_env() is False
    assert not D.is_distributed() and D.rank() == 0 and D.world_size() == 1 and D.is_main()
    D.barrier()
    D.check_same([1, 2], "anything")
    assert D.agree(1.5) == 1.5
    accs = {"a": _acc(_rows((5,)), torch.float32)}
    before = accs["a"].state_dict()
    assert D.all_reduce_accumulators(accs) is accs
    assert torch.equal(accs["a"].state_dict()["m2"], before["m2"])
    m = nn.Linear(3, 3)
    assert D.wrap_ddp(m) is m
    with pytest.raises(KeyError):
        with D.all_or_none("step"):
            raise KeyError("x")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="RANK.*not set.*torchrun"):
        D.init_from_env()


def test_cli_distributed_needs_torchrun(monkeypatch, capsys):
    for var in TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SystemExit) as e:
        main(["compress", "--distributed", "--example", "digits-mlp"])
    assert e.value.code == 2
    assert "torchrun --nproc_per_node" in capsys.readouterr().err


# --------------------------------------------------------------- 2 ranks under torchrun


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Run tests/distributed_worker.py on 2 gloo ranks; each rank's JSON."""
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([*TORCHRUN, str(HERE / "distributed_worker.py"), str(out)],
                          env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in res] == [0, 1] and all(r["world"] == 2 for r in res)
    assert all(r["backend"] == "gloo" and r["owned"] for r in res)
    return res


def test_calibration_matches_single_process(ranks):
    # uneven shards: 4 batches (37+29+31+19 rows) and 3 (41+53+47)
    assert [sum(r["calib"]["shard_sizes"]) for r in ranks] == [116, 141]
    for r in ranks:
        for dtype, tol in (("float32", 1e-6), ("float64", 1e-12)):
            for site, v in r["calib"][dtype].items():
                assert v["n"][0] == v["n"][1] == 257, (site, v)
                assert v["dtype"] == f"torch.{dtype}"
                assert v["mean_rel"] < tol and v["cov_rel"] < tol, (dtype, site, v)
                assert v["cov_all_ranks_equal"] and v["mean_all_ranks_equal"]
                assert v["fit"]["k"] == v["fit_single"]["k"] >= 1
                for key in ("sigma2", "lambda_plus"):
                    assert _rel_f(v["fit"][key], v["fit_single"][key]) < tol, (site, key, v)


def test_ddp_distillation_keeps_replicas_identical(ranks):
    a, b = (r["ddp"] for r in ranks)
    assert a["steps"] == b["steps"] == 8   # 2 epochs of ceil(7 / 2) batches
    assert a["shard_len"] == b["shard_len"] == 4
    assert a["shard_rows"] != b["shard_rows"]   # the ranks trained on different batches
    # rank 1 started from other weights: DDP's broadcast and averaged gradients agree
    assert a["params_all_ranks"][0] == a["params_all_ranks"][1] == b["params_all_ranks"][0]
    assert a["moved"] > 1e-3 and not a["training"]


def test_fsdp_distillation_matches_ddp(ranks):
    """FSDP-sharded distillation: the same weights as DDP (up to the reduction order), the
    same on every rank, gathered back into plain parameters."""
    a, b = (r["fsdp"] for r in ranks)
    assert a["fsdp_vs_ddp"] < 1e-5 and b["fsdp_vs_ddp"] < 1e-5, (a["fsdp_vs_ddp"],
                                                                  b["fsdp_vs_ddp"])
    assert a["moved"] > 1e-3
    assert a["fsdp_all_ranks"][0] == a["fsdp_all_ranks"][1]
    assert a["plain_tensors"] and b["plain_tensors"]


def test_compress_same_plan_and_rank0_writes(ranks):
    a, b = (r["compress"] for r in ranks)
    assert a["plan"] == b["plan"] and len(a["plan"]) == 2
    assert any(status == "applied" for *_, status in a["plan"])
    assert a["metrics"] == b["metrics"]
    assert a["params_all_ranks"][0] == a["params_all_ranks"][1]
    assert a["writes"] == len(a["plan"]) and b["writes"] == 0   # only rank 0 checkpoints
    assert a["latest"] and b["latest"]
    # resume from the finished checkpoint (read on every rank): same plan and model
    assert a["resumed_plan"] == a["plan"] == b["resumed_plan"]
    assert a["resumed_params_equal"] and b["resumed_params_equal"]
    assert a["writes_on_resume"] == b["writes_on_resume"] == 0
    # the first site's fit against a single-process calibration: compress accumulates in
    # fp64 here (acc_dtype), so the merged fit equals the single-process fp64 fit to 1e-6
    fit, exact = a["fit"], a["fit_single_fp64"]
    assert fit["k"] == exact["k"] >= 1
    for key in ("sigma2", "lambda_plus"):
        assert _rel_f(fit[key], exact[key]) < 1e-6, (key, fit, exact)


def test_cli_compress_under_torchrun(tmp_path):
    """torchrun -m rmtkd.cli compress --distributed: rank 0 alone prints and writes the
    report; every rank exits cleanly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(),
                          nn.Linear(48, 6))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 3, generator=g) @ (4 * torch.randn(3, 24, generator=g))
    x = x + torch.randn(300, 24, generator=g)
    with torch.no_grad():
        y = model(x).argmax(-1)
    torch.save(model, tmp_path / "model.pt")
    torch.save({"train": (x[:200], y[:200]), "val": (x[200:], y[200:])}, tmp_path / "data.pt")
    (tmp_path / "job.toml").write_text(
        "[compress]\ndistill_epochs = 1\ndistill_min_steps = 4\nwarmup_steps = 1\n"
        "epsilon = 100.0\ncalib_fraction = 0.5\n")
    out = tmp_path / "report"
    proc = subprocess.run(
        [*TORCHRUN, "-m", "rmtkd.cli", "compress", "--distributed", "--model",
         str(tmp_path / "model.pt"), "--data", str(tmp_path / "data.pt"), "--config",
         str(tmp_path / "job.toml"), "--batch-size", "25", "--out", str(out), "--quiet"],
        env=_env(), capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("report: ") == 1, proc.stdout   # rank 0 only
    assert proc.stdout.count("parameters: ") == 1
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["distributed"].startswith("2 ranks")
    assert len(report["history"]) == 2
    assert not (tmp_path / ".report.checkpoint").exists()   # removed once the job is done
    # the written model is the job's final model: its parameter count and its accuracy on
    # the validation split are the ones the job reported (the original's is 100%: y is its
    # own argmax)
    loaded = rmtkd.load(out / "model")
    assert sum(p.numel() for p in loaded.parameters()) == report["final_params"] < \
        report["original_params"] == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        logits = loaded(x[200:])
        acc = 100.0 * float((logits.argmax(-1) == y[200:]).double().mean())
        assert float((logits - model(x[200:])).norm()) > 1e-3   # not the original weights
    assert report["original_metric"] == 100.0
    assert acc == pytest.approx(report["final_metric"], abs=1e-9)
