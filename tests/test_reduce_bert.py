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


def test_ffn_width_k_lt_d_shapes_params_and_runs():
    model = bert(BertForSequenceClassification)
    before = count(model)
    name = "bert.encoder.layer.1.output.dense"
    k = 20
    res = reduce_site(model, Reduction("s", name, "width", FF, k, orth(FF, k), torch.randn(FF)))
    assert res.applied
    layer = model.bert.encoder.layer[1]
    assert layer.intermediate.dense.out_features == k and layer.output.dense.in_features == k
    saved = (H * FF + FF + FF * H) - (H * k + k + k * H)
    assert count(model) == res.params_after == before - saved
    assert out(model).shape == (3, 2) and torch.isfinite(out(model)).all()
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
    saved = (2 * H * H + 2 * H) - (H * K + K + K * H + H)
    assert count(model) == res.params_after == before - saved
    torch.testing.assert_close(out(model), out(reference), rtol=0, atol=1e-10)
    dims = [ks] * HEADS if isinstance(ks, int) else ks
    assert [b['value_heads'] for b in model.config.rmtkd_blocks] == [None, dims]
    # reducing the same site again (now a HeadSelectLinear consumer) composes
    red2 = head_reduction("s", name, A @ A.T, HEADS, [min(1, d) for d in dims])
    assert reduce_site(model, red2).applied
    assert torch.isfinite(out(model)).all()


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


def test_compress_fits_attention_sites_per_head():
    """compress on a BERT attention site fits k per head, on each head's diagonal block of
    the site covariance (a global basis would span every head's dimensions and remove
    nothing); values of rank 2 per head plus weak noise make every head low-rank."""
    import rmtkd
    from rmtkd.capture import collect_statistics, make_site

    model = bert()
    with torch.no_grad():
        for layer in model.encoder.layer:
            g = torch.Generator().manual_seed(7)
            w = torch.cat([torch.randn(HD, 2, generator=g, dtype=torch.float64)
                           @ torch.randn(2, H, generator=g, dtype=torch.float64)
                           for _ in range(HEADS)])
            layer.attention.self.value.weight.copy_(
                w + 0.02 * torch.randn(H, H, generator=g, dtype=torch.float64))
    g = torch.Generator().manual_seed(3)
    batches = [{"input_ids": torch.randint(0, 100, (8, 12), generator=g),
                "attention_mask": torch.ones(8, 12, dtype=torch.long)} for _ in range(6)]
    name = "encoder.layer.0.attention.output.dense"
    site = make_site(name, model.get_submodule(name))
    stats = collect_statistics(model, batches, [site], progress=False)[site.name]
    expect = [rmtkd.spikes(stats.cov[h * HD:(h + 1) * HD, h * HD:(h + 1) * HD], stats.n).k
              for h in range(HEADS)]
    assert 0 < sum(expect) < H
    cfg = rmtkd.CompressConfig(task="embedding", sites=[name], distill_epochs=0,
                               epsilon=100.0, calib_fraction=1.0, progress=False)
    res = rmtkd.compress(model, batches, config=cfg)
    (rec,) = res.history
    assert rec.status == "applied", rec.reason
    assert rec.k == sum(expect)
    value = res.model.encoder.layer[0].attention.self.value
    assert isinstance(value, HeadPaddedLinear) and list(value.head_dims) == expect
    assert res.final_params < res.original_params
    # the context vectors lie (up to the weak noise) in the kept per-head subspaces
    assert res.final_metric > 99.0
