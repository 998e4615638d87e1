"""Token-embedding rank (rmtkd.reduce.embedding): the factorised table against float64
references, exactness at k = d, composition, the sample count of its fit, tied tables left
alone, and the cut inside rmtkd.compress (saved and loaded back)."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (BertConfig, BertForSequenceClassification, LlamaConfig,  # noqa: E402
                          LlamaForCausalLM)

import rmtkd  # noqa: E402
from rmtkd.adapters import adapter_for  # noqa: E402
from rmtkd.capture import distinct_inputs  # noqa: E402
from rmtkd.hf.modeling_rmtkd import FactorizedEmbedding  # noqa: E402
from rmtkd.reduce import Reduction, reduce_site  # noqa: E402

H, V = 32, 101
EMB = "bert.embeddings.word_embeddings"


def bert(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, num_labels=3, max_position_embeddings=32,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def orth(d, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64)).Q


def inputs(seed, b=5, t=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[::2, t // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def projected_reference(model, U, mean):
    """``model`` with its embedding output replaced by ``mean + U U^T (e - mean)`` in
    float64 (a hook, no surgery)."""
    ref = copy.deepcopy(model)

    def hook(_m, _a, out):
        e = out.double()
        return (mean + (e - mean) @ U @ U.T).to(out.dtype)

    ref.get_submodule(EMB).register_forward_hook(hook)
    return ref


@pytest.mark.parametrize("k", [H, 20, 5])
def test_factorised_table_matches_the_float64_projection(k):
    model = bert()
    table = model.get_submodule(EMB).weight.detach().double()
    U, mean = orth(H, k, 1), table.mean(0) + 0.01 * torch.randn(H, dtype=torch.float64)
    ref = projected_reference(model, U, mean)
    res = reduce_site(model, Reduction(f"{EMB}:output", EMB, "width", H, k, U, mean),
                      force=True)
    emb = model.get_submodule(EMB)
    assert res.applied and isinstance(emb, FactorizedEmbedding) and emb.rank == k
    assert sum(p.numel() for p in emb.parameters()) == V * k + k * H + H
    x = inputs(2)
    expect = mean + (table[x["input_ids"]] - mean) @ U @ U.T
    got = emb(x["input_ids"]).double()
    assert (got - expect).norm() / expect.norm() < 1e-6
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, ref(**x).logits, rtol=0, atol=1e-5)
    assert model.config.rmtkd_embedding == {"rank": k}


def test_full_rank_is_exact():
    model = bert()
    x = inputs(3)
    with torch.no_grad():
        before = model(**x).logits
        mean = model.get_submodule(EMB).weight.double().mean(0)
        reduce_site(model, Reduction("e", EMB, "width", H, H, orth(H, H, 4), mean), force=True)
        torch.testing.assert_close(model(**x).logits, before, rtol=0, atol=1e-6)


def test_a_second_cut_composes_with_the_first():
    model = bert()
    table = model.get_submodule(EMB).weight.detach().double()
    U1, U2 = orth(H, 16, 5), None
    m1 = table.mean(0)
    assert reduce_site(model, Reduction("e", EMB, "width", H, 16, U1, m1)).applied
    once = mean_once = m1 + (table - m1) @ U1 @ U1.T
    U2 = torch.linalg.qr(U1 @ torch.randn(16, 6, dtype=torch.float64)).Q   # inside span(U1)
    m2 = mean_once.mean(0)
    assert reduce_site(model, Reduction("e", EMB, "width", H, 6, U2, m2)).applied
    expect = m2 + (once - m2) @ U2 @ U2.T
    emb = model.get_submodule(EMB)
    got = (emb.embed.weight.double() @ emb.proj.weight.double().T
           + emb.proj.bias.double()).detach()
    assert emb.rank == 6 and (got - expect).norm() / expect.norm() < 1e-6


def test_a_cut_that_saves_nothing_is_skipped():
    model = bert()
    # V k + k H + H >= V H for k close to H
    res = reduce_site(model, Reduction("e", EMB, "width", H, H - 1, orth(H, H - 1, 6)))
    assert not res.applied and "would not reduce" in res.reason
    assert isinstance(model.get_submodule(EMB), torch.nn.Embedding)


def test_distinct_inputs_counts_unmasked_ids_and_stops_at_the_embedding():
    model = bert()
    ids = torch.tensor([[1, 2, 2, 3, 0, 0], [4, 4, 4, 9, 9, 50]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]])
    calls = []
    model.bert.encoder.register_forward_pre_hook(lambda *a: calls.append(1))
    n = distinct_inputs(model, [{"input_ids": ids, "attention_mask": mask}], EMB)
    assert n == len({1, 2, 3, 4, 9}) and calls == []


def test_tied_tables_are_not_offered():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=H, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=V,
                      tie_word_embeddings=True)
    tied = LlamaForCausalLM(cfg)
    ad = adapter_for(tied)
    assert ad.token_embedding(tied) == "model.embed_tokens" and ad.tied_embedding(tied)
    assert "embedding_rank" not in [d.kind for d in ad.coupled_dims(tied)]
    cfg.tie_word_embeddings = False
    untied = LlamaForCausalLM(cfg)
    assert [d.kind for d in ad.coupled_dims(untied)][0] == "embedding_rank"


def test_compress_cuts_the_embedding_rank_and_saves_it(tmp_path):
    model = bert()
    g = torch.Generator().manual_seed(0)
    # rows = an 8-dim signal (variance ~ 9 x 8 per direction) + unit noise: 8 spikes
    # far above the MP edge of gamma = 32 / 101 distinct rows
    with torch.no_grad():
        low = 3 * torch.randn(V, 8, generator=g) @ torch.linalg.qr(
            torch.randn(H, 8, generator=g)).Q.T * 8 ** 0.5
        model.get_submodule(EMB).weight.copy_(0.02 * (low + torch.randn(V, H, generator=g)))
    data = []
    for i in range(12):
        x = inputs(10 + i, b=8, t=12)
        data.append({**x, "labels": torch.randint(0, 3, (8,), generator=g)})
    cfg = rmtkd.CompressConfig(sites=["embedding_rank"], distill_epochs=1,
                               distill_min_steps=2, progress=False, epsilon=100.0,
                               calib_fraction=1.0)
    res = rmtkd.compress(model, data, config=cfg)
    rec = res.history[0]
    assert rec.site == f"{EMB}:output" and rec.status == "applied"
    assert rec.k == 8 and rec.mp_k == 8
    seen = {int(t) for b in data for t in b["input_ids"][b["attention_mask"] != 0]}
    assert rec.gamma == pytest.approx(H / len(seen))   # n = distinct tokens, not positions
    emb = res.model.get_submodule(EMB)
    assert isinstance(emb, FactorizedEmbedding) and emb.rank == rec.k
    rmtkd.save(res, tmp_path / "out")
    back = rmtkd.load(tmp_path / "out")
    x = inputs(99)
    with torch.no_grad():
        torch.testing.assert_close(back(**x).logits, res.model(**x).logits, rtol=0,
                                   atol=1e-6)
