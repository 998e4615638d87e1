"""Llama-family surgery (rmtkd.reduce.llama) on tiny random Hugging Face decoders (GQA: 4
query heads, 2 key-value heads), eval mode: value dims per kv head against a forward-hook
reference, gated-MLP unit selection (exact at true rank k, small error at low rank + noise),
forward + generate after both reductions, save/load round trip, unsupported layouts."""
import copy
import dataclasses
import json

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig,  # noqa: E402
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

import rmtkd  # noqa: E402
from rmtkd.capture import collect_statistics  # noqa: E402
from rmtkd.saving import UnsupportedModelError  # noqa: E402
from rmtkd.nn import ProjectedLinear  # noqa: E402
from rmtkd.adapters import block_modules as llama_layers  # noqa: E402
from rmtkd.engine.step import head_ks  # noqa: E402
from rmtkd.hf import modeling_rmtkd  # noqa: E402
from rmtkd.reduce import (HeadPaddedLinear, HeadSelectLinear,  # noqa: E402
                          UnsupportedModuleError, apply_widths,
                          block_sites, project_block_linear,
                          record_widths, cut_values, cut_mlp)

HID, FF, HEADS, KV, HD, L, VOCAB = 64, 172, 4, 2, 16, 2, 128


def llama(seed=0, dtype=torch.float64, cfg_cls=LlamaConfig, model_cls=LlamaForCausalLM,
          **kw):
    torch.manual_seed(seed)
    cfg = cfg_cls(hidden_size=HID, intermediate_size=FF, num_hidden_layers=L,
                  num_attention_heads=HEADS, num_key_value_heads=KV, vocab_size=VOCAB,
                  max_position_embeddings=64, initializer_range=0.1, **kw)
    return model_cls(cfg).to(dtype).eval()


def ids(batch=6, seq=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def hidden(model, x=None):
    """Every layer's output (hidden_states[1:]) and the logits."""
    with torch.no_grad():
        o = model(input_ids=ids() if x is None else x, output_hidden_states=True)
    return list(o.hidden_states[1:]) + [o.logits]


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def stats(model, x=None):
    """Per layer: (mean, cov) in float64 of the v_proj output and of the down_proj input,
    computed with plain forward hooks (independent of rmtkd.capture)."""
    acts, hooks = {}, []
    for i, (_, layer) in enumerate(llama_layers(model)):
        hooks.append(layer.self_attn.v_proj.register_forward_hook(
            lambda m, a, o, i=i: acts.setdefault(("v", i), []).append(o.detach())))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(
            lambda m, a, i=i: acts.setdefault(("mlp", i), []).append(a[0].detach())))
    with torch.no_grad():
        model(input_ids=ids(16, 32, seed=2) if x is None else x)
    for h in hooks:
        h.remove()
    out = {}
    for key, chunks in acts.items():
        z = torch.cat([c.reshape(-1, c.shape[-1]) for c in chunks]).double()
        mean = z.mean(0)
        zc = z - mean
        out[key] = (mean, zc.T @ zc / (z.shape[0] - 1))
    return out


def head_bases(cov, ks, width=HD):
    """Independent reference: per kv head (``width`` wide), top-k_g eigenvectors of its
    diagonal block."""
    out = []
    for g, k in enumerate(ks):
        e, v = torch.linalg.eigh(cov[g * width:(g + 1) * width, g * width:(g + 1) * width])
        out.append(v[:, e.argsort(descending=True)[:k]])
    return out


def count(m):
    return sum(p.numel() for p in m.parameters())


# ----------------------------------------------------------------------------- attention

def test_attention_full_rank_is_exact():
    model = llama()
    ref = hidden(model)
    st = stats(model)
    for i, (_, layer) in enumerate(llama_layers(model)):
        mean, cov = st[("v", i)]
        rec = cut_values(layer, mean, cov, [HD] * KV)
        assert isinstance(layer.self_attn.v_proj, HeadPaddedLinear)
        assert isinstance(layer.self_attn.o_proj, HeadSelectLinear)
        assert rec["k"] == KV * HD and rec["d"] == KV * HD
    assert max_diff(hidden(model), ref) < 1e-10


@pytest.mark.parametrize("with_mean", [True, False])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_attention_matches_projection_hook(with_mean, family):
    kw = {} if family == "llama" else {"cfg_cls": Qwen2Config, "model_cls": Qwen2ForCausalLM}
    model = llama(**kw)          # qwen2: q/k/v biases, no o_proj bias
    orig = hidden(model)
    st = stats(model)
    reference = copy.deepcopy(model)
    ks_per_layer = [[3, 7], [0, 5]]   # k_g = 0 drops a kv head's values entirely
    for i, ((_, layer), (_, rlayer)) in enumerate(zip(llama_layers(model),
                                                      llama_layers(reference))):
        mean, cov = st[("v", i)]
        ks = ks_per_layer[i]
        P = torch.block_diag(*[b @ b.T for b in head_bases(cov, ks)])
        m = mean if with_mean else torch.zeros_like(mean)
        rlayer.self_attn.v_proj.register_forward_hook(
            lambda mod, a, o, P=P, m=m: m + (o - m) @ P)   # P symmetric
        before = count(layer)
        rec = cut_values(layer, mean if with_mean else None, cov, ks)
        assert rec["head_ks"] == ks and rec["params_before"] == before
        # v: hidden x sum k (+ bias); o: hidden x (rep * sum k) (+ bias)
        bias_v = sum(ks) if family == "qwen2" else 0
        bias_o = HID if with_mean else 0
        expect = before - HID * KV * HD - HID * HEADS * HD - (KV * HD if bias_v else 0) \
            + HID * sum(ks) + bias_v + HID * (HEADS // KV) * sum(ks) + bias_o
        # a kv head without value dims is removed whole: its key and its query heads too
        gone = ks.count(0)
        per_bias = 1 if family == "qwen2" else 0
        expect -= gone * ((HEADS // KV) * HD * (HID + per_bias) + HD * (HID + per_bias))
        assert rec["params_after"] == count(layer) == expect
        assert layer.self_attn.q_proj.out_features == (KV - gone) * (HEADS // KV) * HD
        assert layer.self_attn.k_proj.out_features == (KV - gone) * HD
        assert layer.self_attn.v_proj.head_dims == [k for k in ks if k]
    got, want = hidden(model), hidden(reference)
    assert max_diff(got, want) < 1e-10
    assert max_diff(got, orig) > 1e-4          # the projection did change the model


def test_attention_re_reduction_and_sites():
    model = llama()
    st = stats(model)
    _, layer = llama_layers(model)[0]
    mean, cov = st[("v", 0)]
    cut_values(layer, mean, cov, [8, 6])     # unequal widths: padded value heads
    sites = block_sites(layer)
    assert [s.name for s in sites] == ["self_attn.v_proj:output", "mlp.down_proj:input"]
    assert sites[0].dim == KV * HD and sites[1].dim == FF
    # reduce again from the padded site's statistics: heads keep at most their 8 / 6 dims
    st2 = stats(model)
    with pytest.raises(ValueError, match="dims each kv head keeps"):
        cut_values(layer, st2[("v", 0)][0], st2[("v", 0)][1], [9, 6])
    reference = copy.deepcopy(model)
    m2, c2 = st2[("v", 0)]
    P = torch.block_diag(*[b @ b.T for b in head_bases(c2, [4, 2])])
    llama_layers(reference)[0][1].self_attn.v_proj.register_forward_hook(
        lambda mod, a, o: m2 + (o - m2) @ P)
    cut_values(layer, m2, c2, [4, 2])
    assert layer.self_attn.v_proj.head_dims == [4, 2]
    assert layer.self_attn.o_proj.head_dims == [4, 4, 2, 2]
    assert max_diff(hidden(model), hidden(reference)) < 1e-10


def test_sites_work_with_capture():
    model = llama()
    st = stats(model)
    sites = []
    for name, layer in llama_layers(model):
        for s in block_sites(layer):
            sites.append(dataclasses.replace(s, name=f"{name}.{s.name}",
                                             module_name=f"{name}.{s.module_name}"))
    got = collect_statistics(model, [{"input_ids": ids(16, 32, seed=2)}], sites,
                             acc_dtype=torch.float64, progress=False)
    for i, (name, _) in enumerate(llama_layers(model)):
        for key, site in (("mlp", "mlp.down_proj:input"), ("v", "self_attn.v_proj:output")):
            s = got[f"{name}.{site}"]
            torch.testing.assert_close(torch.as_tensor(s.mean).double(), st[(key, i)][0])
            n = 16 * 32                               # rmtkd's covariance divides by n
            torch.testing.assert_close(torch.as_tensor(s.cov).double(),
                                       st[(key, i)][1] * (n - 1) / n)


# ----------------------------------------------------------------------------- MLP

def make_low_rank_mlp(layer, k, eps=0.0, seed=3):
    """Unit j copies unit j % k's gate row and a scaled up row (+ eps noise): the gated
    activation a_j = alpha_j a_{j % k} (+ O(eps)) has rank k."""
    g = torch.Generator().manual_seed(seed)
    mlp = layer.mlp
    with torch.no_grad():
        gw, uw = mlp.gate_proj.weight, mlp.up_proj.weight
        for j in range(k, gw.shape[0]):
            alpha = 0.5 + torch.rand((), generator=g, dtype=torch.float64).item()
            gw[j] = gw[j % k]
            uw[j] = alpha * uw[j % k] + eps * torch.randn(uw.shape[1], generator=g,
                                                           dtype=uw.dtype)


def test_mlp_selection_exact_at_true_rank():
    k = 20
    model = llama()
    for _, layer in llama_layers(model):
        make_low_rank_mlp(layer, k)
    ref = hidden(model)
    st = stats(model)
    for i, (_, layer) in enumerate(llama_layers(model)):
        mean, cov = st[("mlp", i)]
        rec = cut_mlp(layer, mean, cov, k, ridge=0.0)
        assert sorted(u % k for u in rec["units"]) == list(range(k))   # one unit per group
        # gate + up: HID x k each, down: k x HID + an added bias (HID) for the mean term
        rest = count(layer) - count(layer.mlp)   # attention and norms: untouched
        assert rec["params_before"] == 3 * HID * FF + rest
        assert rec["params_after"] == count(layer) == 3 * HID * k + HID + rest
        assert layer.mlp.down_proj.bias is not None and rec["mean_corrected"]
    assert max_diff(hidden(model), ref) < 1e-9


def mlp_error(model, layer_index, **kw):
    """Relative error of layer ``layer_index``'s MLP output after reduction, on the
    calibration inputs of that MLP."""
    (_, layer), = [llama_layers(model)[layer_index]]
    xs = []
    h = layer.mlp.register_forward_pre_hook(lambda m, a: xs.append(a[0].detach()))
    with torch.no_grad():
        model(input_ids=ids(16, 32, seed=2))
    h.remove()
    x = torch.cat([t.reshape(-1, HID) for t in xs])
    st = stats(model)
    mean, cov = st[("mlp", layer_index)]
    mlp = copy.deepcopy(layer.mlp)
    with torch.no_grad():
        y = mlp(x)
    layer = copy.deepcopy(layer)
    rec = cut_mlp(layer, mean, cov, **kw)
    with torch.no_grad():
        y2 = layer.mlp(x)
        S = torch.tensor(rec["units"])
        naive = mlp.down_proj.weight[:, S] @ (mlp.act_fn(mlp.gate_proj(x)[:, S])
                                              * mlp.up_proj(x)[:, S]).T
    return ((y2 - y).norm() / y.norm()).item(), ((naive.T - y).norm() / y.norm()).item()


def test_mlp_selection_low_rank_plus_noise():
    k = 24
    model = llama()
    for _, layer in llama_layers(model):
        make_low_rank_mlp(layer, k, eps=0.002)     # noise 2% of the up rows' scale
    err, naive = mlp_error(model, 0, k=k)
    err_nomean, _ = mlp_error(model, 0, k=k, mean_correction=False)
    assert 1e-4 < err < 0.05 and err < 0.1 * naive  # the reconstruction R does the work
    # with the intercept the residuals have mean 0 on the calibration data: never worse
    assert err <= err_nomean * (1 + 1e-6)


def test_mlp_refuses_rotation_and_bad_shapes():
    model = llama()
    _, layer = llama_layers(model)[0]
    cov = torch.eye(FF, dtype=torch.float64)
    with pytest.raises(ValueError, match="rotation does not commute"):
        cut_mlp(layer, None, cov, 4, surgery="rotate")
    with pytest.raises(ValueError, match="cov must be"):
        cut_mlp(layer, None, torch.eye(10), 4)
    with pytest.raises(ValueError, match="1 <= k"):
        cut_mlp(layer, None, cov, 0)


# ----------------------------------------------------------------------------- whole model

Q_BASIS = torch.linalg.qr(torch.randn(HID, 12, generator=torch.Generator().manual_seed(5),
                                       dtype=torch.float64)).Q
Q_MEAN = torch.full((HID,), 0.1, dtype=torch.float64)


def reduce_all(model, mlp_k=40, project=True, st=None, records=None):
    """Cut every layer's values (k per kv head from the rank rule) and MLP width (mlp_k
    units), and project layer 1's q_proj, from ``st`` (default: ``stats(model)``); each
    layer's ``cut_values`` / ``cut_mlp`` records go to ``records``."""
    st = stats(model) if st is None else st
    for i, (_, layer) in enumerate(llama_layers(model)):
        mean, cov = st[("v", i)]
        ks = [max(1, k) for k in head_ks(cov, KV, 16 * 32, rmtkd.CompressConfig())]
        assert len(ks) == KV and all(1 <= k <= HD for k in ks)
        rec_v = cut_values(layer, mean, cov, ks)
        mean, cov = st[("mlp", i)]
        rec_mlp = cut_mlp(layer, mean, cov, mlp_k)
        if records is not None:
            records.append((rec_v, rec_mlp))
    if project:    # one projected Linear (q_proj of layer 1, with a mean: bias added)
        _, layer = llama_layers(model)[1]
        rec = project_block_linear(layer, "self_attn.q_proj",
                                   Q_BASIS.to(next(model.parameters())), mean=Q_MEAN)
        assert rec["params_after"] < rec["params_before"]
        assert isinstance(layer.self_attn.q_proj, ProjectedLinear)
    return model


def reduce_all_reference(model, st, records, project=True):
    """float64 reference of :func:`reduce_all`: a copy of ``model`` whose values are replaced
    by mean + P (v - mean), P = blockdiag(U_g U_g^T) of the top k_g eigenvectors per kv head,
    whose down_proj input x is rebuilt from the kept units S as mean + R (x_S - mean_S) (R:
    the ridge least-squares regression on S under the site covariance, R[S] = I), and whose
    projected q_proj reads mean + U U^T (x - mean)."""
    ref = copy.deepcopy(model).to(torch.float64)
    for i, (_, layer) in enumerate(llama_layers(ref)):
        rec_v, rec_mlp = records[i]
        mean, cov = st[("v", i)]
        P = torch.block_diag(*[b @ b.T for b in head_bases(cov, rec_v["head_ks"])])
        layer.self_attn.v_proj.register_forward_hook(
            lambda mod, a, o, P=P, m=mean: m + (o - m) @ P)
        mean, cov = st[("mlp", i)]
        S = torch.tensor(rec_mlp["units"])
        css = cov[S][:, S]
        lam = 1e-6 * css.diagonal().mean()       # cut_mlp's default ridge
        R = cov[:, S] @ torch.linalg.inv(css + lam * torch.eye(len(S), dtype=torch.float64))
        R[S] = torch.eye(len(S), dtype=torch.float64)
        layer.mlp.down_proj.register_forward_pre_hook(
            lambda mod, a, S=S, R=R, m=mean: (m + (a[0][..., S] - m[S]) @ R.T,))
    if project:
        P = Q_BASIS @ Q_BASIS.T
        llama_layers(ref)[1][1].self_attn.q_proj.register_forward_pre_hook(
            lambda mod, a: (Q_MEAN + (a[0] - Q_MEAN) @ P,))
    return ref


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_and_generate_after_reduction(dtype):
    """Both cuts and a projection at k < d: the reduced model (in ``dtype``) against the
    float64 reference of the same projections, on every layer's output and the logits;
    then generation with and without the KV cache."""
    original = llama()                    # float64; the float32 model holds the same values
    st = stats(original)
    model = llama(dtype=dtype)
    before = count(model)
    records = []
    reduce_all(model, st=st, records=records)
    assert count(model) < before
    assert all(rec_v["k"] < KV * HD and rec_mlp["k"] < FF for rec_v, rec_mlp in records)
    reference = reduce_all_reference(original, st, records)
    x = ids(2, 7)
    got, want, uncut = hidden(model, x), hidden(reference, x), hidden(original, x)
    assert got[-1].shape == want[-1].shape == (2, 7, VOCAB)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for i, (g, w, u) in enumerate(zip(got, want, uncut)):
        assert g.dtype == dtype
        assert rel(g, w) < tol, (i, rel(g, w))
        assert rel(w, u) > 1e-3, i        # the cuts changed every output: the check can fail
    with torch.no_grad():
        cached = model.generate(x, max_new_tokens=6, do_sample=False, use_cache=True,
                                pad_token_id=0)
        plain = model.generate(x, max_new_tokens=6, do_sample=False, use_cache=False,
                               pad_token_id=0)
    assert cached.shape == (2, 13)
    assert torch.equal(cached, plain)    # the KV cache (padded values) changes nothing


def test_save_load_round_trip(tmp_path):
    model = reduce_all(llama())
    widths = record_widths(model)
    assert [w["mlp"] for w in widths] == [40, 40]
    assert [w["ranks"] for w in widths] == [{}, {"self_attn.q_proj": 12}]
    assert all(w["biases"]["mlp.down_proj"] and w["biases"]["self_attn.o_proj"]
               and not w["biases"]["mlp.gate_proj"] for w in widths)
    rmtkd.save(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert [w["value_heads"] for w in cfg["rmtkd_blocks"]] == \
        [w["value_heads"] for w in widths]
    loaded = rmtkd.load(tmp_path / "m")
    assert type(loaded) is LlamaForCausalLM and not loaded.training
    assert isinstance(loaded.model.layers[0].self_attn.v_proj, HeadPaddedLinear)
    assert isinstance(loaded.model.layers[1].self_attn.q_proj, ProjectedLinear)
    x = ids(3, 9)
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, loaded(input_ids=x).logits)
        g1 = model.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=0)
        g2 = loaded.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(g1, g2)


def test_apply_widths_rebuilds_shapes():
    model = reduce_all(llama(), project=False)
    widths = record_widths(model)
    fresh = apply_widths(llama(seed=9), widths)
    shapes = {n: t.shape for n, t in model.state_dict().items()}
    assert shapes == {n: t.shape for n, t in fresh.state_dict().items()}
    fresh.load_state_dict(model.state_dict(), strict=True)


@pytest.mark.parametrize("cfg_cls,model_cls", [(MistralConfig, MistralForCausalLM),
                                               (Qwen2Config, Qwen2ForCausalLM)])
def test_round_trip_other_families(tmp_path, cfg_cls, model_cls):
    model = reduce_all(llama(cfg_cls=cfg_cls, model_cls=model_cls), project=False)
    rmtkd.save(model, tmp_path / "m")
    loaded = rmtkd.load(tmp_path / "m")
    assert type(loaded) is model_cls
    x = ids(2, 5)
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, loaded(input_ids=x).logits)


@pytest.mark.parametrize("cls", ["LlamaModel", "LlamaForSequenceClassification",
                                 "LlamaForCausalLM-tied"])
def test_round_trip_llama_classes(tmp_path, cls):
    tied = cls.endswith("-tied")
    model_cls = getattr(transformers, cls.removesuffix("-tied"))
    model = llama(model_cls=model_cls, pad_token_id=0, tie_word_embeddings=tied)
    if cls != "LlamaModel":
        reduce_all(model, project=False)
    rmtkd.save(model, tmp_path / "m")
    loaded = rmtkd.load(tmp_path / "m")
    assert type(loaded) is model_cls
    x = ids(2, 5)
    with torch.no_grad():
        a, b = model(input_ids=x), loaded(input_ids=x)
    key = "last_hidden_state" if cls == "LlamaModel" else "logits"
    assert torch.equal(a[key], b[key])
    if tied:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


# ----------------------------------------------------------------------------- errors

class Cube(nn.Module):
    def forward(self, x):
        return x ** 3


class ValueNorm(nn.Module):
    def forward(self, x):
        return x


def test_unsupported_layouts(tmp_path):
    model = llama()
    _, layer = llama_layers(model)[0]
    cov = torch.eye(FF, dtype=torch.float64)
    layer.mlp.act_fn = Cube()
    with pytest.raises(UnsupportedModuleError, match="mlp.act_fn is Cube"):
        cut_mlp(layer, None, cov, 4)
    layer.mlp.act_fn = nn.SiLU()
    layer.self_attn.v_norm = ValueNorm()
    with pytest.raises(UnsupportedModuleError, match="v_norm"):
        cut_values(layer, None, torch.eye(KV * HD), [2, 2])
    del layer.self_attn.v_norm
    with pytest.raises(UnsupportedModuleError, match="not a transformer block of a known family"):
        cut_values(layer.mlp, None, torch.eye(KV * HD), [2, 2])
    with pytest.raises(UnsupportedModuleError, match="not one of"):
        project_block_linear(layer, "input_layernorm", torch.eye(HID)[:, :2])
    project_block_linear(layer, "mlp.down_proj", torch.eye(FF, dtype=torch.float64)[:, :8])
    with pytest.raises(UnsupportedModuleError, match="mlp.down_proj is a ProjectedLinear"):
        cut_mlp(layer, None, cov, 4)
    cut_values(layer, None, torch.eye(KV * HD, dtype=torch.float64), [2, 2])
    with pytest.raises(UnsupportedModuleError, match="HeadPaddedLinear, not an nn.Linear"):
        project_block_linear(layer, "self_attn.v_proj", torch.eye(HID)[:, :2])
    # a change that the config cannot describe fails at save time
    llama_layers(model)[1][1].mlp.up_proj = nn.Sequential(nn.Linear(HID, FF, bias=False))
    with pytest.raises(UnsupportedModelError, match="could not rebuild"):
        rmtkd.save(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_removed_kv_head_round_trips(tmp_path):
    """A key-value head cut to 0 value dims is removed with its key and its group's query
    heads; the model saves, loads (rmtkd and transformers' trust_remote_code) and computes
    the same logits, and generates with the KV cache."""
    model = llama(dtype=torch.float32)
    st = stats(model)
    layer = llama_layers(model)[0][1]
    mean, cov = st[("v", 0)]
    cut_values(layer, mean, cov, [0, 5])
    attn = layer.self_attn
    assert attn.q_proj.out_features == (HEADS // KV) * HD and attn.k_proj.out_features == HD
    assert record_widths(model)[0]["heads"] == HEADS // KV
    assert record_widths(model)[0]["kv_heads"] == 1
    rmtkd.save(model, tmp_path / "m")
    x = ids(2, 9)
    loaded = rmtkd.load(tmp_path / "m")
    remote = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m",
                                                               trust_remote_code=True)
    with torch.no_grad():
        want = model(input_ids=x).logits
        assert torch.equal(loaded(input_ids=x).logits, want)
        assert torch.allclose(remote(input_ids=x).logits, want, atol=1e-5)
        g1 = model.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=0)
        g2 = remote.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(g1, g2)


# ----------------------------------------------------------------------------- compact values

FAMILIES = {"llama": {},
            "qwen2": {"cfg_cls": Qwen2Config, "model_cls": Qwen2ForCausalLM},
            "mistral": {"cfg_cls": MistralConfig, "model_cls": MistralForCausalLM,
                        "sliding_window": 4}}


@pytest.fixture
def compact_on(monkeypatch):
    """Compact value heads opted in (``COMPACT_VALUES``) for one test."""
    monkeypatch.setattr(modeling_rmtkd, "COMPACT_VALUES", True)


def test_value_heads_are_padded_by_default():
    model = llama()
    cut_every_layer(model, stats(model), [6, 6])
    for _, layer in llama_layers(model):
        assert not layer.self_attn.v_proj.compact
        assert not type(layer.self_attn).__name__.endswith("CompactValues")


def cut_every_layer(model, st, ks):
    for i, (_, layer) in enumerate(llama_layers(model)):
        mean, cov = st[("v", i)]
        cut_values(layer, mean, cov, ks)
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_compact_values_compute_the_padded_function(family, monkeypatch, compact_on):
    """Equal kept widths: v/o compute only the kept dims and the attention reads value
    heads of that width (no padding); the logits and the cached generation equal those of
    the padded modules (forced by pretending the attention cannot read them) and of the
    float64 reference projection."""
    kw = FAMILIES[family]
    model = llama(**kw)
    st = stats(model)
    reference = copy.deepcopy(model)
    for i, (_, rlayer) in enumerate(llama_layers(reference)):
        mean, cov = st[("v", i)]
        P = torch.block_diag(*[b @ b.T for b in head_bases(cov, [6, 6])])
        rlayer.self_attn.v_proj.register_forward_hook(
            lambda mod, a, o, P=P, m=mean: m + (o - m) @ P)
    cut_every_layer(model, st, [6, 6])
    with monkeypatch.context() as m:
        m.setattr(modeling_rmtkd, "COMPACT_VALUES", False)
        padded = cut_every_layer(llama(**kw), st, [6, 6])
    for (_, layer), (_, player) in zip(llama_layers(model), llama_layers(padded)):
        v, o = layer.self_attn.v_proj, layer.self_attn.o_proj
        assert v.compact and o.compact and not player.self_attn.v_proj.compact
        assert v.out_features == KV * 6 and o.in_features == HEADS * 6
        assert type(layer.self_attn).__name__.endswith("CompactValues")
        assert type(player.self_attn) is not type(layer.self_attn)
    x = ids(2, 9)
    got = hidden(model, x)
    assert max_diff(got, hidden(padded, x)) < 1e-10
    assert max_diff(got, hidden(reference, x)) < 1e-10
    assert max_diff(got, hidden(llama(**kw), x)) > 1e-4      # the cut changed the model
    with torch.no_grad():
        g = [mm.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0)
             for mm in (model, padded)]
    assert torch.equal(g[0], g[1])


def test_compact_values_round_trip_and_fall_back(tmp_path, monkeypatch, compact_on):
    """A model with compact value heads saves and loads compact with rmtkd (switch on);
    transformers' trust_remote_code copy (switch off) and a transformers release older
    than the compact forward follows load the same files padded: the same logits."""
    model = llama(dtype=torch.float32)
    cut_every_layer(model, stats(model), [5, 5])
    rmtkd.save(model, tmp_path / "m")
    x = ids(2, 7)
    loaded = rmtkd.load(tmp_path / "m")
    remote = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m",
                                                               trust_remote_code=True)
    assert all(layer.self_attn.v_proj.compact for _, layer in llama_layers(loaded))
    # the copy that trust_remote_code imports keeps its own (default, off) switch: padded
    assert not any(layer.self_attn.v_proj.compact for _, layer in llama_layers(remote))
    monkeypatch.setattr(modeling_rmtkd, "_transformers_version", lambda: (5, 24))
    old = rmtkd.load(tmp_path / "m")
    assert not any(layer.self_attn.v_proj.compact for _, layer in llama_layers(old))
    with torch.no_grad():
        want = model(input_ids=x).logits
        assert torch.equal(loaded(input_ids=x).logits, want)
        assert torch.allclose(remote(input_ids=x).logits, want, atol=1e-5)
        assert torch.allclose(old(input_ids=x).logits, want, atol=1e-5)


def test_compact_values_cut_again_from_their_own_statistics(compact_on):
    """The value site of compact heads has only the kept dims; a second cut from its
    statistics equals the float64 reference projection of those statistics."""
    model = llama()
    layer = llama_layers(model)[0][1]
    mean, cov = stats(model)[("v", 0)]
    cut_values(layer, mean, cov, [8, 8])
    m2, c2 = stats(model)[("v", 0)]
    assert c2.shape == (KV * 8, KV * 8)
    reference = copy.deepcopy(model)
    P = torch.block_diag(*[b @ b.T for b in head_bases(c2, [3, 3], width=8)])
    llama_layers(reference)[0][1].self_attn.v_proj.register_forward_hook(
        lambda mod, a, o: m2 + (o - m2) @ P)
    cut_values(layer, m2, c2, [3, 3])
    assert layer.self_attn.v_proj.compact and layer.self_attn.v_proj.head_dims == [3, 3]
    assert max_diff(hidden(model), hidden(reference)) < 1e-10


def test_rank_rule_keeps_one_value_width_per_block(compact_on):
    """Where the attention reads compact value heads, the rule's k per head becomes one
    width (the largest); a head without dims stays removed."""
    from rmtkd.engine.step import one_width
    from rmtkd.reduce.transformer import block_of, reads_compact_values

    assert one_width([3, 7, 0, 5]) == [7, 7, 0, 7]
    assert one_width([0, 0]) == [0, 0]
    cov = torch.block_diag(torch.diag(torch.tensor([50., 40.] + [1.] * (HD - 2))),
                           torch.diag(torch.tensor([50.] + [1.] * (HD - 1)))).double()
    assert head_ks(cov, KV, 4000, rmtkd.CompressConfig()) == [2, 1]
    assert head_ks(cov, KV, 4000, rmtkd.CompressConfig(), one=True) == [2, 2]
    layer = llama_layers(llama())[0][1]
    assert reads_compact_values(layer, block_of(layer)[1])
