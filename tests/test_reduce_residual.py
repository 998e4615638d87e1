"""The residual-stream cut of pre-norm RMSNorm decoders (rmtkd.reduce.residual): exact at
k = d for Llama, Qwen2 (q/k/v biases) and Mistral, tied and untied heads; below d equal to a
float64 reference of the same projection; the block-wise job with the cut on (save/load,
trust_remote_code, zero budget, a budget)."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import rmtkd  # noqa: E402
from rmtkd.adapters import UnsupportedArchitectureError  # noqa: E402
from rmtkd.engine import BlockwiseSettings, CompressConfig  # noqa: E402
from rmtkd.engine.blockwise import compress_blockwise  # noqa: E402
from rmtkd.hf.modeling_rmtkd import MixedRMSNorm  # noqa: E402
from rmtkd.reduce.residual import (basis_of, check_layout, cut_residual,  # noqa: E402
                                   second_moment)

pytestmark = pytest.mark.usefixtures("one_thread")

HID, VOCAB = 48, 96


def decoder(kind="llama", tied=False, layers=2, seed=0, heads=4, kv=2):
    """A tiny random decoder of the family with norm scales away from 1 (so folding them
    matters) and, for Qwen2, q/k/v biases."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=VOCAB, hidden_size=HID, intermediate_size=80,
              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
              max_position_embeddings=64, tie_word_embeddings=tied)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
    else:
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**kw))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.3, 2.0)
            elif n.endswith("bias"):
                p.normal_(0, 0.5)
    return model.eval()


def ids(n=3, t=12, seed=5):
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def random_basis(d, k, seed=3):
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(seed)))
    return q[:, :k]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("tied", [False, True])
def test_full_rotation_keeps_the_logits(kind, tied):
    model = decoder(kind, tied)
    cut = cut_residual(model, random_basis(HID, HID).float())
    x = ids()
    with torch.no_grad():
        want, got = model(input_ids=x).logits, cut(input_ids=x).logits
    assert torch.allclose(got, want, atol=2e-5, rtol=1e-4), (got - want).abs().max()
    assert isinstance(cut.model.norm, MixedRMSNorm) == tied
    assert (cut.lm_head.weight is cut.model.embed_tokens.weight) == tied


def projection_reference(model, basis, tied):
    """float64 copy of ``model`` whose residual stream is projected onto span(basis) after
    the embedding and after every attention and MLP output (and, tied, before the head)."""
    import copy

    ref = copy.deepcopy(model).double()
    P = basis.double() @ basis.double().T
    ref.model.embed_tokens.register_forward_hook(lambda _m, _a, o: o @ P)
    for layer in ref.model.layers:
        layer.self_attn.o_proj.register_forward_hook(lambda _m, _a, o: o @ P)
        layer.mlp.down_proj.register_forward_hook(lambda _m, _a, o: o @ P)
    if tied:
        ref.lm_head.register_forward_pre_hook(lambda _m, a: (a[0] @ P,))
    return ref


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("tied", [False, True])
def test_sliced_model_matches_the_float64_projection(kind, tied):
    model = decoder(kind, tied)
    k = 24
    basis = random_basis(HID, k)
    cut = cut_residual(model, basis.float())
    assert cut.config.hidden_size == k and cut.model.layers[0].self_attn.q_proj.in_features == k
    x = ids()
    with torch.no_grad():
        got = cut(input_ids=x).logits.double()
        want = projection_reference(model, basis, tied)(input_ids=x).logits
        uncut = model(input_ids=x).logits.double()
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(got, want) < 1e-5, rel(got, want)
    assert rel(want, uncut) > 1e-2   # the slice is a real cut
    n_cut = sum(p.numel() for p in cut.parameters())
    assert n_cut < sum(p.numel() for p in model.parameters())


def test_second_moment_weighs_tokens_alike():
    x = torch.randn(50, 8, dtype=torch.float64)
    x[0] *= 1e4   # one token with a massive activation
    m, n = second_moment(x)
    assert n == 50
    assert torch.allclose(torch.trace(m), torch.tensor(50.0 * 8, dtype=torch.float64))
    u = x / x.pow(2).mean(-1, keepdim=True).sqrt()
    assert torch.allclose(m, u.T @ u)
    vals, vecs = basis_of(m)
    assert bool((vals[:-1] >= vals[1:]).all())
    assert torch.allclose(vecs @ torch.diag(vals) @ vecs.T, m)


def test_post_norm_layout_is_refused():
    from rmtkd.adapters.bert import LAYOUT

    with pytest.raises(UnsupportedArchitectureError, match="pre-norm RMSNorm"):
        check_layout(LAYOUT)


# ----------------------------------------------------------------------------- the job

SEQ = 16


def job_cfg(**kw):
    base = dict(seq_len=SEQ, calib_tokens=24 * SEQ, batch_size=8, heldout_tokens=4 * SEQ,
                residual=True)
    b = {k: kw.pop(k) for k in list(kw) if k in base or k in (
        "ppl_ratio", "residual_share", "backoff", "keep_stats")}
    return CompressConfig(**{"distill_epochs": 1, "progress": False, **kw},
                          blockwise=BlockwiseSettings(**{**base, **b}))


def data(n=28, seed=1):
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tied", [False, True])
def test_job_without_budget_cuts_mp_k_and_saves_a_loadable_model(tmp_path, tied):
    model = decoder("llama", tied, layers=2)
    res = compress_blockwise(model, data(), out=tmp_path / "o",
                             config=job_cfg(ppl_ratio=None, distill_epochs=0))
    r = res.residual
    assert r["d"] == HID and r["k"] < HID and r["k"] % 8 == 0 and r["k"] >= r["mp_k"]
    assert r["k"] == max(8, -(-r["mp_k"] // 8) * 8)   # lcm(8, 4 heads) = 8
    out = rmtkd.load(tmp_path / "o")
    assert out.config.hidden_size == r["k"]
    assert isinstance(out.model.norm, MixedRMSNorm) == tied
    assert sum(p.numel() for p in out.parameters()) == res.params_after < res.params_before
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["rmtkd_residual"] == {"hidden_size": HID, "rank": r["k"],
                                     "final_norm_mix": tied}
    rc = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o",
                                                           trust_remote_code=True)
    x = ids()
    with torch.no_grad():
        a, b = out(input_ids=x).logits, rc(input_ids=x).logits
    assert torch.equal(a, b)
    gen = out.generate(x[:1, :6], max_new_tokens=4, min_new_tokens=4, do_sample=False,
                       pad_token_id=0)
    assert gen.shape == (1, 10)


def test_job_without_distillation_equals_the_cut_of_its_basis(tmp_path):
    """No distillation, no inner cut: the job's model is cut_residual of the original with
    the job's basis (the top-k eigenvectors of the pooled normalised moment)."""
    model = decoder("qwen2", False, layers=2)
    res = compress_blockwise(model, data(), out=tmp_path / "o",
                             config=job_cfg(ppl_ratio=None, distill_epochs=0,
                                            sites=["nothing*"]))
    k = res.residual["k"]
    out = rmtkd.load(tmp_path / "o")
    # rebuild the basis from the original model's normalised norm inputs
    moment = torch.zeros(HID, HID, dtype=torch.float64)

    def feed(_m, a):
        moment.add_(second_moment(a[0])[0])

    hooks = [m.register_forward_pre_hook(feed) for n, m in model.named_modules()
             if n.endswith("layernorm") or n == "model.norm"]
    with torch.no_grad():
        model(input_ids=data()[:24])
    for h in hooks:
        h.remove()
    basis = basis_of(moment)[1][:, :k]
    ref = cut_residual(model, basis.float())
    x = ids()
    with torch.no_grad():
        got, want = out(input_ids=x).logits, ref(input_ids=x).logits
    # eigenvectors are defined up to sign: the logits do not depend on it
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-3), (got - want).abs().max()


def test_zero_budget_leaves_the_model_unchanged(tmp_path):
    model = decoder("mistral", True, layers=2)
    res = compress_blockwise(model, data(), out=tmp_path / "o", config=job_cfg(ppl_ratio=1.0))
    assert res.residual["k"] == HID and res.params_after == res.params_before
    out = rmtkd.load(tmp_path / "o")
    x = ids()
    with torch.no_grad():
        assert torch.equal(out(input_ids=x).logits, model(input_ids=x).logits)


def test_budgeted_job_bisects_k_within_its_share(tmp_path):
    model = decoder("llama", True, layers=2)
    res = compress_blockwise(model, data(), out=tmp_path / "o",
                             config=job_cfg(ppl_ratio=1.5, residual_share=0.5))
    r = res.residual
    target = r["original_ppl"] * 1.5 ** 0.5
    assert r["target_ppl"] == pytest.approx(target)
    assert r["tried"] and r["tried"][0][0] == max(8, -(-r["mp_k"] // 8) * 8)
    fits = [k for k, p in r["tried"] if p <= target]
    breaks = [k for k, p in r["tried"] if p > target]
    assert r["k"] == (min(fits) if fits else HID)
    assert all(b < r["k"] for b in breaks)
    assert res.final_ppl <= 1.5 * res.original_ppl * (1 + 1e-9)


def test_residual_width_is_a_multiple_of_the_heads(tmp_path):
    """transformers' configs require hidden_size % heads == 0: with 6 heads the width steps
    by lcm(8, 6) = 24, and the saved config loads."""
    model = decoder("llama", True, layers=2, heads=6, kv=3)
    res = compress_blockwise(model, data(), out=tmp_path / "o",
                             config=job_cfg(ppl_ratio=None, distill_epochs=0))
    k = res.residual["k"]
    assert k < HID and k % 24 == 0 and k == min(HID, max(24, -(-res.residual["mp_k"] // 24) * 24))
    out = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o",
                                                            trust_remote_code=True)
    assert out.config.hidden_size == k


@pytest.mark.parametrize("share", [0.0, 1.5, float("nan")])
def test_residual_share_is_a_share_of_the_budget(share):
    with pytest.raises(ValueError, match="residual_share"):
        BlockwiseSettings(residual_share=share).validate()


def test_recovery_is_kept_only_where_the_perplexity_does_not_rise(tmp_path, monkeypatch):
    """No inner cut (no site matches): every block is the sliced original, distilled
    towards the original stream ("recovery"). On this random model the recovery lowers the
    blocks' token error but raises the held-out perplexity a little, so it is undone and
    the job ends at the residual cut's own perplexity; where the perplexity falls (here
    made to, by scaling what the job measures with a recovered block) it is kept."""
    from rmtkd.engine.blockwise import Blockwise

    model = decoder("llama", True, layers=2)
    cfg = job_cfg(ppl_ratio=1.5, sites=["nothing*"])
    res = compress_blockwise(model, data(), out=tmp_path / "o", config=cfg)
    assert res.residual["k"] < HID
    assert res.final_ppl == res.residual["ppl"]
    real = Blockwise._heldout_ppl

    def better_with_a_new_layer(self, layer, i, states):
        p = real(self, layer, i, states)
        return p / 2 if layer is not None else p

    monkeypatch.setattr(Blockwise, "_heldout_ppl", better_with_a_new_layer)
    kept = compress_blockwise(model, data(), out=tmp_path / "o2", config=cfg)
    assert kept.final_ppl < 0.6 * kept.residual["ppl"]   # block 0's recovery kept
    assert kept.params_after == res.params_after
