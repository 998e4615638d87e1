"""rmtkd.compress end to end on the digits MLP, its stop rules and faults, and the CLI."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import rmtkd
from rmtkd import CompressConfig, CompressionResult, compress
from rmtkd.capture import CalibrationError
from rmtkd.cli import main
from rmtkd.distill import NonFiniteLossError, distill
from rmtkd.nn import ProjectedLinear


def _cfg(**kw) -> CompressConfig:
    return CompressConfig(progress=False, **kw)


def test_compress_digits_end_to_end(digits, outputs):
    model, train, test = digits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = compress(model, train, eval_data=test, config=_cfg())
    assert isinstance(res, CompressionResult)
    assert [r.site for r in res.history] == ["net.fc2:input", "net.fc3:input"]
    assert res.final_params < res.original_params
    assert res.original_metric - res.final_metric <= 2.0
    assert len(res.plan) == sum(r.status == "applied" for r in res.history) >= 1
    assert set(res.fits) == {r.site for r in res.history}
    for r in res.history:
        assert r.status in ("applied", "rolled back") and r.reason
        assert 1 <= r.k < r.d == 256 and r.threshold >= r.lambda_plus > r.sigma2 > 0
        assert not math.isnan(r.metric_reduced) and not math.isnan(r.metric_after)
        json.dumps(r.to_dict())
    assert res.history[-1].params_after == res.final_params
    # The final metric is the model's, on the held-out data.
    acc = (outputs(res.model, test).argmax(1) == torch.cat([y for _, y in test])).float()
    assert acc.mean().item() * 100 == pytest.approx(res.final_metric)
    # The caller's model is left alone.
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert "parameters: 85,002 ->" in res.summary()


def test_project_mode_uses_projected_linear(digits):
    model, train, test = digits
    res = compress(model, train, eval_data=test, config=_cfg(mode="project", epsilon=100.0))
    first, last = res.history
    assert first.status == "applied" and isinstance(res.model.net.fc2, ProjectedLinear)
    # fc3 has 10 outputs: a rank-k projection of its 256 inputs would add parameters.
    assert last.status == "skipped" and "would not reduce" in last.reason
    assert isinstance(res.model.net.fc3, nn.Linear) and last.params_after == first.params_after
    assert res.final_params < res.original_params and len(res.plan) == 1


def test_violation_rolls_back_every_step(digits, outputs):
    model, train, test = digits
    res = compress(model, train, eval_data=test, config=_cfg(epsilon=-100.0))
    assert len(res.history) == 2
    assert all(r.status == "rolled back" and "epsilon" in r.reason for r in res.history)
    assert res.plan == [] and res.final_params == res.original_params
    assert res.final_metric == res.original_metric
    assert torch.equal(outputs(res.model, test), outputs(model, test))


def test_violation_stop_ends_the_run(digits):
    model, train, test = digits
    res = compress(model, train, eval_data=test,
                   config=_cfg(epsilon=-100.0, on_violation="stop"))
    assert len(res.history) == 1 and res.history[0].status == "rolled back"
    assert "stopping" in res.history[0].reason


def test_nan_during_distillation_is_rolled_back(digits, outputs):
    model, train, test = digits
    res = compress(model, train, eval_data=test, config=_cfg(lr=float("inf")))
    assert len(res.history) == 2
    for r in res.history:
        assert r.status == "rolled back" and "diverged" in r.reason and "NaN" in r.reason
    assert torch.equal(outputs(res.model, test), outputs(model, test))
    assert all(torch.isfinite(p).all() for p in res.model.parameters())


def test_distill_raises_on_non_finite_loss():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    teacher = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(32, 4)
    x[5, 1] = float("nan")   # one poisoned sample
    with pytest.raises(NonFiniteLossError, match="batch 0"):
        distill(student, teacher, [(x, torch.randint(0, 3, (32,)))], progress=False)


def test_param_target_and_max_steps_stop_early(digits):
    model, train, test = digits
    res = compress(model, train, eval_data=test, config=_cfg(epsilon=100.0, param_target=0.99))
    assert len(res.history) == 1 and res.history[0].status == "applied"
    assert res.final_params <= 0.99 * res.original_params
    res = compress(model, train, eval_data=test, config=_cfg(max_steps=1))
    assert len(res.history) == 1
    res = compress(model, train, eval_data=test, config=_cfg(max_steps=0))
    assert res.history == [] and res.final_params == res.original_params


def test_rho_min_stops(digits):
    model, train, test = digits
    res = compress(model, train, eval_data=test, config=_cfg(rho_min=0.9))
    assert len(res.history) == 1 and res.history[0].status == "skipped"
    assert "rho_min" in res.history[0].reason and res.final_params == res.original_params


def test_dataset_input_and_embedding_task(digits):
    model, train, test = digits
    ds = torch.utils.data.TensorDataset(torch.cat([x for x, _ in train]),
                                        torch.cat([y for _, y in train]))
    res = compress(model, ds, config=_cfg(max_steps=1, epsilon=100.0))
    assert len(res.history) == 1 and res.history[0].status == "applied"
    res = compress(model, ds, eval_data=test,
                   config=_cfg(task="embedding", max_steps=1, epsilon=100.0))
    assert res.original_metric == pytest.approx(100.0)
    assert 0.0 < res.final_metric <= 100.0 + 1e-4
    assert res.metric_name.startswith("cosine")


def test_wrong_input_shape_names_the_batch(digits):
    model, train, _ = digits
    bad = [(x[:, :60], y) for x, y in train]
    with pytest.raises(CalibrationError, match=r"batch 0.*64"):
        compress(model, bad, config=_cfg())


def test_bad_config_is_a_value_error(digits):
    model, train, _ = digits
    with pytest.raises(ValueError, match="on_violation"):
        compress(model, train, config=_cfg(on_violation="ignore"))


@pytest.mark.parametrize("field, value", [("distil_from", "teacher"),
                                          ("acc_dtype", "float16")])
def test_bad_new_config_fields(digits, field, value):
    model, train, _ = digits
    with pytest.raises(ValueError, match=field):
        compress(model, train, config=_cfg(**{field: value}))


@pytest.mark.parametrize("source", ["previous", "original"])
def test_distil_from_picks_the_teacher(digits, monkeypatch, source):
    """Each step's distillation teacher: the model before the step, or the original."""
    import sys

    C = sys.modules["rmtkd.engine.whole"]   # the whole-model strategy
    model, train, test = digits
    teachers = []

    def spy(student, teacher, batches, **kw):
        teachers.append(copy.deepcopy(teacher))
        with torch.no_grad():   # a visible change, so the next step's "previous" differs
            for p in student.parameters():
                p.mul_(0.999)
        return {}

    monkeypatch.setattr(C, "distributed_distill", spy)
    res = compress(model, train, eval_data=test, config=_cfg(distil_from=source,
                                                             epsilon=100.0))
    assert [r.status for r in res.history] == ["applied", "applied"] and len(teachers) == 2
    x = torch.cat([x for x, _ in test])
    with torch.no_grad():
        same = [torch.equal(t(x), model.eval()(x)) for t in teachers]
    # "previous": step 2's teacher is the cut, scaled model of step 1, not the original
    assert same == ([True, True] if source == "original" else [True, False])


def test_acc_dtype_float64_reaches_the_fit(digits):
    model, train, test = digits
    res = compress(model, train, eval_data=test,
                   config=_cfg(acc_dtype="float64", distill_epochs=0, max_steps=1))
    fit64 = res.fits["net.fc2:input"]
    res32 = compress(model, train, eval_data=test, config=_cfg(distill_epochs=0, max_steps=1))
    fit32 = res32.fits["net.fc2:input"]
    assert fit64.sigma2 != fit32.sigma2   # a different accumulation reached the fit
    assert fit64.sigma2 == pytest.approx(fit32.sigma2, rel=1e-4)


def test_cli_compress_writes_report(tmp_path: Path, capsys):
    out = tmp_path / "out"
    assert main(["compress", "--example", "digits-mlp", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "parameters:" in printed and "latency" in printed
    report = json.loads((out / "report.json").read_text())
    assert [h["site"] for h in report["history"]] == ["net.fc2:input", "net.fc3:input"]
    assert report["config"]["mode"] == "width"
    assert report["summary"]["final_params"] < report["summary"]["original_params"]
    for h in report["history"]:
        assert (out / h["plot"]).stat().st_size > 10_000
    assert "size on disk" in printed and "(test)" in printed and "(validation)" in printed
    index = (out / "index.md").read_text()
    assert "net.fc2:input" in index and "rmtkd.load" in index and "size on disk" in index
    loaded = rmtkd.load(out / "model")
    assert sum(p.numel() for p in loaded.parameters()) == report["final_params"]
    s = report["summary"]
    assert 0 < s["bytes_after"] < s["bytes_before"]
    assert s["latency_ms_before"] > 0 and s["latency_ms_after"] > 0
    assert s["latency_input_shape"] == [1, 64]
    assert s["latency_ms_before"] == min(s["latency_rounds_ms"]["before"])
    assert s["latency_ms_after"] == min(s["latency_rounds_ms"]["after"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    with pytest.raises(SystemExit) as e:
        main(["compress", "--example", "digits-mlp", "--quiet", "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rmtkd: error: ") and "--force" in err[0]


def test_first_sample_is_one_unpadded_sample_and_input_shape_names_it():
    from rmtkd.engine import first_sample, input_shape

    x, y = torch.randn(4, 7), torch.arange(4)
    assert torch.equal(first_sample([(x, y)]), x[:1]) and input_shape(x[:1]) == [1, 7]
    ids = torch.arange(12).view(2, 6)
    right = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    one = first_sample([{"input_ids": ids, "attention_mask": right,
                         "token_type_ids": torch.zeros_like(ids), "labels": y[:2]}])
    assert set(one) == {"input_ids", "attention_mask", "token_type_ids"}
    assert torch.equal(one["input_ids"], ids[:1, :3]) and one["attention_mask"].all()
    assert input_shape(one) == [1, 3]
    left = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])   # left padding: left as it is
    assert first_sample([{"input_ids": ids, "attention_mask": left}])["input_ids"].shape == (1, 6)
