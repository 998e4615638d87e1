"""The residual-stream width of a post-norm encoder (BERT), cut by unit selection
(:mod:`rmtkd.reduce.stream`): exact at k = d; below d equal to a float64 reference of the
same selection built independently (forward hooks on the original model); save / load,
trust_remote_code and ONNX; the whole-model job with feature distillation across the cut."""
import copy

import pytest
import torch

pytest.importorskip("transformers")
from transformers import BertConfig, BertForSequenceClassification, BertModel  # noqa: E402

import rmtkd  # noqa: E402
from rmtkd.adapters import adapter_for  # noqa: E402
from rmtkd.capture import Site, collect_statistics, pooled_statistics  # noqa: E402
from rmtkd.distill.losses import feature_loss  # noqa: E402
from rmtkd.examples.minilm import SentenceEncoder  # noqa: E402
from rmtkd.hf.modeling_rmtkd import RESIDUAL_KEY  # noqa: E402
from rmtkd.reduce import Reduction, UnsupportedModuleError, reduce_site, stream_units  # noqa: E402
from rmtkd.reduce.maths import select_units  # noqa: E402

H, HEADS, FF, L, V = 32, 4, 48, 2, 60


def config() -> BertConfig:
    return BertConfig(hidden_size=H, num_hidden_layers=L, num_attention_heads=HEADS,
                      intermediate_size=FF, vocab_size=V, max_position_embeddings=24,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def batch(b, t, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[-1, t // 2:] = 0
    return {"input_ids": torch.randint(0, V, (b, t), generator=g),
            "token_type_ids": torch.randint(0, 2, (b, t), generator=g),
            "attention_mask": mask}


CALIB = [batch(4, 12, s) for s in range(4)]
FRESH = batch(3, 10, 99)


def model_of(cls, seed=0):
    torch.manual_seed(seed)
    m = BertModel(config()) if cls is BertModel else cls(config())
    return m.eval()


def stream_stats(model):
    stream = adapter_for(model).stream(model)
    sites = [Site(f"{n}:output", n, "linear", H, "output") for n in stream.states]
    got = collect_statistics(model, CALIB, sites, progress=False, acc_dtype=torch.float64)
    return stream, pooled_statistics([got[s.name] for s in sites])


def stream_reduction(model, k):
    stream, st = stream_stats(model)
    vecs = torch.linalg.eigh(st.cov)[1].flip(1)[:, :k]
    site = Site(f"{stream.states[0]}:output", stream.states[0], "residual", H, "output")
    return Reduction.from_basis(site, vecs.float(), st, "width", "select"), stream


def reference(model, red, stream):
    """The original model in float64 where every state is replaced by the selection's
    reconstruction ``m_i + R (y_S - m_i[S])`` of ``y = LayerNorm_S(z_S)`` (the norm over the
    kept units, with their weight and bias): what the cut model computes, written apart."""
    ref = copy.deepcopy(model).double()
    S, R = red.units, red.reconstruction.double()
    means = red.mean.double()

    def hook(i):
        def fwd(mod, args, out):
            z = args[0][..., S]
            mu = z.mean(-1, keepdim=True)
            var = z.var(-1, unbiased=False, keepdim=True)
            y = (z - mu) / torch.sqrt(var + mod.eps) * mod.weight[S] + mod.bias[S]
            return means[i] + (y - means[i][S]) @ R.T
        return fwd

    for i, name in enumerate(stream.states):
        ref.get_submodule(name).register_forward_hook(hook(i))
    return ref


def out(model, x):
    with torch.no_grad():
        o = model(**x)
    return o if isinstance(o, torch.Tensor) else (o.logits if hasattr(o, "logits")
                                                   else o.last_hidden_state)


@pytest.mark.parametrize("cls", [BertModel, BertForSequenceClassification])
def test_all_units_kept_is_exact(cls):
    model = model_of(cls)
    red, _ = stream_reduction(model, H)
    assert torch.equal(red.units, torch.arange(H))
    cut = copy.deepcopy(model)
    assert reduce_site(cut, red, force=True).applied
    torch.testing.assert_close(out(cut, FRESH), out(model, FRESH), rtol=0, atol=2e-5)


@pytest.mark.parametrize("cls,lifted", [(BertModel, True), (SentenceEncoder, True),
                                        (BertForSequenceClassification, False)])
def test_cut_equals_a_float64_reference(cls, lifted):
    model = model_of(cls) if cls is not SentenceEncoder else SentenceEncoder(
        model_of(BertModel)).eval()
    k = 13
    red, stream = stream_reduction(model, k)
    assert (stream.lift is not None) == lifted
    cut = copy.deepcopy(model)
    res = reduce_site(cut, red)
    assert res.applied and res.params_after < res.params_before
    bert = cut.bert if hasattr(cut, "bert") else cut
    assert bert.embeddings.word_embeddings.weight.shape == (V, k)
    assert bert.encoder.layer[0].attention.self.query.in_features == k
    assert bert.encoder.layer[1].output.dense.out_features == k
    rec = getattr(bert.config, RESIDUAL_KEY)
    assert rec["units"] == red.units.tolist() and rec["hidden_size"] == H
    assert torch.equal(stream_units(bert), red.units)
    got, want = out(cut, FRESH), out(reference(model, red, stream), FRESH)
    assert got.shape[-1] == want.shape[-1]   # lifted back to d (or logits)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)
    # the cut changed the outputs (the test above is not vacuous)
    assert (out(model, FRESH).double() - want).abs().max() > 1e-3


def test_reconstruction_is_the_least_squares_map():
    model = model_of(BertModel)
    red, _ = stream_reduction(model, 9)
    _, st = stream_stats(model)
    S, R = select_units(st.cov, red.basis)
    assert torch.equal(S, red.units)
    torch.testing.assert_close(R, red.reconstruction.double())
    C = st.cov.double()
    # the residual of the regression is uncorrelated with the kept units
    resid = C[:, S] - R @ C[S][:, S]
    assert resid.abs().max() < 1e-6 * C.diagonal().max()


def test_the_stream_is_cut_before_the_sites_that_replace_its_modules():
    model = model_of(BertModel)
    red, _ = stream_reduction(model, 10)
    layer = model.encoder.layer[0]
    layer.intermediate.dense = torch.nn.Sequential(layer.intermediate.dense)
    with pytest.raises(UnsupportedModuleError, match="residual_width"):
        reduce_site(model, red)


def test_residual_width_is_named_not_default():
    model = model_of(BertForSequenceClassification)
    ad = adapter_for(model)
    kinds = [d.kind for d in ad.select_dims(model, None)]
    assert "residual_width" not in kinds
    dims = ad.select_dims(model, ["residual_width"])
    assert [d.kind for d in dims] == ["residual_width"]
    assert dims[0].capture == "bert.embeddings.LayerNorm"
    assert ad.stream(model.bert.encoder.layer[0]) is None   # a bare block


def test_feature_loss_matches_the_kept_units_of_a_wider_teacher():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 5, 8, generator=g)
    units = torch.tensor([1, 4, 6])
    s = t[..., units] + 0.1
    want = ((s - t[..., units]) ** 2).sum() / (t[..., units] ** 2).sum()
    torch.testing.assert_close(feature_loss([s], [t], units=units), want)
    with pytest.raises(ValueError, match="shape"):
        feature_loss([s], [t])


def test_save_load_remote_code_and_onnx(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = model_of(BertForSequenceClassification)
    red, _ = stream_reduction(model, 12)
    assert reduce_site(model, red).applied
    want = out(model, FRESH)
    rmtkd.save(model, tmp_path / "m")
    loaded = rmtkd.load(tmp_path / "m")
    torch.testing.assert_close(out(loaded, FRESH), want, rtol=0, atol=1e-6)
    remote = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "m", trust_remote_code=True).eval()
    assert remote.bert.embeddings.LayerNorm.normalized_shape == (12,)
    torch.testing.assert_close(out(remote, FRESH), want, rtol=0, atol=1e-6)
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from rmtkd.hf import onnx as hx

    path = hx.export_onnx(model, tmp_path / "m.onnx", batch(2, 9, 3))
    assert hx.check_onnx(model, path, [FRESH, batch(5, 13, 4)], atol=1e-4) <= 1e-4


@pytest.mark.parametrize("wrapped", [False, True])
def test_encoder_round_trip_keeps_d_features(tmp_path, wrapped):
    model = SentenceEncoder(model_of(BertModel)).eval() if wrapped else model_of(BertModel)
    red, stream = stream_reduction(model, 11)
    assert reduce_site(model, red).applied
    assert isinstance(model.get_submodule(stream.lift), torch.nn.Sequential)
    rec = getattr(stream_owner(model).config, RESIDUAL_KEY)
    assert rec["lift"] == "encoder.layer.1.output.LayerNorm"   # relative to the BertModel
    want = out(model, FRESH)
    assert want.shape[-1] == H
    rmtkd.save(model, tmp_path / "m")
    torch.testing.assert_close(out(rmtkd.load(tmp_path / "m"), FRESH), want, rtol=0,
                               atol=1e-6)


def stream_owner(model):
    return model.bert if isinstance(model, SentenceEncoder) else model


def test_compress_cuts_the_stream_and_distils_features_across_it(monkeypatch):
    from rmtkd.engine import whole

    seen = []
    real = whole.distributed_distill

    def spy(*args, **kwargs):
        seen.append((kwargs["min_steps"], kwargs["max_steps"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(whole, "distributed_distill", spy)
    model = model_of(BertForSequenceClassification)
    g = torch.Generator().manual_seed(5)
    data = [{**batch(4, 12, 20 + i), "labels": torch.randint(0, 2, (4,), generator=g)}
            for i in range(6)]
    cfg = rmtkd.CompressConfig(
        sites=["residual_width"], rank_rule="uniform:0.5", epsilon=100.0, lr=1e-3,
        distill_epochs=1, distill_min_steps=0, distil_from="original", progress=False,
        distill_features=["bert.encoder.layer.?"], calib_fraction=1.0,
        residual_distill_steps=9)
    res = rmtkd.compress(model, data, eval_data=data, config=cfg)
    (rec,) = res.history
    assert rec.status == "applied", rec.reason
    assert rec.site == "bert.embeddings.LayerNorm:output" and rec.d == H
    k = res.model.bert.embeddings.LayerNorm.normalized_shape[0]
    assert k == rec.k < H
    assert res.final_params < res.original_params
    assert res.plan[0].mean.shape == (1 + 2 * L, H)   # one mean per state
    assert seen == [(9, 9)]   # the residual step's own number of steps (6 batches: 2 epochs)
    with pytest.raises(ValueError, match="residual_distill_steps"):
        rmtkd.CompressConfig(residual_distill_steps=0).validate()


def test_sites_follow_the_order_of_their_patterns():
    model = model_of(BertForSequenceClassification)
    ad = adapter_for(model)
    kinds = [d.kind for d in ad.select_dims(model, ["mlp_width", "residual_width",
                                                    "embedding_rank"])]
    assert kinds == ["mlp_width"] * L + ["residual_width", "embedding_rank"]
    names = [d.capture for d in ad.select_dims(model, ["mlp_width"])]
    assert names == [f"bert.encoder.layer.{i}.output.dense" for i in range(L)]


def test_the_stream_cut_last_after_mlp_and_embedding_cuts(tmp_path):
    """Residual last (a schedule): the narrowed MLP Linears and the factorised embedding
    are cut along; equal to the float64 reference of the same selection on that model."""
    from rmtkd.reduce import cut_mlp
    from rmtkd.reduce.embedding import factorize_embedding

    model = model_of(BertForSequenceClassification)
    g = torch.Generator().manual_seed(3)
    A = torch.randn(FF, FF, generator=g, dtype=torch.float64)
    cut_mlp(model.bert.encoder.layer[0], torch.randn(FF, generator=g, dtype=torch.float64),
            A @ A.T, 20)
    emb = model.bert.embeddings.word_embeddings
    basis = torch.linalg.qr(torch.randn(H, 10, generator=g)).Q
    model.bert.embeddings.word_embeddings = factorize_embedding(
        emb, Reduction("e", "bert.embeddings.word_embeddings", "width", H, 10, basis,
                       emb.weight.mean(0).detach()))
    red, stream = stream_reduction(model, 14)
    want = out(reference(model, red, stream), FRESH)
    assert reduce_site(model, red).applied
    assert model.bert.encoder.layer[0].intermediate.dense.weight.shape == (20, 14)
    assert model.bert.embeddings.word_embeddings.proj.weight.shape == (14, 10)
    torch.testing.assert_close(out(model, FRESH).double(), want, rtol=0, atol=2e-5)
    rmtkd.save(model, tmp_path / "m")
    torch.testing.assert_close(out(rmtkd.load(tmp_path / "m"), FRESH), out(model, FRESH),
                               rtol=0, atol=1e-6)


def test_the_stream_cut_after_a_value_cut_goes_through_the_head_modules(tmp_path):
    """A value cut first (per-head dims [2, 3, 0, 5]: head 2 removed): the residual cut
    then cuts the inner Linears of its HeadPaddedLinear (a reader) and HeadSelectLinear
    (a writer); equal to the float64 reference on that model; save / load keeps it."""
    from rmtkd.hf.modeling_rmtkd import HeadPaddedLinear, HeadSelectLinear
    from rmtkd.reduce import head_reduction

    model = model_of(BertForSequenceClassification)
    g = torch.Generator().manual_seed(5)
    A = torch.randn(H, H, generator=g, dtype=torch.float64)
    att = "bert.encoder.layer.0.attention"
    assert reduce_site(model, head_reduction("v", f"{att}.output.dense", A @ A.T, HEADS,
                                             [2, 3, 0, 5],
                                             mean=torch.randn(H, generator=g))).applied
    red, stream = stream_reduction(model, 14)
    want = out(reference(model, red, stream), FRESH)
    assert reduce_site(model, red).applied
    value = model.get_submodule(f"{att}.self.value")
    dense = model.get_submodule(f"{att}.output.dense")
    assert type(value) is HeadPaddedLinear and value.linear.weight.shape == (10, 14)
    assert type(dense) is HeadSelectLinear and dense.linear.weight.shape == (14, 10)
    assert model.get_submodule(f"{att}.self.query").weight.shape == (24, 14)   # 3 heads
    torch.testing.assert_close(out(model, FRESH).double(), want, rtol=0, atol=2e-5)
    rmtkd.save(model, tmp_path / "m")
    torch.testing.assert_close(out(rmtkd.load(tmp_path / "m"), FRESH), out(model, FRESH),
                               rtol=0, atol=1e-6)


def test_a_stream_narrower_than_the_embedding_rank_makes_the_table_dense(tmp_path):
    from rmtkd.hf.modeling_rmtkd import EMBEDDING_KEY

    model = model_of(BertForSequenceClassification)
    emb = model.bert.embeddings.word_embeddings
    basis = torch.linalg.qr(torch.randn(H, 10, generator=torch.Generator().manual_seed(4))).Q
    assert reduce_site(model, Reduction("bert.embeddings.word_embeddings:output",
                                        "bert.embeddings.word_embeddings", "width", H, 10,
                                        basis, emb.weight.mean(0).detach())).applied
    assert getattr(model.config, EMBEDDING_KEY) == {"rank": 10}
    red, stream = stream_reduction(model, 8)
    want = out(reference(model, red, stream), FRESH)
    assert reduce_site(model, red).applied
    table = model.bert.embeddings.word_embeddings
    assert type(table) is torch.nn.Embedding and table.weight.shape == (V, 8)
    assert not getattr(model.config, EMBEDDING_KEY)
    torch.testing.assert_close(out(model, FRESH).double(), want, rtol=0, atol=2e-5)
    rmtkd.save(model, tmp_path / "m")
    torch.testing.assert_close(out(rmtkd.load(tmp_path / "m"), FRESH), out(model, FRESH),
                               rtol=0, atol=1e-6)


def test_hf_job_defaults_cut_the_stream_and_heads_of_encoders_only():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rmtkd.hf.job import TASK_DEFAULTS, resolve_defaults

    sites = TASK_DEFAULTS["classification"]["sites"]
    assert sites[-1] == "residual_width"   # the schedule: residual last
    bert = model_of(BertForSequenceClassification)
    assert resolve_defaults(TASK_DEFAULTS["classification"], bert)["sites"] == sites
    torch.manual_seed(0)
    llama = LlamaForSequenceClassification(LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=50, pad_token_id=0))
    got = resolve_defaults(TASK_DEFAULTS["classification"], llama)["sites"]
    assert got == [s for s in sites if s not in ("residual_width", "head_width")]
    adapter_for(llama).select_dims(llama, got)   # every pattern names a site
