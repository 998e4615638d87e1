"""Model surgery (rmtkd.reduce): exactness where it should be exact, shapes, parameter counts,
skips and unsupported patterns. Float64 models so that "exact" means ~1e-12."""
import json
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rmtkd.nn import ProjectedLinear
from rmtkd.reduce import Reduction, UnsupportedModuleError, reduce_site



pytestmark = pytest.mark.usefixtures("float64_default")


def orth(d: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g)).Q


def count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def low_rank_linear(d_in: int, d_out: int, rank: int) -> nn.Linear:
    """A Linear whose outputs lie in bias + span(top `rank` left singular vectors)."""
    lin = nn.Linear(d_in, d_out)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d_out, rank) @ torch.randn(rank, d_in) / d_in ** 0.5)
    return lin


def spike_basis(lin: nn.Linear, k: int) -> torch.Tensor:
    """Top-k eigenvectors of the output covariance W W^T (inputs ~ N(0, I))."""
    w = lin.weight.detach()
    return torch.linalg.eigh(w @ w.T).eigenvectors[:, -k:]


# ---------------------------------------------------------------- MLP, project mode
def test_mlp_project_exact_in_subspace_and_param_count():
    torch.manual_seed(0)
    d_in, d, d_out, k = 7, 16, 12, 4
    model = nn.Sequential(low_rank_linear(d_in, d, k), nn.Identity(), nn.Linear(d, d_out)).eval()
    x = torch.randn(64, d_in)
    ref = model(x)
    red = Reduction("2:input", "2", "project", d, k, spike_basis(model[0], k),
                    model[0].bias.detach().clone())
    res = reduce_site(model, red)
    assert res.applied, res.reason
    assert isinstance(model[2], ProjectedLinear) and model[2].rank == k
    assert count(model[2]) == k * (d + d_out) + d_out
    assert res.params_before - res.params_after == d * d_out - k * (d + d_out)
    assert rel(model(x), ref) < 1e-10
    json.dumps(res.to_dict())


def test_mlp_project_consumer_without_bias_gets_mean_correction():
    torch.manual_seed(1)
    d, k = 12, 3
    lin = nn.Linear(d, 10, bias=False)
    model = nn.Sequential(lin)
    U, mean = orth(d, k), torch.randn(d)
    a = mean + torch.randn(50, k) @ U.T  # activations in mean + span(U)
    ref = lin(a)
    assert reduce_site(model, Reduction("0:input", "0", "project", d, k, U, mean)).applied
    assert model[0].bias is not None
    assert rel(model(a), ref) < 1e-10
    off = torch.randn(50, d)  # off the subspace: the consumer sees mean + U U^T (x - mean)
    assert rel(model(off), lin(mean + (off - mean) @ U @ U.T)) < 1e-10


# ---------------------------------------------------------------- MLP, width mode
def nested_mlp(d_in, d, d_out, hidden: nn.Module, rank=None):
    fc1 = nn.Linear(d_in, d) if rank is None else low_rank_linear(d_in, d, rank)
    return nn.Sequential(OrderedDict(
        body=nn.Sequential(OrderedDict(fc1=fc1, act=hidden)),
        head=nn.Sequential(OrderedDict(fc2=nn.Linear(d, d_out), out=nn.Tanh()))))


def test_mlp_width_exact_without_nonlinearity_nested_sequentials():
    torch.manual_seed(2)
    d_in, d, d_out, k = 9, 20, 6, 5
    model = nested_mlp(d_in, d, d_out, nn.Dropout(0.3), rank=k).eval()
    x = torch.randn(40, d_in)
    ref = model(x)
    fc1 = model.body.fc1
    red = Reduction("head.fc2:input", "head.fc2", "width", d, k, spike_basis(fc1, k),
                    fc1.bias.detach().clone())
    res = reduce_site(model, red)
    assert res.applied, res.reason
    assert (model.body.fc1.out_features, model.head.fc2.in_features) == (k, k)
    assert res.params_before - res.params_after == (d - k) * (d_in + 1 + d_out)
    assert res.params_after == count(model)
    assert rel(model(x), ref) < 1e-10


def test_mlp_width_through_relu_applies_relu_to_the_projection():
    """Through ReLU the reduced net is W2 U relu(U^T h) + b2 + W2 r: not the original."""
    torch.manual_seed(3)
    d_in, d, d_out, k = 8, 24, 4, 6
    model = nested_mlp(d_in, d, d_out, nn.ReLU()).eval()
    x = torch.randn(500, d_in)
    ref = model(x)
    acts = model.body(x)
    U, mean = torch.linalg.eigh(torch.cov(acts.T)).eigenvectors[:, -k:], acts.mean(0)
    fc1, fc2 = model.body.fc1, model.head.fc2
    r = mean - U @ (U.T @ mean)
    expect = torch.tanh(fc2(torch.relu(fc1(x) @ U) @ U.T) + fc2.weight @ r)
    red = Reduction("head.fc2:input", "head.fc2", "width", d, k, U, mean)
    assert reduce_site(model, red).applied
    out = model(x)
    assert rel(out, expect) < 1e-10
    assert rel(out, ref) > 1e-3


def test_mlp_width_layernorm_between_is_unsupported():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(UnsupportedModuleError, match="project"):
        reduce_site(model, Reduction("3:input", "3", "width", 8, 2, orth(8, 2)))


def test_width_attention_like_siblings_are_not_a_chain():
    class QKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.key, self.value = nn.Linear(8, 8), nn.Linear(8, 8)

    with pytest.raises(UnsupportedModuleError, match="no producer"):
        reduce_site(QKV(), Reduction("value:input", "value", "width", 8, 2, orth(8, 2)))


def test_reduction_that_saves_nothing_is_skipped_and_model_untouched():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 5))
    state = {n: t.clone() for n, t in model.state_dict().items()}
    modules = list(model)
    for mode, k in (("project", 12), ("width", 16)):
        res = reduce_site(model, Reduction("2:input", "2", mode, 16, k, orth(16, k)))
        assert not res.applied and "would not reduce" in res.reason
        assert res.params_before == res.params_after == count(model)
    assert list(model) == modules
    assert all(torch.equal(t, state[n]) for n, t in model.state_dict().items())


# ---------------------------------------------------------------- CNN
def randomise_bn(bn: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()


class BasicBlock(nn.Module):
    def __init__(self, c: int, m: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, m, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(m)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(m, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        for bn in (self.bn1, self.bn2):
            randomise_bn(bn)

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x)


class Bottleneck(nn.Module):
    def __init__(self, c: int, m: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, m, 1, bias=False), nn.BatchNorm2d(m)
        self.conv2, self.bn2 = nn.Conv2d(m, m, 3, padding=1, bias=False), nn.BatchNorm2d(m)
        self.conv3, self.bn3 = nn.Conv2d(m, c, 1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        for bn in (self.bn1, self.bn2, self.bn3):
            randomise_bn(bn)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + x)


def perm_basis(d: int, seed: int = 0) -> torch.Tensor:
    """A full orthonormal basis that commutes with ReLU (a permutation)."""
    return torch.eye(d)[:, torch.randperm(d, generator=torch.Generator().manual_seed(seed))]


@pytest.mark.parametrize("block_type, sites", [
    (BasicBlock, ["conv2"]),
    (Bottleneck, ["conv2", "conv3"]),
])
def test_cnn_width_full_basis_is_exact_bn_folded(block_type, sites):
    torch.manual_seed(5)
    block = block_type(4, 6).eval()
    x = torch.randn(2, 4, 7, 7)
    ref = block(x)
    for i, name in enumerate(sites):
        d = block.get_submodule(name).in_channels
        res = reduce_site(block, Reduction(f"{name}:input", name, "width", d, d,
                                           perm_basis(d, i), torch.randn(d)), force=True)
        assert res.applied
        assert isinstance(getattr(block, {"conv2": "bn1", "conv3": "bn2"}[name]), nn.Identity)
    assert rel(block(x), ref) < 1e-10


def test_cnn_width_basic_block_shapes_and_param_count():
    torch.manual_seed(6)
    c, m, k = 4, 10, 3
    block = BasicBlock(c, m).eval()
    res = reduce_site(block, Reduction("conv2:input", "conv2", "width", m, k, orth(m, k),
                                       torch.randn(m)))
    assert res.applied, res.reason
    assert (block.conv1.out_channels, block.conv2.in_channels) == (k, k)
    assert isinstance(block.bn1, nn.Identity)
    assert block.conv1.bias.shape == (k,) and block.conv2.bias.shape == (c,)
    assert res.params_before - res.params_after == 2 * (m - k) * c * 9 + 2 * m - k - c
    assert block(torch.randn(1, c, 5, 5)).shape == (1, c, 5, 5)


def test_cnn_width_exact_in_subspace_without_nonlinearity():
    """conv -> BN -> Dropout2d -> padding-free conv: activations in mean + span(U) exactly."""
    torch.manual_seed(7)
    c, m, k = 3, 8, 2
    conv1 = nn.Conv2d(c, m, 3, padding=1, bias=True)
    with torch.no_grad():  # output channels of rank k
        conv1.weight.copy_((torch.randn(m, k) @ torch.randn(k, c * 9)).view(m, c, 3, 3))
    bn = nn.BatchNorm2d(m)
    randomise_bn(bn)
    model = nn.Sequential(conv1, bn, nn.Dropout2d(0.5), nn.Conv2d(m, 5, 3)).eval()
    x = torch.randn(2, c, 6, 6)
    ref = model(x)
    acts = model[:3](x).permute(0, 2, 3, 1).reshape(-1, m)  # positions are the samples
    mean = acts.mean(0)
    U = torch.linalg.eigh(torch.cov(acts.T)).eigenvectors[:, -k:]
    assert reduce_site(model, Reduction("3:input", "3", "width", m, k, U, mean)).applied
    assert isinstance(model[1], nn.Identity) and model[0].out_channels == k
    assert rel(model(x), ref) < 1e-10


def in_subspace(n, d, k, hw, U, mean):
    z = torch.randn(n, hw, hw, k)
    return (mean + z @ U.T).permute(0, 3, 1, 2)


def test_cnn_project_1x1_exact_and_padded_exact_inside():
    torch.manual_seed(8)
    d, k = 12, 3
    U, mean = orth(d, k), torch.randn(d)
    x = in_subspace(2, d, k, 6, U, mean)
    conv1 = nn.Conv2d(d, 7, 1)
    ref1 = conv1(x)
    model = nn.Sequential(conv1)
    res = reduce_site(model, Reduction("0:input", "0", "project", d, k, U, mean))
    assert res.applied
    proj, conv = model[0]
    assert proj.weight.shape == (k, d, 1, 1) and proj.bias is None
    assert conv.in_channels == k and count(model) == k * d + 7 * k + 7
    assert rel(model(x), ref1) < 1e-10
    conv3 = nn.Conv2d(d, 7, 3, padding=1)  # zero padding: exact away from the border only
    ref3 = conv3(x)
    model = nn.Sequential(conv3)
    assert reduce_site(model, Reduction("0:input", "0", "project", d, k, U, mean)).applied
    out = model(x)
    assert rel(out[..., 1:-1, 1:-1], ref3[..., 1:-1, 1:-1]) < 1e-10
    assert rel(out, ref3) > 1e-6


# ---------------------------------------------------------------- errors, records
@pytest.mark.parametrize("consumer", [nn.Embedding(10, 4), nn.Conv1d(4, 4, 3)])
def test_unsupported_consumer_lists_supported(consumer):
    model = nn.Sequential(consumer)
    with pytest.raises(UnsupportedModuleError, match="Supported: .*nn.Linear.*nn.Conv2d"):
        reduce_site(model, Reduction("0:input", "0", "project", 4, 2, orth(4, 2)))


def test_grouped_conv_and_bad_records_raise():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(UnsupportedModuleError, match="groups=2"):
        reduce_site(model, Reduction("0:input", "0", "project", 4, 2, orth(4, 2)))
    with pytest.raises(ValueError, match="shape"):
        Reduction("s", "0", "width", 4, 2, torch.randn(4, 3))
    with pytest.raises(ValueError, match="orthonormal"):
        reduce_site(nn.Sequential(nn.Linear(4, 2)),
                    Reduction("0:input", "0", "project", 4, 2, torch.randn(4, 2)))
    with pytest.raises(ValueError, match="input features"):
        reduce_site(nn.Sequential(nn.Linear(5, 2)),
                    Reduction("0:input", "0", "project", 4, 2, orth(4, 2)))


def test_from_fit_and_to_dict():
    site = SimpleNamespace(name="net.2:input", module_name="net.2", dim=6, where="input")
    fit = SimpleNamespace(k=2, eigenvectors=orth(6, 4).numpy())
    stats = SimpleNamespace(mean=torch.zeros(6))
    red = Reduction.from_fit(site, fit, stats, mode="project")
    assert red.basis.shape == (6, 2) and red.mean is not None
    assert json.loads(json.dumps(red.to_dict()))["k"] == 2
