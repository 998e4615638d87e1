"""`rmtkd analyze` in-process, and the report writer."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rmtkd import spikes
from rmtkd.cli import main
from rmtkd.report import format_table, write_analysis_report


@pytest.fixture()
def tiny(tmp_path: Path) -> tuple[Path, Path]:
    """A saved 8-16-12-3 MLP and 300 float64 samples as .npy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.Tanh(),
                          nn.Linear(12, 3))
    torch.save(model, tmp_path / "tiny.pt")
    np.save(tmp_path / "data.npy", np.random.default_rng(0).standard_normal((300, 8)))
    return tmp_path / "tiny.pt", tmp_path / "data.npy"


def _exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rmtkd: error: "), err
    return err[0]


def test_analyze_saved_model_writes_report(tiny, tmp_path, monkeypatch, capsys):
    model, data = tiny
    monkeypatch.chdir(tmp_path)
    assert main(["analyze", "--model", str(model), "--data", str(data), "--quiet",
                 "--batch-size", "64"]) == 0
    out = tmp_path / "reports" / "tiny"                      # default: reports/<model stem>
    assert "report:" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert list(report["sites"]) == ["2:input", "4:input"]
    for name, site in report["sites"].items():
        assert site["n"] == 300 and (out / site["plot"]).stat().st_size > 10_000
        assert len(site["eigenvalues"]) == site["d_eff"] and 0 <= site["k"] <= site["d"]
        assert f"({site['plot']})" in (out / "index.md").read_text()
    assert report["meta"]["batch_size"] == 64
    assert not [p for p in tmp_path.joinpath("reports").iterdir() if p.name.startswith(".")]


def test_small_calibration_warns_in_one_line(tiny, tmp_path, capsys):
    """n < d: the fit still runs and the CLI prints one 'rmtkd: warning:' line per site."""
    model, _ = tiny
    few = tmp_path / "few.npy"
    np.save(few, np.random.default_rng(1).standard_normal((10, 8)))   # 10 samples, d = 16
    assert main(["analyze", "--model", str(model), "--data", str(few), "--quiet",
                 "--out", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("rmtkd: warning: ") for line in err), err
    assert "gamma = d/n = 1.6" in err[0] and "gamma = d/n = 1.2" in err[1]


def test_existing_dir_needs_force(tiny, tmp_path, capsys):
    model, data = tiny
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    argv = ["analyze", "--model", str(model), "--data", str(data), "--out", str(out), "--quiet"]
    assert _exit_code(argv) == 2
    assert "--force" in _one_error_line(capsys)
    assert (out / "keep.txt").exists()
    assert main(argv + ["--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "report.json").exists()


def test_data_directory_and_tuple_pt(tiny, tmp_path):
    model, _ = tiny
    d = tmp_path / "chunks"
    d.mkdir()
    x = torch.randn(250, 8)
    np.save(d / "a.npy", x[:100].numpy())
    torch.save((x[100:], torch.zeros(150)), d / "b.pt")
    out = tmp_path / "r"
    assert main(["analyze", "--model", str(model), "--data", str(d), "--out", str(out),
                 "--quiet", "--sites", "4", "--acc-dtype", "float64"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["sites"]) == ["4:input"] and report["sites"]["4:input"]["n"] == 250


@pytest.mark.parametrize("problem,needle", [
    ("integer", "integer"), ("shape", "batch 0"), ("missing-model", "does not exist"),
    ("missing-data", "does not exist"), ("empty-dir", "no .pt"), ("state-dict", "nn.Module"),
    ("bad-glob", "available"), ("one-sample", "at least 2"),
])
def test_user_errors_exit_2_with_one_line(tiny, tmp_path, capsys, problem, needle):
    model, data = tiny
    if problem == "integer":
        np.save(data, np.random.default_rng(0).integers(0, 9, (50, 8)))
    elif problem == "shape":
        np.save(data, np.zeros((50, 5), dtype=np.float32))
    elif problem == "missing-model":
        model = tmp_path / "nope.pt"
    elif problem == "missing-data":
        data = tmp_path / "nope.npy"
    elif problem == "empty-dir":
        data = tmp_path / "empty"
        data.mkdir()
    elif problem == "state-dict":
        torch.save(torch.load(model, weights_only=False).state_dict(), model)
    elif problem == "one-sample":
        np.save(data, np.zeros((1, 8), dtype=np.float32))
    argv = ["analyze", "--model", str(model), "--data", str(data), "--quiet",
            "--out", str(tmp_path / "out")]
    if problem == "bad-glob":
        argv += ["--sites", "blocks.*"]
    assert _exit_code(argv) == 2
    assert needle in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_example_digits_mlp_end_to_end(tmp_path, capsys):
    out = tmp_path / "digits"
    assert main(["analyze", "--example", "digits-mlp", "--quiet", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {out / 'index.md'}"
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["test_accuracy"] >= 0.95
    assert list(report["sites"]) == ["net.fc2:input", "net.fc3:input"]
    assert all(0 < s["k"] < s["d"] for s in report["sites"].values())
    assert sorted(p.name for p in out.glob("*.png")) == ["net.fc2_input.png", "net.fc3_input.png"]


def _spiked_fit(d: int, n: int, strengths: list[float], solver: str = "full"):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, d))
    x[:, : len(strengths)] *= np.sqrt(1.0 + np.asarray(strengths))
    return spikes(torch.as_tensor(x.T @ x / n), n, solver=solver,
                  estimator="auto" if solver == "full" else "moments")


def test_report_layouts_and_table(tmp_path):
    fits = {
        "near:input": _spiked_fit(60, 600, [3.0]),
        "far spikes/ok:input": _spiked_fit(60, 600, [500.0, 40.0]),   # log-x panel
        "wide:input": _spiked_fit(80, 40, [50.0]),                       # gamma > 1: MP atom
    }
    far = fits["far spikes/ok:input"]   # as the randomized solver returns it: top values only
    fits["top-only:input"] = replace(far, eigenvalues=far.eigenvalues[:4], full_spectrum=False,
                                     ks_distance=float("nan"))
    out = write_analysis_report(tmp_path / "rep", fits, meta={"what": "test"})
    assert sorted(p.name for p in out.glob("*.png")) == [
        "far_spikes_ok_input.png", "near_input.png", "top-only_input.png", "wide_input.png"]
    table = format_table(fits).splitlines()
    assert table[0].split() == ["site", "d", "n", "gamma", "sigma^2", "lambda_+", "k", "k/d",
                                "estimator", "fit", "(KS)"]
    assert len(table) == 2 + len(fits) and "far spikes/ok:input" in table[3]
    assert table[-1].split()[-1] == "-"                  # no KS without the full spectrum
    with pytest.raises(FileExistsError, match="--force"):
        write_analysis_report(out, fits, meta={})
    assert write_analysis_report(out, {"near:input": fits["near:input"]}, meta={},
                                 force=True) == out
    assert [p.name for p in out.glob("*.png")] == ["near_input.png"]
