"""rmtkd.save / rmtkd.load for Hugging Face BERT models (format "rmtkd-hf"): tiny random
models, reduced in width (feed-forward, per-head attention value) and project mode, round
trip to a transformers object with the same per-layer widths and identical outputs."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (BertConfig, BertForMaskedLM, BertForMultipleChoice,  # noqa: E402
                          BertForPreTraining, BertForQuestionAnswering,
                          BertForSequenceClassification, BertForTokenClassification, BertModel)

import rmtkd  # noqa: E402
from rmtkd.saving import (HF_ARCHITECTURES, CorruptModelError, UnsupportedModelError,  # noqa: E402
                      read_plan)
from rmtkd.nn import ProjectedLinear  # noqa: E402
from rmtkd.reduce import (HeadPaddedLinear, HeadSelectLinear, Reduction,  # noqa: E402
                          head_reduction, reduce_site)

H, HEADS, HD, FF, L = 32, 4, 8, 64, 3


def config(**kw) -> BertConfig:
    return BertConfig(hidden_size=H, num_hidden_layers=L, num_attention_heads=HEADS,
                      intermediate_size=FF, vocab_size=100, max_position_embeddings=32,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)


def bert(cls=BertForSequenceClassification, seed: int = 0):
    torch.manual_seed(seed)
    return cls(config()).eval()


def inputs(multiple_choice: bool = False):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    if multiple_choice:
        return {"input_ids": ids.unsqueeze(0), "attention_mask": mask.unsqueeze(0)}
    return {"input_ids": ids, "attention_mask": mask}


def outputs(model, multiple_choice=False):
    with torch.no_grad():
        o = model(**inputs(multiple_choice))
    return [v for v in o.values() if isinstance(v, torch.Tensor)]


def orth(d, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g)).Q


def widths(model):
    """Per layer: (intermediate width, value head dims or None, projected ranks)."""
    out = []
    for layer in model.base_model.encoder.layer:
        value = layer.attention.self.value
        ranks = {rel: m.rank for rel, m in (("output.dense", layer.output.dense),
                                            ("attention.output.dense",
                                             layer.attention.output.dense))
                 if isinstance(m, ProjectedLinear)}
        out.append((layer.intermediate.dense.out_features,
                    value.head_dims if isinstance(value, HeadPaddedLinear) else None, ranks))
    return out


def reduced(cls=BertForSequenceClassification):
    """Layer 0: FFN width 16; layer 1: attention value width, per-head k = [2, 3, 0, 5]
    (head 2 removed whole); layer 2: FFN project (rank 9) and attention project (rank 10)."""
    model = bert(cls)
    p = "bert.encoder.layer" if cls is not BertModel else "encoder.layer"
    g = torch.Generator().manual_seed(7)
    assert reduce_site(model, Reduction("a", f"{p}.0.output.dense", "width", FF, 16,
                                        orth(FF, 16, 1), torch.randn(FF, generator=g))).applied
    A = torch.randn(H, H, generator=g).double()
    assert reduce_site(model, head_reduction("b", f"{p}.1.attention.output.dense", A @ A.T,
                                             HEADS, [2, 3, 0, 5],
                                             mean=torch.randn(H, generator=g))).applied
    assert reduce_site(model, Reduction("c", f"{p}.2.output.dense", "project", FF, 9,
                                        orth(FF, 9, 2), torch.randn(FF, generator=g))).applied
    assert reduce_site(model, Reduction("d", f"{p}.2.attention.output.dense", "project", H,
                                        10, orth(H, 10, 3))).applied
    return model.eval()


def test_reduced_sequence_classifier_round_trip(tmp_path):
    model = reduced()
    ref = outputs(model)
    rmtkd.save(model, tmp_path / "m")
    assert {f.name for f in (tmp_path / "m").iterdir()} == {"config.json", "model.safetensors",
                                                            "plan.json", "modeling_rmtkd.py"}
    plan = read_plan(tmp_path / "m")
    assert plan["format"] == "rmtkd-hf" and plan["hf_class"] == "BertForSequenceClassification"
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["architectures"] == ["BertForSequenceClassification"]
    assert [b["mlp"] for b in cfg["rmtkd_blocks"]] == [16, FF, FF]
    # the head cut to 0 value dims is removed whole (its query and key rows too)
    assert [b["value_heads"] for b in cfg["rmtkd_blocks"]] == [None, [2, 3, 5], None]
    assert [b["heads"] for b in cfg["rmtkd_blocks"]] == [HEADS, HEADS - 1, HEADS]
    assert [b["ranks"] for b in cfg["rmtkd_blocks"]] == [{}, {}, {"output.dense": 9,
                                                     "attention.output.dense": 10}]

    loaded = rmtkd.load(tmp_path / "m")
    assert type(loaded) is BertForSequenceClassification and not loaded.training
    assert widths(loaded) == widths(model) == [
        (16, None, {}), (FF, [2, 3, 5], {}),
        (FF, None, {"output.dense": 9, "attention.output.dense": 10})]
    layer1 = loaded.bert.encoder.layer[1].attention
    assert isinstance(layer1.self.value, HeadPaddedLinear)
    assert isinstance(layer1.output.dense, HeadSelectLinear)
    assert loaded.dtype == torch.float32
    sd, ref_sd = loaded.state_dict(), model.state_dict()
    assert sd.keys() == ref_sd.keys() and all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    for a, b in zip(outputs(loaded), ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # the loaded model still trains (ProjectedLinear and narrowed layers included)
    loaded.train()
    loaded(**inputs(), labels=torch.tensor([0, 1, 0])).loss.backward()
    assert loaded.bert.encoder.layer[2].output.dense.V.grad is not None


def test_round_trip_float64_base_model_and_overwrite(tmp_path):
    model = reduced(BertModel).to(torch.float64)
    ref = outputs(model)
    rmtkd.save(model, tmp_path / "m")
    with pytest.raises(FileExistsError):
        rmtkd.save(model, tmp_path / "m")
    rmtkd.save(model, tmp_path / "m", overwrite=True)
    loaded = rmtkd.load(tmp_path / "m")
    assert type(loaded) is BertModel and loaded.dtype == torch.float64
    assert widths(loaded) == widths(model)
    for a, b in zip(outputs(loaded), ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [BertModel, BertForSequenceClassification, BertForMaskedLM,
                                 BertForTokenClassification, BertForQuestionAnswering,
                                 BertForMultipleChoice, BertForPreTraining])
def test_unreduced_round_trip(tmp_path, cls):
    assert cls.__name__ in HF_ARCHITECTURES
    model = bert(cls)
    mc = cls is BertForMultipleChoice
    ref = outputs(model, mc)
    rmtkd.save(model, tmp_path / "m")
    loaded = rmtkd.load(tmp_path / "m")
    assert type(loaded) is cls
    assert widths(loaded) == widths(model) == [(FF, None, {})] * L
    for a, b in zip(outputs(loaded, mc), ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    if cls is BertForMaskedLM:   # tied weights stay tied
        assert (loaded.cls.predictions.decoder.weight
                is loaded.bert.embeddings.word_embeddings.weight)


def test_corrupted_weights(tmp_path):
    rmtkd.save(reduced(), tmp_path / "m")
    w = tmp_path / "m" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(CorruptModelError, match="sha256"):
        rmtkd.load(tmp_path / "m")


def test_missing_config_is_corrupt(tmp_path):
    rmtkd.save(bert(), tmp_path / "m")
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(CorruptModelError, match="config.json"):
        rmtkd.load(tmp_path / "m")


def test_class_outside_allowlist(tmp_path):
    class MyBert(BertForSequenceClassification):
        pass

    torch.manual_seed(0)
    with pytest.raises(UnsupportedModelError, match="BertForSequenceClassification"):
        rmtkd.save(MyBert(config()), tmp_path / "m")
    assert not (tmp_path / "m").exists()

    # a plan naming a class outside the allowlist
    rmtkd.save(bert(), tmp_path / "m")
    plan_path = tmp_path / "m" / "plan.json"
    plan = json.loads(plan_path.read_text())
    plan["hf_class"] = "GPT2Model"
    plan_path.write_text(json.dumps(plan))
    with pytest.raises(UnsupportedModelError, match="'GPT2Model' is not supported"):
        rmtkd.load(tmp_path / "m")


def test_unrebuildable_module_fails_at_save(tmp_path):
    model = bert()
    model.bert.encoder.layer[0].output.dense = torch.nn.Sequential(
        torch.nn.Linear(FF, H))
    with pytest.raises(UnsupportedModelError, match="could not rebuild"):
        rmtkd.save(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_load_in_a_fresh_process(tmp_path):
    """load needs neither the original code nor the checkpoint: a new interpreter rebuilds it."""
    import subprocess
    import sys

    model = reduced()
    rmtkd.save(model, tmp_path / "m")
    torch.save(inputs(), tmp_path / "inputs.pt")
    code = ("import sys, torch, rmtkd; m = rmtkd.load(sys.argv[1]); "
            "x = torch.load(sys.argv[2]); "
            "torch.save(m(**x).logits.detach(), sys.argv[3]); print(type(m).__name__)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m"),
                        str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                       check=True, capture_output=True, text=True)
    assert r.stdout.strip() == "BertForSequenceClassification"
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), outputs(model)[0],
                               rtol=0, atol=1e-6)
