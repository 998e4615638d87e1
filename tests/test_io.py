"""rmtkd.save / rmtkd.load: safetensors + plan.json round trips, corruption, bad input."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import rmtkd
from rmtkd.saving import CorruptModelError, UnsupportedModelError, read_plan
from rmtkd.nn import ProjectedLinear


def _same(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    a.eval(), b.eval()
    assert type(a) is type(b)
    assert [(n, p.shape) for n, p in a.named_parameters()] == \
        [(n, p.shape) for n, p in b.named_parameters()]
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_compressed_digits_mlp_round_trip(tmp_path):
    from rmtkd.examples import DigitsMLP, digits_mlp_data, train_digits_mlp

    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny matrices: one thread is fastest on a busy machine
    try:
        model, _ = train_digits_mlp(seed=0, epochs=3, progress=False)
        train, _, evals = digits_mlp_data(seed=0)
        res = rmtkd.compress(model, train, eval_data=evals, config=rmtkd.CompressConfig(
            progress=False, distill_epochs=1, warmup_steps=5, epsilon=100.0))
    finally:
        torch.set_num_threads(threads)
    assert res.plan, "expected at least one applied reduction"
    path = rmtkd.save(res, tmp_path / "m")
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "plan.json"]
    loaded = rmtkd.load(path)
    assert isinstance(loaded, DigitsMLP)
    _same(res.model, loaded, evals[0][0])
    plan = read_plan(path)
    assert plan["rmtkd_version"] == rmtkd.__version__
    assert [r["site"] for r in plan["reductions"]] == [r.site for r in res.plan]
    assert len(plan["history"]) == len(res.history)
    assert plan["final_params"] == res.final_params


def test_projected_linear_round_trip(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Dropout(0.1), nn.LayerNorm(32),
                          ProjectedLinear(32, 8, 5), nn.Tanh(),
                          nn.Sequential(nn.Linear(8, 4, bias=False), nn.SiLU(), nn.Identity()))
    model[4].freeze_basis()
    rmtkd.save(model, tmp_path / "p")
    loaded = rmtkd.load(tmp_path / "p")
    _same(model, loaded, torch.randn(3, 16))
    assert isinstance(loaded[4], ProjectedLinear) and loaded[4].rank == 5
    assert not loaded[4].V.requires_grad and loaded[4].W.requires_grad


def test_conv_batchnorm_round_trip(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.Dropout2d(0.2), nn.MaxPool2d(2),
                          nn.Conv2d(8, 6, (3, 1), stride=(1, 2), dilation=1, groups=2),
                          nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(6, 3))
    model.train()
    model(torch.randn(4, 3, 8, 8))   # non-trivial BN running statistics
    rmtkd.save(model, tmp_path / "c")
    loaded = rmtkd.load(tmp_path / "c")
    assert torch.equal(loaded[1].running_var, model[1].running_var)
    _same(model, loaded, torch.randn(2, 3, 8, 8))


def test_shared_module_round_trip(tmp_path):
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    rmtkd.save(model, tmp_path / "s")
    loaded = rmtkd.load(tmp_path / "s")
    assert loaded[0] is loaded[2]
    _same(model, loaded, torch.randn(2, 4))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corrupted_weights_raise(tmp_path, damage):
    rmtkd.save(nn.Sequential(nn.Linear(8, 8)), tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    data = bytearray(f.read_bytes())
    if damage == "flip":
        data[-3] ^= 0xFF
        f.write_bytes(bytes(data))
    elif damage == "truncate":
        f.write_bytes(bytes(data[: len(data) // 2]))
    else:
        f.unlink()
    with pytest.raises(CorruptModelError, match="corrupted|incomplete"):
        rmtkd.load(tmp_path / "m")


def test_corrupted_plan_raises(tmp_path):
    rmtkd.save(nn.Sequential(nn.Linear(8, 8)), tmp_path / "m")
    (tmp_path / "m" / "plan.json").write_text('{"format": "rmtkd-mo')
    with pytest.raises(CorruptModelError, match="not valid JSON"):
        rmtkd.load(tmp_path / "m")


def test_unsupported_module_lists_what_is_supported(tmp_path):
    class Custom(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(UnsupportedModelError, match="Custom.*supports.*Linear.*Conv2d"):
        rmtkd.save(nn.Sequential(nn.Linear(2, 2), Custom()), tmp_path / "u")
    with pytest.raises(UnsupportedModelError, match="LSTM"):
        rmtkd.save(nn.LSTM(2, 2), tmp_path / "u")
    assert not (tmp_path / "u").exists()
    assert list(tmp_path.iterdir()) == []   # nothing half-written


def test_existing_path_needs_overwrite(tmp_path):
    a, b = nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 3))
    rmtkd.save(a, tmp_path / "m")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        rmtkd.save(b, tmp_path / "m")
    rmtkd.save(b, tmp_path / "m", overwrite=True)
    assert rmtkd.load(tmp_path / "m")[0].out_features == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_plan_records_sha256(tmp_path):
    import hashlib

    rmtkd.save(nn.Sequential(nn.Linear(2, 2)), tmp_path / "m")
    plan = json.loads((tmp_path / "m" / "plan.json").read_text())
    digest = hashlib.sha256((tmp_path / "m" / "model.safetensors").read_bytes()).hexdigest()
    assert plan["sha256"] == digest and plan["format"] == "rmtkd-model"
