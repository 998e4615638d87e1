"""The head width cut (rmtkd.reduce.attention): one head size for a BERT layer's queries,
keys and values. Exact at r = head_dim; below it, the cut model equals a float64 reference
of the same maps (keys through A B^T, values through mean + P (v - mean)); the query/key
maps are the best rank-r form; save/load, the engine, and ONNX export."""
import copy

import pytest
import torch

pytest.importorskip("transformers")
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

import rmtkd  # noqa: E402
from rmtkd.capture import collect_statistics, make_site  # noqa: E402
from rmtkd.reduce import apply_widths  # noqa: E402
from rmtkd.reduce.attention import (cut_head_width, head_statistics,  # noqa: E402
                                    head_width_reduction, qk_maps)
from rmtkd.reduce.transformer import block_of  # noqa: E402

H, HEADS, HD, L = 32, 4, 8, 2
LAYER = "bert.encoder.layer.1"

pytestmark = pytest.mark.usefixtures("float64_default")


def bert(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=H, num_hidden_layers=L, num_attention_heads=HEADS,
                     intermediate_size=64, vocab_size=100, max_position_embeddings=32,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).to(torch.float64).eval()


def batches(n=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 100, (8, 12), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "labels": torch.randint(0, 2, (8,), generator=g)})
    return out


def probe():
    """Fresh inputs (not the calibration ones), one row padded."""
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 100, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(model):
    with torch.no_grad():
        return model(**probe()).logits


def input_stats(model, layer=LAYER):
    name = f"{layer}.attention.self.query"
    site = make_site(name, model.get_submodule(name), "input")
    st = collect_statistics(model, batches(), [site], acc_dtype=torch.float64,
                            progress=False)[site.name]
    return st.mean, st.cov


def count(m):
    return sum(p.numel() for p in m.parameters())


def test_full_head_size_is_exact():
    model = bert()
    want = logits(model)
    mean, cov = input_stats(model)
    block = model.get_submodule(LAYER)
    stats = head_statistics(block, block_of(block)[1], mean, cov)
    for M in (*stats.key_cov, *stats.query_moment):   # every head's statistics full rank
        assert torch.linalg.matrix_rank(M) == HD
    info = cut_head_width(block, mean, cov, HD)
    assert info["k"] == info["d"] == HEADS * HD
    torch.testing.assert_close(logits(model), want, rtol=0, atol=1e-10)


def reference(model, red):
    """The original model with its keys replaced by blockdiag(A_h B_h^T) k and its values by
    mean + P (v - mean): what the cut computes, in float64."""
    ref = copy.deepcopy(model)
    attn = ref.get_submodule(f"{LAYER}.attention.self")
    M = red.maps[0] @ red.maps[1].T
    P = red.basis @ red.basis.T
    attn.key.register_forward_hook(lambda mod, a, k: k @ M.T)
    attn.value.register_forward_hook(lambda mod, a, v: red.mean + (v - red.mean) @ P)
    return ref


@pytest.mark.parametrize("r", [1, 3, 6])
def test_cut_matches_float64_reference_of_the_same_maps(r):
    model = bert()
    before = count(model)
    mean, cov = input_stats(model)
    block = model.get_submodule(LAYER)
    _, spec = block_of(block)
    stats = head_statistics(block, spec, mean, cov)
    site = make_site(f"{LAYER}.attention.self.query", block.attention.self.query, "input")
    red = head_width_reduction(site, stats, r)
    ref = reference(model, red)
    got = cut_head_width(block, mean, cov, r)
    attn = block.attention.self
    assert (attn.attention_head_size, attn.all_head_size) == (r, HEADS * r)
    assert attn.scaling == HD ** -0.5          # the softmax scale stays the original
    assert attn.query.out_features == attn.key.out_features == attn.value.out_features \
        == block.attention.output.dense.in_features == HEADS * r
    saved = 4 * H * HEADS * (HD - r) + 3 * HEADS * (HD - r)   # q, k, v, o weights; q/k/v bias
    assert count(model) == before - saved == before - (got["params_before"] -
                                                       got["params_after"])
    torch.testing.assert_close(logits(model), logits(ref), rtol=0, atol=1e-10)
    assert (logits(model) - logits(bert())).abs().max() > 1e-6   # the cut changed something


def test_qk_maps_are_the_best_rank_r_form():
    """||G^{1/2} (I - A B^T) C^{1/2}||_F^2 is the Eckart-Young minimum (the tail of the
    singular values of G^{1/2} C^{1/2}), and at most what projecting queries and keys onto
    the keys' top-r eigenvectors leaves."""
    g = torch.Generator().manual_seed(4)
    X, Y = torch.randn(HD, 3 * HD, generator=g), torch.randn(HD, 3 * HD, generator=g)
    G, C = X @ X.T / 24, (Y * torch.linspace(0.2, 3, 3 * HD)) @ Y.T / 24

    def sqrt(M):
        e, V = torch.linalg.eigh(M)
        return (V * e.sqrt()) @ V.T

    S = sqrt(G) @ sqrt(C)
    s = torch.linalg.svdvals(S)
    for r in (1, 3, 5):
        A, B = qk_maps(G, C, r)
        err = torch.linalg.matrix_norm(sqrt(G) @ (torch.eye(HD) - A @ B.T) @ sqrt(C)) ** 2
        torch.testing.assert_close(err, (s[r:] ** 2).sum(), rtol=1e-9, atol=1e-12)
        U = torch.linalg.eigh(C)[1][:, -r:]
        plain = torch.linalg.matrix_norm(sqrt(G) @ (torch.eye(HD) - U @ U.T) @ sqrt(C)) ** 2
        assert err <= plain + 1e-12
    A, B = qk_maps(G, C, HD)
    torch.testing.assert_close(A @ B.T, torch.eye(HD), rtol=0, atol=1e-10)


def test_compress_head_width_site_saves_and_loads(tmp_path):
    model = bert()
    cfg = rmtkd.CompressConfig(sites=["head_width"], distill_epochs=0, epsilon=100.0,
                               calib_fraction=1.0, progress=False, past_edge=2.0)
    res = rmtkd.compress(model, batches(), config=cfg)
    assert [r.site for r in res.history] == [f"bert.encoder.layer.{i}.attention.self.query:"
                                             f"input" for i in range(L)]
    for i, rec in enumerate(res.history):
        assert rec.status == "applied", rec.reason
        r = rec.k // HEADS
        assert rec.head_ks == [r] * HEADS and rec.d == HEADS * HD
        assert r == -(-(rec.mp_k // HEADS) // 2)   # 2x past the edge: half the MP head size
        attn = res.model.bert.encoder.layer[i].attention.self
        assert attn.attention_head_size == r and attn.query.out_features == HEADS * r
    assert res.final_params < res.original_params
    want = logits(res.model)
    rmtkd.save(res.model, tmp_path / "m")
    back = rmtkd.load(tmp_path / "m").to(torch.float64).eval()
    torch.testing.assert_close(logits(back), want, rtol=0, atol=1e-12)
    # a fresh model of the saved config, reshaped by its width records, loads strictly
    fresh = BertForSequenceClassification(copy.deepcopy(res.model.config)).to(
        torch.float64).eval()
    apply_widths(fresh)
    fresh.load_state_dict(res.model.state_dict(), strict=True)
    torch.testing.assert_close(logits(fresh), want, rtol=0, atol=1e-12)


def test_value_width_before_head_width_is_refused():
    cfg = rmtkd.CompressConfig(sites=[f"{LAYER}.attention.output.dense",
                                      f"{LAYER}.attention.self.query"], progress=False)
    with pytest.raises(ValueError, match="head width first"):
        rmtkd.compress(bert(), batches(), config=cfg)


def test_head_width_then_residual_cut_and_onnx(tmp_path):
    """The stream cut reads the narrowed q/k/v and o like any Linear; the exported graph
    gives the torch model's logits."""
    pytest.importorskip("onnxruntime")
    from rmtkd.hf.onnx import check_onnx, export_onnx, probe_batches

    cfg = rmtkd.CompressConfig(sites=["head_width", "residual_width"], distill_epochs=0,
                               epsilon=100.0, calib_fraction=1.0, progress=False,
                               past_edge=2.0)
    res = rmtkd.compress(bert(), batches(), config=cfg)
    assert [r.status for r in res.history] == ["applied"] * (L + 1), \
        [r.reason for r in res.history]
    model = res.model.float().eval()
    example = {k: v for k, v in probe().items()}
    path = export_onnx(model, tmp_path / "m.onnx", example)
    assert check_onnx(model, path, probe_batches(example)) < 1e-4
