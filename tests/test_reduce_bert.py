"""BERT surgery (rmtkd.reduce.transformer through the BERT adapter) on tiny random Hugging Face models in float64, eval mode:
feed-forward width and project modes, attention value/output per head, unsupported modules,
recorded widths and rebuild."""
import copy
import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForSequenceClassification, BertModel  # noqa: E402

from rmtkd.nn import ProjectedLinear  # noqa: E402
from rmtkd.reduce import (HeadPaddedLinear, HeadSelectLinear, Reduction,  # noqa: E402
                          UnsupportedModuleError, apply_widths, head_reduction,
                          reduce_site)
from rmtkd.reduce.maths import select_units  # noqa: E402

H, HEADS, HD, FF, L = 32, 4, 8, 64, 2


pytestmark = pytest.mark.usefixtures("float64_default")


def config(**kw) -> BertConfig:
    return BertConfig(hidden_size=H, num_hidden_layers=L, num_attention_heads=HEADS,
                      intermediate_size=FF, vocab_size=100, max_position_embeddings=32,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)


def bert(cls=BertModel, seed: int = 0):
    torch.manual_seed(seed)
    model = cls(config()).to(torch.float64).eval()
    return model


def inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def out(model):
    with torch.no_grad():
        o = model(**inputs())
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def orth(d, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g)).Q


def count(m):
    return sum(p.numel() for p in m.parameters())


def project_hook(model, name, basis, mean):
    """Reference: the consumer's input replaced by mean + U U^T (x - mean)."""
    P = basis @ basis.T

    def hook(_module, args):
        x = args[0]
        return (mean + (x - mean) @ P,) + tuple(args[1:])
    model.get_submodule(name).register_forward_pre_hook(hook)
    return model


def test_ffn_width_full_permutation_is_exact():
    model = bert()
    ref = out(model)
    perm = torch.eye(FF)[:, torch.randperm(FF, generator=torch.Generator().manual_seed(2))]
    name = "encoder.layer.0.output.dense"
    res = reduce_site(model, Reduction("s", name, "width", FF, FF, perm, torch.randn(FF)),
                      force=True)
    assert res.applied and res.params_before == res.params_after
    torch.testing.assert_close(out(model), ref, rtol=0, atol=1e-10)
    assert [b['mlp'] for b in model.config.rmtkd_blocks] == [FF, FF]


def rel(a, b):
    return float((a - b).norm() / b.norm())


def spd(d, seed):
    A = torch.randn(d, d, generator=torch.Generator().manual_seed(seed))
    return A @ A.T / d + 0.1 * torch.eye(d)


def select_hook(model, name, units, recon, mean):
    """Reference of a selecting width cut: the consumer's input x replaced by its
    reconstruction from the kept units S, mean + R (x_S - mean_S)."""
    def hook(_module, args):
        x = args[0]
        return (mean + (x[..., units] - mean[units]) @ recon.T,) + tuple(args[1:])
    model.get_submodule(name).register_forward_pre_hook(hook)
    return model


def rotate_hook(model, intermediate, basis, mean):
    """Reference of a rotating width cut of ``output.dense(act(intermediate.dense(h)))``: the
    producer keeps z U (k values), the activation runs on those, and the consumer reads
    (I - U U^T) mean + U act(U^T z)."""
    residual = mean - basis @ (basis.T @ mean)

    def hook(module, args, _out):
        z = module.dense(args[0])
        return residual + module.intermediate_act_fn(z @ basis) @ basis.T
    model.get_submodule(intermediate).register_forward_hook(hook)
    return model


@pytest.mark.parametrize("surgery", ["select", "rotate"])
def test_ffn_width_k_lt_d_matches_reference(surgery):
    """A width cut at k < d: shapes, parameters, and the outputs of the float64 reference
    (the original model with the consumer's input rebuilt as the surgery says)."""
    model = bert(BertForSequenceClassification)
    uncut = out(model)
    before = count(model)
    layer_name = "bert.encoder.layer.1"
    name = f"{layer_name}.output.dense"
    k = 20
    U = orth(FF, k, seed=8)
    mean = torch.randn(FF, generator=torch.Generator().manual_seed(9))
    reference = copy.deepcopy(model)
    if surgery == "select":
        units, recon = select_units(spd(FF, 10), U)
        select_hook(reference, name, units, recon, mean)
    else:
        units = recon = None
        rotate_hook(reference, f"{layer_name}.intermediate", U, mean)
    res = reduce_site(model, Reduction("s", name, "width", FF, k, U, mean, units, recon,
                                       surgery))
    assert res.applied
    layer = model.bert.encoder.layer[1]
    assert layer.intermediate.dense.out_features == k and layer.output.dense.in_features == k
    # producer: H x k + k; consumer: k x H + H (the mean term folds into its bias)
    saved = (H * FF + FF + FF * H) - (H * k + k + k * H)
    assert count(model) == res.params_after == before - saved
    got, want = out(model), out(reference)
    assert rel(got, want) < 1e-10
    assert rel(want, uncut) > 1e-3        # the cut changed the model: the check can fail
    assert [b['mlp'] for b in model.config.rmtkd_blocks] == [FF, k]
    model.train()
    model(**inputs()).logits.sum().backward()  # trainable afterwards
    assert model.bert.encoder.layer[1].output.dense.weight.grad is not None


def test_ffn_project_is_exact_on_subspace():
    model = bert()
    name = "encoder.layer.0.output.dense"
    k, U, mean = 12, orth(FF, 12, seed=3), torch.randn(FF)
    reference = project_hook(copy.deepcopy(model), name, U, mean)
    reduce_site(model, Reduction("s", name, "project", FF, k, U, mean))
    assert isinstance(model.get_submodule(name), ProjectedLinear)
    torch.testing.assert_close(out(model), out(reference), rtol=0, atol=1e-10)
    assert [b['ranks'] for b in model.config.rmtkd_blocks] == [{"output.dense": k}, {}]
    assert [b['mlp'] for b in model.config.rmtkd_blocks] == [FF, FF]


@pytest.mark.parametrize("basis", ["per-head covariance", "general orthogonal"])
def test_attention_width_full_bases_are_exact(basis):
    model = bert()
    ref = out(model)
    name = "encoder.layer.0.attention.output.dense"
    if basis == "general orthogonal":
        red = Reduction("s", name, "width", H, H, orth(H, H, seed=4), torch.randn(H))
    else:
        A = torch.randn(H, H)
        red = head_reduction("s", name, A @ A.T, HEADS, HD, mean=torch.randn(H))
    res = reduce_site(model, red, force=True)
    assert res.applied
    attn = model.encoder.layer[0].attention
    assert isinstance(attn.self.value, HeadPaddedLinear)
    assert isinstance(attn.output.dense, HeadSelectLinear)
    assert attn.self.value.head_dims == [HD] * HEADS
    torch.testing.assert_close(out(model), ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("ks", [3, [1, 2, 0, 8]])
def test_attention_width_k_lt_head_dim_exact_projection(ks):
    model = bert(BertForSequenceClassification)
    before = count(model)
    name = "bert.encoder.layer.1.attention.output.dense"
    A = torch.randn(H, H, generator=torch.Generator().manual_seed(5))
    mean = torch.randn(H)
    red = head_reduction("s", name, A @ A.T, HEADS, ks, mean=mean)
    assert red.k == (3 * HEADS if ks == 3 else 11)
    reference = project_hook(copy.deepcopy(model), name, red.basis, mean)
    res = reduce_site(model, red)
    assert res.applied
    K = red.k
    dims = [ks] * HEADS if isinstance(ks, int) else ks
    kept = [d for d in dims if d]
    # a head without value dims is removed whole: its query and key rows (and biases) too
    saved = (2 * H * H + 2 * H) - (H * K + K + K * H + H) + \
        (HEADS - len(kept)) * 2 * (HD * H + HD)
    assert count(model) == res.params_after == before - saved
    self_attn = model.bert.encoder.layer[1].attention.self
    assert self_attn.query.out_features == self_attn.key.out_features == len(kept) * HD
    torch.testing.assert_close(out(model), out(reference), rtol=0, atol=1e-10)
    assert [b['value_heads'] for b in model.config.rmtkd_blocks] == [None, kept]
    # reducing the same site again (now a HeadSelectLinear consumer, its input the padded
    # context of the heads kept) composes: the cut model with that input x replaced by P2 x
    n = len(kept) * HD
    red2 = head_reduction("s", name, (A @ A.T)[:n, :n], len(kept), [min(1, d) for d in kept])
    reference2 = project_hook(copy.deepcopy(model), name, red2.basis, torch.zeros(n))
    once = out(model)
    assert reduce_site(model, red2).applied
    assert rel(out(model), out(reference2)) < 1e-10
    assert rel(out(reference2), once) > 1e-3


def test_attention_project_is_exact():
    model = bert()
    name = "encoder.layer.1.attention.output.dense"
    U, mean = orth(H, 10, seed=6), torch.randn(H)
    reference = project_hook(copy.deepcopy(model), name, U, mean)
    res = reduce_site(model, Reduction("s", name, "project", H, 10, U, mean))
    assert res.applied and isinstance(model.get_submodule(name), ProjectedLinear)
    torch.testing.assert_close(out(model), out(reference), rtol=0, atol=1e-10)
    assert [b['ranks'] for b in model.config.rmtkd_blocks] == [{}, {"attention.output.dense": 10}]


@pytest.mark.parametrize("name,d", [("encoder.layer.0.attention.self.query", H),
                                    ("encoder.layer.0.attention.self.value", H),
                                    ("encoder.layer.0.intermediate.dense", H),
                                    ("pooler.dense", H)])
@pytest.mark.parametrize("mode", ["width", "project"])
def test_other_bert_modules_are_left_alone(name, d, mode):
    model = bert()
    with pytest.raises(UnsupportedModuleError, match="left alone") as err:
        reduce_site(model, Reduction("s", name, mode, d, 4, orth(d, 4)))
    assert "output.dense" in str(err.value)


def test_width_mismatch_is_an_error():
    model = bert()
    with pytest.raises(ValueError, match="d="):
        reduce_site(model, Reduction("s", "encoder.layer.0.output.dense", "width", 50, 5,
                                     orth(50, 5)))


def test_recorded_widths_rebuild_and_load():
    model = bert(BertForSequenceClassification)
    p = "bert.encoder.layer"
    reduce_site(model, Reduction("a", f"{p}.0.output.dense", "width", FF, 16, orth(FF, 16),
                                 torch.randn(FF)))
    A = torch.randn(H, H)
    reduce_site(model, head_reduction("b", f"{p}.1.attention.output.dense", A @ A.T, HEADS,
                                      [2, 3, 4, 5], mean=torch.randn(H)))
    reduce_site(model, Reduction("c", f"{p}.1.output.dense", "project", FF, 9, orth(FF, 9)))
    cfg = json.loads(model.config.to_json_string())
    assert [b["mlp"] for b in cfg["rmtkd_blocks"]] == [16, FF]
    assert [b["value_heads"] for b in cfg["rmtkd_blocks"]] == [None, [2, 3, 4, 5]]
    assert [b["ranks"] for b in cfg["rmtkd_blocks"]] == [{}, {"output.dense": 9}]
    fresh = BertForSequenceClassification(BertConfig.from_dict(cfg)).to(torch.float64).eval()
    apply_widths(fresh)
    fresh.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(out(fresh), out(model), rtol=0, atol=1e-12)


def test_import_rmtkd_does_not_import_transformers():
    code = ("import sys, rmtkd, rmtkd.reduce, rmtkd.adapters, rmtkd.engine; "
            "assert 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def plant_value_spikes(model, batches, ranks, signal=1.0, noise=0.05, seed=7):
    """Make the per-head covariance of layer 0's attention context (the input of
    attention.output.dense) exactly ``signal^2 M_h M_h^T + noise^2 I`` on ``batches``, with
    M_h (head_dim x r_h) orthogonal columns of norms 1 down to 0.6: r_h spikes far above the
    Marchenko-Pastur edge of an exactly isotropic bulk, known without fitting anything.

    Zero query / key weights make the attention uniform (full masks), so every token's
    context in head h is W_h hbar + b_h, hbar the sequence's mean input. Whitening by the
    covariance C of hbar (C = E L E^T on its range) and W_h = (signal M_h S_h^T + noise
    N_h^T) L^-1/2 E^T, with [S_h, N_h] orthonormal columns, gives W_h C W_h^T = signal^2
    M_h M_h^T + noise^2 I.
    """
    attn = model.encoder.layer[0].attention.self
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in (attn.query, attn.key):
            lin.weight.zero_()
            lin.bias.zero_()
    seen = []
    hook = attn.value.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        for b in batches:
            assert bool(b["attention_mask"].all())
            model(**b)
    hook.remove()
    hbar = torch.cat([h.mean(1, keepdim=True).expand_as(h).reshape(-1, H) for h in seen])
    hc = hbar - hbar.mean(0)
    evals, evecs = torch.linalg.eigh(hc.T @ hc / hc.shape[0])
    keep = evals > 1e-9 * evals.max()      # LayerNorm'ed inputs: hbar sums to ~0, rank H-1
    whiten = (evecs[:, keep] / evals[keep].sqrt()).T          # (rank, H)
    rank = int(keep.sum())
    rows = []
    for r in ranks:
        O = torch.linalg.qr(torch.randn(rank, r + HD, generator=g)).Q   # [S_h, N_h]
        M = torch.linalg.qr(torch.randn(HD, max(r, 1), generator=g)).Q[:, :r]
        M = M * torch.linspace(1.0, 0.6, max(r, 1))[:r]
        rows.append((signal * M @ O[:, :r].T + noise * O[:, r:].T) @ whiten)
    with torch.no_grad():
        attn.value.weight.copy_(torch.cat(rows))
    return model


@pytest.mark.usefixtures("one_thread")
def test_compress_fits_attention_sites_per_head():
    """compress on a BERT attention site fits k per head, on each head's diagonal block of
    the site covariance (a global basis would span every head's dimensions and remove
    nothing). The site's per-head covariance is planted (:func:`plant_value_spikes`): r_h
    strong directions over an isotropic bulk, so the right k per head is r_h."""
    import rmtkd
    from rmtkd.capture import collect_statistics, make_site

    ranks = [1, 3, 2, 2]
    model = bert()
    g = torch.Generator().manual_seed(3)
    batches = [{"input_ids": torch.randint(0, 100, (8, 12), generator=g),
                "attention_mask": torch.ones(8, 12, dtype=torch.long)} for _ in range(6)]
    plant_value_spikes(model, batches, ranks)
    name = "encoder.layer.0.attention.output.dense"
    site = make_site(name, model.get_submodule(name))
    stats = collect_statistics(model, batches, [site], acc_dtype=torch.float64,
                               progress=False)[site.name]
    for h, r in enumerate(ranks):   # the planted spectrum, measured
        block = stats.cov[h * HD:(h + 1) * HD, h * HD:(h + 1) * HD]
        ev = torch.linalg.eigvalsh(block).flip(0)
        torch.testing.assert_close(ev[r:], torch.full((HD - r,), 0.05 ** 2), rtol=1e-6,
                                   atol=0)
        assert bool((ev[:r] > 0.3).all())
    cfg = rmtkd.CompressConfig(task="embedding", sites=[name], distill_epochs=0,
                               epsilon=100.0, calib_fraction=1.0, progress=False)
    res = rmtkd.compress(model, batches, config=cfg)
    (rec,) = res.history
    assert rec.status == "applied", rec.reason
    assert rec.k == sum(ranks)
    value = res.model.encoder.layer[0].attention.self.value
    assert isinstance(value, HeadPaddedLinear) and list(value.head_dims) == ranks
    assert res.final_params < res.original_params
    # the context vectors lie (up to the weak isotropic noise) in the kept per-head subspaces
    assert res.final_metric > 99.0
