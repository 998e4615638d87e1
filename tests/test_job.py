"""`rmtkd compress --model/--data/--config`: the job file, the data splits, and a run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import rmtkd
from rmtkd.cli import main
from rmtkd.job import JobError, load_splits, read_job_file


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(),
                         nn.Linear(48, 3))


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()


def test_splits_from_a_pt_file_are_batched(tmp_path: Path):
    x, y = _data(70, 0)
    torch.save({"train": (x, y), "test": {"input": x[:10], "labels": y[:10]},
                "calib": x[:20]}, tmp_path / "d.pt")
    s = load_splits(str(tmp_path / "d.pt"), 32)
    assert [len(b[0]) for b in s["train"]] == [32, 32, 6]
    assert torch.equal(s["train"][2][1], y[64:])
    assert set(s["test"][0]) == {"input", "labels"} and len(s["test"][0]["input"]) == 10
    assert [len(b) for b in s["calib"]] == [20]


@pytest.mark.parametrize("bad, match", [
    ({"val": torch.zeros(3, 2)}, "'train' split"),
    ({"train": torch.zeros(3, 2), "dev": torch.zeros(3, 2)}, r"unknown split\(s\) \['dev'\]"),
    ({"train": (torch.zeros(3, 2), torch.zeros(4))}, "different numbers of samples"),
    ({"train": torch.zeros(())}, "scalar"),
    ({"train": ("a", "b")}, "expected tensors"),
])
def test_bad_data_files_are_named(tmp_path: Path, bad, match):
    torch.save(bad, tmp_path / "d.pt")
    with pytest.raises(JobError, match=match):
        load_splits(str(tmp_path / "d.pt"), 8)
    with pytest.raises(JobError, match="does not exist"):
        load_splits(str(tmp_path / "missing.pt"), 8)


def test_job_file_paths_and_unknown_keys(tmp_path: Path):
    (tmp_path / "job.toml").write_text('model = "m.pt"\ndata = "d.pt"\nbatch_size = 16\n'
                                       '[compress]\nepsilon = 5.0\n')
    job = read_job_file(tmp_path / "job.toml")
    assert job["model"] == (tmp_path / "m.pt").resolve() and job["batch_size"] == 16
    assert job["data"] == str((tmp_path / "d.pt").resolve())
    (tmp_path / "bad.toml").write_text('modle = "m.pt"\n')
    with pytest.raises(JobError, match=r"unknown key\(s\) \['modle'\]"):
        read_job_file(tmp_path / "bad.toml")
    (tmp_path / "bad2.toml").write_text('[compress]\nepsilonn = 1\n')
    with pytest.raises(SystemExit) as e:
        main(["compress", "--model", str(tmp_path / "m.pt"), "--data",
              str(tmp_path / "d.pt"), "--config", str(tmp_path / "bad2.toml")])
    assert e.value.code == 2


def test_cli_compress_a_user_model_with_a_job_file(tmp_path: Path, capsys):
    model = _mlp()
    x, y = _data(600, 1)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    torch.save(model, tmp_path / "m.pt")
    xv, yv = _data(200, 2)
    torch.save({"train": (x, y), "val": (xv[:100], yv[:100]), "test": (xv[100:], yv[100:])},
               tmp_path / "d.pt")
    (tmp_path / "job.toml").write_text(
        'model = "m.pt"\ndata = "d.pt"\nout = "rep"\n[compress]\n'
        'epsilon = 100.0\ndistill_epochs = 1\nseed = 4\n')
    assert main(["compress", "--config", str(tmp_path / "job.toml"), "--quiet",
                 "--mode", "project"]) == 0
    printed = capsys.readouterr().out
    assert "accuracy (%) (test)" in printed and "size on disk" in printed
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["config"]["mode"] == "project"          # the flag wins over the file
    assert report["config"]["epsilon"] == 100.0 and report["config"]["seed"] == 4
    assert report["meta"]["batch_size"] == 64
    loaded = rmtkd.load(tmp_path / "rep" / "model")
    assert sum(p.numel() for p in loaded.parameters()) == report["final_params"]
    out = loaded(xv[100:])
    assert out.shape == (100, 3) and torch.isfinite(out).all()


def test_cli_compress_argument_errors(tmp_path: Path, capsys):
    for argv, match in [
        (["compress"], "--example NAME, or --model"),
        (["compress", "--model", str(tmp_path / "m.pt")], "--model needs --data"),
        (["compress", "--example", "digits-mlp", "--data", "x.pt"], "--data goes with"),
        (["compress", "--example", "nope"], "unknown example 'nope'"),
        (["compress", "--model", str(tmp_path / "m.pt"), "--data", "x.pt"], "does not exist"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert match in err, (argv, err)
