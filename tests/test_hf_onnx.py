"""ONNX export (rmtkd.hf.onnx) of tiny rmtkd-reduced BERT models: a sequence classifier and a
SentenceEncoder, each with a narrowed MLP, narrowed value heads and a ProjectedLinear;
ONNX Runtime against torch at two batch sizes and sequence lengths with padding; the
TorchScript fallback; the latency helpers; a missing onnxruntime."""
import sys

import pytest
import torch

pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
from transformers import BertConfig, BertForSequenceClassification, BertModel  # noqa: E402

from rmtkd.errors import InputError  # noqa: E402
from rmtkd.examples.minilm import SentenceEncoder  # noqa: E402
from rmtkd.hf import onnx as hx  # noqa: E402
from rmtkd.hf.modeling_rmtkd import FactorizedEmbedding  # noqa: E402
from rmtkd.nn import ProjectedLinear  # noqa: E402
from rmtkd.reduce import (HeadPaddedLinear, HeadSelectLinear, Reduction,  # noqa: E402
                          head_reduction, reduce_site)

H, HEADS, FF, L, VOCAB = 32, 4, 64, 2, 100

pytestmark = pytest.mark.usefixtures("one_thread")


def config() -> BertConfig:
    return BertConfig(hidden_size=H, num_hidden_layers=L, num_attention_heads=HEADS,
                      intermediate_size=FF, vocab_size=VOCAB, max_position_embeddings=32,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def orth(d, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g)).Q


def reduce(model, prefix="bert.encoder.layer"):
    """Layer 0: MLP width 64 -> 16; layer 1: value heads [2, 3, 0, 5] of 8, MLP output
    projected to rank 9 (a ProjectedLinear); the token embedding factorised to rank 16."""
    g = torch.Generator().manual_seed(7)
    emb = prefix.replace("encoder.layer", "embeddings.word_embeddings")
    table = model.get_submodule(emb).weight.detach()
    assert reduce_site(model, Reduction("e", emb, "width", H, 16, orth(H, 16, 4),
                                        table.mean(0))).applied
    assert reduce_site(model, Reduction("a", f"{prefix}.0.output.dense", "width", FF, 16,
                                        orth(FF, 16, 1), torch.randn(FF, generator=g))).applied
    A = torch.randn(H, H, generator=g)
    assert reduce_site(model, head_reduction("b", f"{prefix}.1.attention.output.dense",
                                             A @ A.T, HEADS, [2, 3, 0, 5],
                                             mean=torch.randn(H, generator=g))).applied
    assert reduce_site(model, Reduction("c", f"{prefix}.1.output.dense", "project", FF, 9,
                                        orth(FF, 9, 2), torch.randn(FF, generator=g))).applied
    layers = model.get_submodule(prefix)
    assert layers[0].intermediate.dense.out_features == 16
    assert isinstance(layers[1].attention.self.value, HeadPaddedLinear)
    assert isinstance(layers[1].attention.output.dense, HeadSelectLinear)
    assert isinstance(layers[1].output.dense, ProjectedLinear)
    assert isinstance(model.get_submodule(emb), FactorizedEmbedding)
    return model.eval()


def batch(b, t, seed, pad=True):
    """Random ids; with ``pad``, every other row is padded after 60% of its tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    if pad:
        mask[1::2, int(0.6 * t):] = 0
        mask[0, t - 2:] = 0
    types = (torch.arange(t) >= t // 2).long().expand(b, t).clone()
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": types}


FRESH = [batch(1, 7, seed=11), batch(5, 13, seed=12)]   # not the export example's shape


def dynamic_inputs(path):
    graph = onnx.load(str(path)).graph
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in graph.input}


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    torch.manual_seed(0)
    model = reduce(BertForSequenceClassification(config()))
    path = hx.export_onnx(model, tmp_path_factory.mktemp("cls") / "model.onnx",
                          batch(2, 9, seed=3))
    return model, path


def test_reduced_classifier_matches_torch_with_dynamic_axes(classifier):
    model, path = classifier
    assert path.is_file() and not path.with_name(path.name + ".data").exists()
    onnx.checker.check_model(str(path), full_check=True)
    assert dynamic_inputs(path) == {n: ["batch", "sequence"] for n in hx.INPUT_NAMES}
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["logits"]
    diff = hx.check_onnx(model, path, FRESH, atol=1e-4)
    assert 0 <= diff <= 1e-4
    # the padding matters: the padded rows' logits change with the mask far more than ORT
    # differs from torch, and ORT follows torch without the padding too
    b = FRESH[1]
    unpadded = {**b, "attention_mask": torch.ones_like(b["attention_mask"])}
    with torch.no_grad():
        effect = (model(**unpadded).logits - model(**b).logits).abs().max().item()
    assert effect > max(1e-5, 100 * diff)
    assert hx.check_onnx(model, path, [FRESH[0], unpadded]) <= 1e-4


def test_check_onnx_detects_a_different_model_and_needs_both_axes(classifier):
    model, path = classifier
    with pytest.raises(InputError, match="two batch sizes and two sequence lengths"):
        hx.check_onnx(model, path, [FRESH[1], batch(5, 13, seed=4)])
    with pytest.raises(InputError, match="graph takes"):
        hx.check_onnx(model, path, [{"input_ids": b["input_ids"]} for b in FRESH])
    with torch.no_grad():
        model.classifier.bias.add_(1e-2)
    try:
        with pytest.raises(hx.OnnxCheckError, match="differs from torch"):
            hx.check_onnx(model, path, FRESH)
    finally:
        with torch.no_grad():
            model.classifier.bias.sub_(1e-2)
    probes = hx.probe_batches(batch(2, 9, seed=3))
    assert [tuple(p["input_ids"].shape) for p in probes] == [(1, 7), (5, 13)]
    assert hx.check_onnx(model, path, probes) <= 1e-4


def test_reduced_sentence_encoder_matches_torch(tmp_path):
    torch.manual_seed(1)
    model = reduce(SentenceEncoder(BertModel(config())))
    example = batch(3, 10, seed=5)
    del example["token_type_ids"]   # inputs: input_ids, attention_mask only
    path = hx.export_onnx(model, tmp_path / "enc.onnx", example)
    assert dynamic_inputs(path) == {"input_ids": ["batch", "sequence"],
                                    "attention_mask": ["batch", "sequence"]}
    out = onnx.load(str(path)).graph.output
    assert [o.name for o in out] == ["sentence_embedding"]
    fresh = [{k: v for k, v in b.items() if k != "token_type_ids"} for b in FRESH]
    assert hx.check_onnx(model, path, fresh, atol=1e-4) <= 1e-4


def test_torchscript_fallback_for_a_bare_bert_model(tmp_path, monkeypatch):
    """Where the dynamo exporter fails, export_onnx warns and uses the TorchScript exporter;
    a bare (reduced) BertModel exports last_hidden_state [batch, sequence, hidden]."""
    def broken(*args, **kwargs):
        raise RuntimeError("no dynamo today")
    monkeypatch.setattr(hx, "_export_dynamo", broken)
    torch.manual_seed(2)
    model = reduce(BertModel(config()), prefix="encoder.layer")
    with pytest.warns(RuntimeWarning, match="no dynamo today.*TorchScript"):
        path = hx.export_onnx(model, tmp_path / "bert.onnx", batch(2, 9, seed=6))
    out = onnx.load(str(path)).graph.output[0]
    assert out.name == "last_hidden_state"
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == \
        ["batch", "sequence", H]
    assert hx.check_onnx(model, path, FRESH) <= 1e-4


def test_latency_helpers(classifier):
    model, path = classifier
    ms = hx.onnx_latency_ms(path, FRESH[0], repeats=3, warmup=1)
    assert ms > 0
    table = hx.latency_table(model, model, path, path, {1: FRESH[0], 5: FRESH[1]}, passes=2,
                             warmup=1)
    assert table["threads"] == torch.get_num_threads() and set(table["batches"]) == {1, 5}
    row = table["batches"][5]
    for engine in ("torch", "onnx"):
        assert row[f"{engine}_before_ms"] > 0 and row[f"{engine}_after_ms"] > 0
        assert row[f"{engine}_speedup"] == pytest.approx(
            row[f"{engine}_before_ms"] / row[f"{engine}_after_ms"])
        assert len(row["rounds"][engine]["before"]) == 2
    text = hx.format_latency_table(table)
    assert "ORT after (ms)" in text and len(text.splitlines()) == 5
    with pytest.raises(InputError, match="batch size 1"):
        hx.latency_table(model, model, path, path, {32: FRESH[0]}, passes=1)


def test_export_rejects_a_bad_example(tmp_path):
    model = BertModel(config()).eval()
    with pytest.raises(InputError, match="input_ids"):
        hx.export_onnx(model, tmp_path / "m.onnx", {"attention_mask": torch.ones(2, 3)})
    with pytest.raises(InputError, match="unsupported input"):
        hx.export_onnx(model, tmp_path / "m.onnx",
                       {"input_ids": torch.ones(2, 3, dtype=torch.long),
                        "pixel_values": torch.ones(2, 3)})


def test_missing_onnxruntime_is_an_input_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)   # import onnxruntime -> ImportError
    model = BertModel(config()).eval()
    with pytest.raises(InputError, match=r'onnxruntime.*pip install "rmtkd\[onnx\]"'):
        hx.check_onnx(model, tmp_path / "m.onnx", FRESH)
    with pytest.raises(InputError, match=r'rmtkd\[onnx\]'):
        hx.onnx_latency_ms(tmp_path / "m.onnx", FRESH[0], repeats=1)
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(InputError, match=r'onnxscript.*rmtkd\[onnx\]'):
        hx.export_onnx(model, tmp_path / "m.onnx", FRESH[0])


def test_projected_linear_takes_the_torch_path_when_exporting(tmp_path, monkeypatch):
    """Under torch.onnx.export / torch.export a ProjectedLinear is two plain matmuls, whatever
    backend it asks for (eager, the backend is resolved and may refuse)."""
    import rmtkd.ops.projected_linear as pl

    def refuse(*args, **kwargs):
        raise RuntimeError("backend resolved while exporting")
    monkeypatch.setattr(pl, "_resolve", refuse)
    layer = ProjectedLinear.from_linear(torch.nn.Linear(16, 8), orth(16, 5, 0)).eval()
    x = torch.randn(3, 16)
    with pytest.raises(RuntimeError, match="resolved"):
        layer(x)
    ep = torch.export.export(layer, (x,))
    torch.testing.assert_close(ep.module()(x), x @ layer.V @ layer.W.T + layer.bias)
    with hx._quiet_export():
        torch.onnx.export(layer, (x,), str(tmp_path / "pl.onnx"), dynamo=False)
    onnx.checker.check_model(str(tmp_path / "pl.onnx"))
