"""Sites and streaming calibration statistics (rmtkd.capture)."""
from __future__ import annotations

import gc
from collections import OrderedDict

import pytest
import torch
from torch import nn

from rmtkd.analysis import analyze_model
from rmtkd.capture import (CalibrationError, NonFiniteActivationError, collect_accumulators,
                           collect_statistics, find_sites)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict([
        ("fc1", nn.Linear(6, 12)), ("act1", nn.ReLU()), ("drop", nn.Dropout(0.5)),
        ("fc2", nn.Linear(12, 10)), ("norm", nn.LayerNorm(10)), ("act2", nn.ReLU()),
        ("fc3", nn.Linear(10, 3)),
    ]))


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x)) + 0.5          # channel means away from 0
        h = torch.relu(self.conv2(h))
        return self.fc(self.pool(h).flatten(1))


class _Reversed(nn.Module):
    """Registration order differs from execution order."""

    def __init__(self) -> None:
        super().__init__()
        self.late = nn.Linear(8, 4)
        self.mid = nn.Linear(8, 8)
        self.first = nn.Linear(5, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.late(torch.relu(self.mid(torch.relu(self.first(x)))))


class _Tokens(nn.Module):
    """Embedding -> fc1 -> fc2 with keyword inputs; padded positions get huge activations."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 6)
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(self.emb(input_ids)))
        h = h.masked_fill(~attention_mask.bool()[..., None], 1e3)
        return self.fc2(h)


def _names(sites) -> list[str]:
    return [s.name for s in sites]


def _capture(model: nn.Module, module: nn.Module, batches, where: str = "input") -> list:
    """Activations of ``module`` captured by hand, in eval mode."""
    got: list[torch.Tensor] = []
    if where == "input":
        h = module.register_forward_pre_hook(lambda m, a: got.append(a[0].clone()))
    else:
        h = module.register_forward_hook(lambda m, a, o: got.append(o.clone()))
    model.eval()
    with torch.no_grad():
        for b in batches:
            if isinstance(b, dict):
                model(**b)
            else:
                model(b[0] if isinstance(b, (tuple, list)) else b)
    h.remove()
    return got


def _ref(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 mean and covariance divided by n."""
    x = rows.double()
    c = x - x.mean(0)
    return x.mean(0), c.T @ c / x.shape[0]


def _assert_stats(stats, rows: torch.Tensor, rtol: float) -> None:
    mean, cov = _ref(rows)
    assert stats.n == rows.shape[0]
    assert torch.linalg.norm(stats.mean.double() - mean) <= rtol * torch.linalg.norm(mean)
    assert torch.linalg.norm(stats.cov.double() - cov) <= rtol * torch.linalg.norm(cov)


# --------------------------------------------------------------------------- site discovery

def test_mlp_sites_skip_raw_input_and_dropout_layernorm_between():
    sites = find_sites(_mlp(), torch.randn(5, 6))
    assert _names(sites) == ["fc2:input", "fc3:input"]
    assert [(s.kind, s.dim, s.module_name, s.where) for s in sites] == [
        ("linear", 12, "fc2", "input"), ("linear", 10, "fc3", "input")]


def test_flatten_view_of_raw_input_counts_as_raw():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    assert _names(find_sites(model, torch.randn(3, 1, 4, 4))) == ["3:input"]


def test_sites_follow_execution_order_not_registration_order():
    model = _Reversed()
    assert _names(find_sites(model, torch.randn(2, 5))) == ["mid:input", "late:input"]


def test_without_example_batch_first_layer_is_assumed_raw():
    assert _names(find_sites(_mlp())) == ["fc2:input", "fc3:input"]


def test_cnn_sites_use_channels():
    sites = find_sites(_CNN(), torch.randn(2, 3, 6, 6))
    assert [(s.name, s.kind, s.dim) for s in sites] == [
        ("conv2:input", "conv2d", 8), ("fc:input", "linear", 24)]


def test_single_feature_inputs_are_not_sites():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1), nn.ReLU(), nn.Linear(1, 3))
    assert _names(find_sites(model, torch.randn(2, 4))) == ["2:input"]
    with pytest.raises(ValueError, match="1 feature"):
        find_sites(model, torch.randn(2, 4), include=["4"])


def test_include_exclude_globs_and_outputs():
    m, x = _mlp(), torch.randn(4, 6)
    assert _names(find_sites(m, x, include=["fc*"])) == ["fc2:input", "fc3:input"]
    # An exact name is taken even though fc1 reads the raw input.
    assert _names(find_sites(m, x, include=["fc1", "fc3"])) == ["fc1:input", "fc3:input"]
    assert _names(find_sites(m, x, exclude=["fc3"])) == ["fc2:input"]
    out = find_sites(m, x, include=["fc1"], where="output")
    assert [(s.name, s.dim) for s in out] == [("fc1:output", 12)]
    with pytest.raises(ValueError, match="include"):
        find_sites(m, x, where="output")


@pytest.mark.parametrize("kw", [{"include": ["conv*"]}, {"exclude": ["fc9"]}, {"include": ["x.y"]}])
def test_patterns_matching_nothing_list_the_modules(kw):
    with pytest.raises(ValueError, match=r"available: fc1, fc2, fc3"):
        find_sites(_mlp(), torch.randn(2, 6), **kw)


# --------------------------------------------------------------------------- statistics

@pytest.mark.parametrize("acc_dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_statistics_match_float64_reference(acc_dtype, rtol):
    model = _mlp()
    torch.manual_seed(1)
    xs = [torch.randn(7, 6) + 3.0, torch.randn(16, 6), torch.randn(5, 6)]
    batches = [xs[0], (xs[1], torch.zeros(16)), [xs[2], torch.ones(5)]]   # all batch forms
    sites = find_sites(model, xs[0], include=["fc2", "fc3", "fc1"])
    model.train()
    stats = collect_statistics(model, batches, sites, acc_dtype=acc_dtype, progress=False)
    assert model.training                                 # mode restored
    assert list(stats) == ["fc1:input", "fc2:input", "fc3:input"]
    for s in sites:
        rows = torch.cat(_capture(model, getattr(model, s.module_name), batches))
        assert stats[s.name].cov.dtype == acc_dtype
        _assert_stats(stats[s.name], rows, rtol)   # Dropout off: eval mode was used


def test_output_site_statistics():
    model, x = _mlp(), torch.randn(30, 6)
    sites = find_sites(model, x, include=["fc2"], where="output")
    stats = collect_statistics(model, [x], sites, acc_dtype=torch.float64, progress=False)
    _assert_stats(stats["fc2:output"], torch.cat(_capture(model, model.fc2, [x], "output")), 1e-10)


def test_conv_spatial_positions_are_samples():
    model = _CNN()
    torch.manual_seed(2)
    batches = [torch.randn(3, 3, 6, 6), torch.randn(2, 3, 6, 6)]
    sites = find_sites(model, batches[0])
    stats = collect_statistics(model, batches, sites, acc_dtype=torch.float64, progress=False)
    acts = _capture(model, model.conv2, batches)                          # [N, 8, 6, 6]
    rows = torch.cat([a.permute(0, 2, 3, 1).reshape(-1, 8) for a in acts])
    assert stats["conv2:input"].n == 5 * 6 * 6
    _assert_stats(stats["conv2:input"], rows, 1e-10)


def test_attention_mask_drops_padding_rows():
    model = _Tokens()
    torch.manual_seed(3)
    batches = []
    for b, t in [(4, 7), (3, 5)]:
        ids = torch.randint(0, 20, (b, t))
        mask = (torch.arange(t) < torch.randint(2, t + 1, (b, 1))).long()
        batches.append({"input_ids": ids, "attention_mask": mask})
    sites = find_sites(model, batches[0])
    assert _names(sites) == ["fc1:input", "fc2:input"]          # embeddings are not raw input
    stats = collect_statistics(model, batches, sites, acc_dtype=torch.float64, progress=False)
    for s in sites:
        acts = _capture(model, getattr(model, s.module_name), batches)
        rows = torch.cat([a[b["attention_mask"].bool()] for a, b in zip(acts, batches)])
        _assert_stats(stats[s.name], rows, 1e-10)
    assert stats["fc2:input"].mean.max() < 1e3                   # the 1e3 padding is excluded


def test_nan_names_site_and_batch_and_removes_hooks():
    model = _mlp()
    bad = torch.randn(4, 6)
    bad[2, 1] = float("nan")
    sites = find_sites(model, bad[:2])
    with pytest.raises(NonFiniteActivationError, match=r"'fc2:input'.*batch 2"):
        collect_statistics(model, [torch.randn(4, 6), torch.randn(4, 6), bad], sites,
                           progress=False)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_empty_data_and_too_few_samples():
    model = _mlp()
    sites = find_sites(model, torch.randn(2, 6))
    with pytest.raises(ValueError, match="empty data set"):
        collect_statistics(model, [], sites, progress=False)
    with pytest.raises(ValueError, match="empty data set"):
        analyze_model(model, iter([]), progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        collect_statistics(model, [torch.randn(1, 6)], sites, progress=False)


def test_integer_input_error_names_the_batch():
    model = _mlp()
    sites = find_sites(model, torch.randn(2, 6))
    with pytest.raises(CalibrationError, match=r"batch 1 .*integer"):
        collect_statistics(model, [torch.randn(3, 6), torch.randint(0, 5, (3, 6))], sites,
                           progress=False)


def _state_numel(acc) -> int:
    return sum(v.numel() for v in vars(acc).values() if isinstance(v, torch.Tensor))


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is torch.Tensor)


def test_memory_is_constant_in_the_number_of_batches():
    model = _mlp()
    sites = find_sites(model, torch.randn(2, 6))

    def run(n_batches: int):
        before = _live_tensors()
        accs = collect_accumulators(model, (torch.randn(32, 6) for _ in range(n_batches)),
                                    sites, progress=False)
        sizes = {name: _state_numel(a) for name, a in accs.items()}
        return accs, sizes, _live_tensors() - before

    accs1, size1, live1 = run(1)
    accs30, size30, live30 = run(30)
    assert accs30["fc2:input"].n == 30 * 32
    assert size1["fc2:input"] >= 12 * 12 and size1 == size30    # state: O(d^2), not O(n)
    assert live1 == live30                                        # no activation kept alive


def test_max_batches_and_iterators():
    model = _mlp()
    sites = find_sites(model, torch.randn(2, 6))
    gen = (torch.randn(10, 6) for _ in range(5))
    stats = collect_statistics(model, gen, sites, progress=False, max_batches=2)
    assert stats["fc2:input"].n == 20
    assert next(gen).shape == (10, 6)          # the third batch was not consumed


def test_analyze_model_on_a_generator():
    model = _mlp()
    fits = analyze_model(model, (torch.randn(64, 6) for _ in range(3)), progress=False,
                         sites=["fc2", "fc3"])
    assert list(fits) == ["fc2:input", "fc3:input"]
    assert [f.n for f in fits.values()] == [192, 192]
    assert fits["fc2:input"].d == 12
