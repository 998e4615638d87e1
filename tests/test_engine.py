"""The engine (rmtkd.engine) across strategies and families: the block-wise strategy on Qwen2
(q/k/v biases) and Mistral decoders, the held-out perplexity budget (respected, measured on
the right sequences, rolled-back blocks unchanged), k = 0 sites skipped, rank rules in the
block-wise path, BERT surgery keeping every tensor on the model's device, the whole-model
resume fingerprint, and the refusal of Hugging Face models no adapter recognises.

Tiny random models (hidden 64, 4 query / 2 key-value heads, vocab 128, sequences of 32
tokens) on one CPU thread."""
from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig,  # noqa: E402
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

import rmtkd  # noqa: E402
from rmtkd.engine import BlockwiseSettings, CompressConfig, compress_blockwise  # noqa: E402
from rmtkd.engine import loop  # noqa: E402
from rmtkd.llm import perplexity  # noqa: E402

HID, FF, HEADS, KV, VOCAB, SEQ = 64, 176, 4, 2, 128, 32
HD = HID // HEADS
FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "mistral": (MistralConfig, MistralForCausalLM)}


pytestmark = pytest.mark.usefixtures("one_thread")


def decoder(family="llama", layers=2, seed=0) -> nn.Module:
    config_cls, model_cls = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = config_cls(hidden_size=HID, intermediate_size=FF, num_hidden_layers=layers,
                     num_attention_heads=HEADS, num_key_value_heads=KV, vocab_size=VOCAB,
                     max_position_embeddings=64, initializer_range=0.1)
    return model_cls(cfg).eval()


def tokens(n=16, seed=1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))


def config(mode="width", distill_epochs=1, **blockwise) -> CompressConfig:
    """No budget unless ``ppl_ratio`` is given (then the last 4 sequences are held out)."""
    top = {k: blockwise.pop(k) for k in ("margin", "rank_rule", "seed") if k in blockwise}
    b = dict(seq_len=SEQ, calib_tokens=16 * SEQ, batch_size=4, heldout_tokens=4 * SEQ,
             ppl_ratio=None)
    return CompressConfig(mode=mode, distill_epochs=distill_epochs, progress=False, **top,
                          blockwise=BlockwiseSettings(**{**b, **blockwise}))


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids).logits


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def layer_state(model, i) -> dict[str, torch.Tensor]:
    return model.model.layers[i].state_dict()


# ------------------------------------------------------------------ Qwen2 and Mistral

@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_family_compresses_loads_and_generates(tmp_path, family):
    model, ids = decoder(family), tokens()
    res = compress_blockwise(model, ids, out=tmp_path / "o", config=config())
    assert res.params_before == n_params(model)
    assert res.params_after < 0.75 * res.params_before
    assert [b.status for b in res.blocks] == ["applied", "applied"]
    out = rmtkd.load(tmp_path / "o")
    assert type(out) is type(model)
    assert n_params(out) == res.params_after
    layer = out.model.layers[0]
    assert layer.mlp.gate_proj.out_features < FF
    assert type(layer.self_attn.v_proj).__name__ == "HeadPaddedLinear"
    if family == "qwen2":   # the q/k/v biases survive the cut (v's in the narrower linear)
        attn = layer.self_attn
        assert attn.q_proj.bias is not None and attn.k_proj.bias is not None
        assert layer.self_attn.v_proj.linear.bias is not None
    assert torch.isfinite(logits(out, ids)).all()
    gen = out.generate(ids[:1, :8], max_new_tokens=6, min_new_tokens=6, do_sample=False,
                       pad_token_id=0)
    assert gen.shape == (1, 14)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_family_zero_budget_reproduces_the_model_exactly(tmp_path, family):
    model, ids = decoder(family), tokens()
    res = compress_blockwise(model, ids, out=tmp_path / "o", config=config(ppl_ratio=1.0))
    assert res.params_after == res.params_before == n_params(model)
    assert res.final_ppl == res.original_ppl
    assert all(r.status == "skipped" and "zero budget" in r.reason for r in res.history)
    out = rmtkd.load(tmp_path / "o")
    assert float((logits(out, ids) - logits(model, ids)).abs().max()) == 0.0


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_family_keep_all_reproduces_the_logits(tmp_path, family):
    model, ids = decoder(family), tokens()
    res = compress_blockwise(model, ids, out=tmp_path / "o", config=config(keep_all=True))
    assert all(r.k == r.d and r.status == "applied" for r in res.history)
    out = rmtkd.load(tmp_path / "o")
    assert type(out.model.layers[1].self_attn.v_proj).__name__ == "HeadPaddedLinear"
    assert float((logits(out, ids) - logits(model, ids)).abs().max()) < 1e-5


# ------------------------------------------------------------------ the perplexity budget

def _check_budget(res, model, out, ratio, ids, heldout_tokens):
    held = ids[-math.ceil(heldout_tokens / SEQ):]   # the held-out sequences: the last ones
    assert res.final_ppl <= ratio * res.original_ppl
    assert perplexity(model, held) == pytest.approx(res.original_ppl, rel=1e-4)
    assert perplexity(out, held) == pytest.approx(res.final_ppl, rel=1e-4)
    # the budget is spread over the blocks: blocks 0..i may spend ratio ** ((i + 1) / L)
    L = len(res.blocks)
    for b in res.blocks:
        recs = [r for r in res.history if r.block == b.index]
        if b.status == "applied":
            assert all(r.metric_after <= res.original_ppl * ratio ** ((b.index + 1) / L)
                       * (1 + 1e-12) for r in recs)
        if b.status == "rolled back":   # every record says so; the block is unchanged
            assert all(r.status == "rolled back" and "rolled back:" in r.reason for r in recs)
            assert b.params_after == b.params_before
            ref, got = layer_state(model, b.index), layer_state(out, b.index)
            assert list(ref) == list(got)
            assert all(torch.equal(ref[k], got[k]) for k in ref), b.index


def test_budget_is_respected_and_measured_on_the_heldout_sequences(tmp_path):
    model, ids = decoder(layers=3), tokens()
    res = compress_blockwise(model, ids, out=tmp_path / "o", config=config(ppl_ratio=1.3))
    out = rmtkd.load(tmp_path / "o")
    _check_budget(res, model, out, 1.3, ids, 4 * SEQ)
    assert res.params_after < res.params_before == n_params(model)


def test_tight_budget_rolls_blocks_back_to_their_original_weights(tmp_path):
    """A budget the full cuts cannot meet (no back-off): the final model stays within it,
    and each rolled-back block keeps its original weights bit for bit."""
    model, ids = decoder(layers=3), tokens()
    ratio = 1.000001
    res = compress_blockwise(model, ids, out=tmp_path / "o",
                             config=config(ppl_ratio=ratio, backoff=0))
    out = rmtkd.load(tmp_path / "o")
    _check_budget(res, model, out, ratio, ids, 4 * SEQ)
    rolled = [b.index for b in res.blocks if b.status == "rolled back"]
    assert rolled, [b.status for b in res.blocks]
    assert all(r.attempt == 0 for r in res.history)   # backoff=0: one attempt per block


# ------------------------------------------------------------------ k = 0 and rank rules

@pytest.mark.parametrize("mode", ["width", "project"])
def test_mlp_site_with_k_0_is_skipped_and_recorded(tmp_path, monkeypatch, mode):
    """A site whose spectrum has no spike (k = 0; forced here for the MLP's down_proj) is
    left as is and recorded as skipped, not cut to one unit; the other sites are cut."""
    real = loop.plan_cut

    def no_spike_in_down_proj(site, *a, **k):
        cut = real(site, *a, **k)
        return dataclasses.replace(cut, k=0, mp_k=0) if site.module_name == "mlp.down_proj" \
            else cut

    monkeypatch.setattr(loop, "plan_cut", no_spike_in_down_proj)
    model, ids = decoder(), tokens()
    res = compress_blockwise(model, ids, out=tmp_path / "o", config=config(mode))
    down = [r for r in res.history if r.site == "mlp.down_proj:input"]
    assert len(down) == 2
    assert all(r.status == "skipped" and r.k == 0 and "k = 0" in r.reason for r in down)
    assert all(b.status == "applied" for b in res.blocks)   # the other sites were cut
    out = rmtkd.load(tmp_path / "o")
    for layer in out.model.layers:
        assert type(layer.mlp.down_proj) is nn.Linear and layer.mlp.down_proj.in_features == FF
        if mode == "width":
            assert layer.mlp.gate_proj.out_features == layer.mlp.up_proj.out_features == FF
            assert type(layer.self_attn.v_proj).__name__ == "HeadPaddedLinear"


@pytest.mark.parametrize("mode", ["width", "project"])
def test_no_spike_anywhere_skips_every_site(tmp_path, mode):
    """margin = 1e6: nothing clears the threshold, every site (value sites per kv head too)
    is skipped with k = 0 and the model is unchanged."""
    model, ids = decoder(), tokens()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rmtkd.SmallSampleWarning)
        res = compress_blockwise(model, ids, out=tmp_path / "o",
                                 config=config(mode, margin=1e6))
    assert all(r.status == "skipped" and r.k == 0 and "k = 0" in r.reason
               for r in res.history)
    if mode == "width":
        assert [r.head_ks for r in res.history if "v_proj" in r.site] == [[0, 0], [0, 0]]
    assert [b.status for b in res.blocks] == ["skipped", "skipped"]
    assert res.params_after == res.params_before
    out = rmtkd.load(tmp_path / "o")
    assert float((logits(out, ids) - logits(model, ids)).abs().max()) == 0.0


@pytest.mark.parametrize("mode", ["width", "project"])
def test_uniform_rank_rule_in_the_blockwise_path(tmp_path, mode):
    model, ids = decoder(), tokens()
    res = compress_blockwise(model, ids, out=tmp_path / "o",
                             config=config(mode, rank_rule="uniform:0.5"))
    assert all(r.rank_rule == "uniform:0.5" for r in res.history)
    for r in res.history:   # k = round(0.5 d) at every site, per kv head for values
        assert r.k == round(0.5 * r.d), r.site
    mlp = [r for r in res.history if r.site == "mlp.down_proj:input"]
    assert [(r.d, r.k) for r in mlp] == [(FF, 88), (FF, 88)]
    out = rmtkd.load(tmp_path / "o")
    if mode == "width":
        values = [r for r in res.history if r.site == "self_attn.v_proj:output"]
        assert [r.head_ks for r in values] == [[HD // 2] * KV] * 2
        for layer in out.model.layers:
            assert layer.mlp.gate_proj.out_features == 88
            assert layer.self_attn.v_proj.head_dims == [HD // 2] * KV
            assert not layer.self_attn.v_proj.compact    # padded unless opted in
    else:   # a projection is kept where it saves parameters (not down_proj at 88 of 176)
        for r in res.history:
            mod = out.model.layers[r.block].get_submodule(r.site.split(":")[0])
            if r.status == "applied":
                assert type(mod).__name__ == "ProjectedLinear" and mod.rank == r.k, r.site
            else:
                assert type(mod) is nn.Linear and "would not reduce parameters" in r.reason
        assert any(r.status == "applied" for r in res.history)
    assert n_params(out) == res.params_after < res.params_before


# ------------------------------------------------------------------ BERT surgery devices

def _lazy_device() -> str:
    """The lazy-tensor device (TorchScript backend): a non-CPU device that holds data on a
    CPU-only build. ``meta`` cannot stand in: the surgery reads the weights (float64 maths
    on the CPU), and the head index of a module built on meta is kept on the CPU on
    purpose (a meta buffer would be lost)."""
    try:
        import torch._lazy
        import torch._lazy.ts_backend

        torch._lazy.ts_backend.init()
        torch.zeros(1, device="lazy").cpu()
    except Exception as e:   # noqa: BLE001 -- a build without lazy tensors
        pytest.skip(f"no lazy-tensor backend: {e}")
    return "lazy"


@pytest.mark.parametrize("device", ["lazy", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_bert_value_width_surgery_keeps_every_tensor_on_the_model_device(device):
    """Review bug: the index buffers of HeadPaddedLinear / HeadSelectLinear were built on
    the CPU whatever the model's device."""
    from transformers import BertConfig, BertModel

    from rmtkd.reduce import HeadPaddedLinear, HeadSelectLinear, head_reduction, reduce_site

    if device == "lazy":
        device = _lazy_device()
    H = 32
    cfg = BertConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=HEADS,
                     intermediate_size=64, vocab_size=100, max_position_embeddings=32,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = BertModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    model = model.to(device)
    A = torch.randn(H, H, generator=torch.Generator().manual_seed(2))
    for layer, ks in ((0, [3, 2, 0, 8]), (1, 5)):
        red = head_reduction("s", f"encoder.layer.{layer}.attention.output.dense", A @ A.T,
                             HEADS, ks, mean=torch.randn(H))
        assert reduce_site(model, red).applied
    attn = model.encoder.layer[0].attention
    assert isinstance(attn.self.value, HeadPaddedLinear)
    assert isinstance(attn.output.dense, HeadSelectLinear)
    assert attn.self.value.head_dims == [3, 2, 8]   # the head without values is removed
    assert attn.self.query.out_features == attn.self.key.out_features == 3 * (H // HEADS)
    off = [(n, str(t.device)) for n, t in [*model.named_parameters(), *model.named_buffers()]
           if t.device.type != torch.device(device).type]
    assert off == []
    with torch.no_grad():   # and it runs there
        out = model(input_ids=ids.to(device)).last_hidden_state.cpu()
    assert out.shape == (2, 9, H) and torch.isfinite(out).all()


# ------------------------------------------------------------------ whole-model resume

def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(),
                         nn.Linear(48, 5)).eval()


def _batches(seed: int, n: int = 256) -> list:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=g)
    return list(zip(x.split(64), x[:, :5].argmax(1).split(64)))


@pytest.mark.parametrize("other", ["model", "train data", "calibration data"])
def test_resume_refuses_another_model_or_data(tmp_path, other):
    cfg = CompressConfig(progress=False, distill_epochs=0, max_steps=1)
    ck = tmp_path / "ckpt"
    job = dict(model=_mlp(0), train=_batches(0), calib=_batches(0, 128))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rmtkd.SmallSampleWarning)
        first = rmtkd.compress(job["model"], job["train"], calib_data=job["calib"], config=cfg,
                               checkpoint_dir=ck)
        again = rmtkd.compress(job["model"], job["train"], calib_data=job["calib"],
                               config=cfg, checkpoint_dir=ck, resume=True)   # the same job
    assert [r.to_dict() for r in again.history] == [r.to_dict() for r in first.history]
    key, value = {"model": ("model", _mlp(1)), "train data": ("train", _batches(1)),
                  "calibration data": ("calib", _batches(1, 128))}[other]
    changed = {**job, key: value}   # same shapes, other values
    with pytest.raises(ValueError, match="fingerprint differs"):
        rmtkd.compress(changed["model"], changed["train"], calib_data=changed["calib"],
                       config=cfg, checkpoint_dir=ck, resume=True)


@pytest.mark.parametrize("other", ["model", "data", "settings"])
def test_blockwise_resume_refuses_another_job(tmp_path, monkeypatch, other):
    from rmtkd.engine import blockwise

    real = blockwise.Blockwise.prepare

    def stop_at_block_1(self, unit):
        if unit.index == 1:
            raise KeyboardInterrupt("stopped")
        return real(self, unit)

    monkeypatch.setattr(blockwise.Blockwise, "prepare", stop_at_block_1)
    model, ids = decoder(), tokens()
    with pytest.raises(KeyboardInterrupt):
        compress_blockwise(model, ids, out=tmp_path / "o", config=config())
    monkeypatch.setattr(blockwise.Blockwise, "prepare", real)
    job = {"model": model, "data": ids, "settings": config()}
    job[other] = {"model": decoder(seed=1), "data": tokens(seed=2),
                  "settings": config(rank_rule="uniform:0.5")}[other]
    with pytest.raises(ValueError, match="belongs to a job with other arguments"):
        compress_blockwise(job["model"], job["data"], out=tmp_path / "o",
                           config=job["settings"], resume=True)
    # the same job resumes
    res = compress_blockwise(model, ids, out=tmp_path / "o", config=config(), resume=True)
    assert [b.index for b in res.blocks] == [0, 1]


# ------------------------------------------------------------------ unsupported models

def test_unsupported_hf_model_is_refused_with_what_was_looked_for():
    from transformers import GPT2Config, GPT2LMHeadModel

    from rmtkd.adapters import ADAPTERS, UnsupportedArchitectureError

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50,
                                       n_positions=16, bos_token_id=0, eos_token_id=0)).eval()
    ids = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(UnsupportedArchitectureError) as e:
        rmtkd.compress(model, [(ids, ids)], config=CompressConfig(progress=False,
                                                                  distill_epochs=0))
    msg = str(e.value)
    assert "GPT2LMHeadModel" in msg and "model_type 'gpt2'" in msg
    assert "Looked for: " in msg and all(a.describe() in msg for a in ADAPTERS)
    assert "self_attn.q_proj" in msg and "attention.self.query" in msg
    assert "Adding an architecture" in msg and "register_adapter" in msg
    assert isinstance(e.value, ValueError)


def test_unsupported_hf_model_is_refused_before_it_is_run():
    from transformers import T5Config, T5ForConditionalGeneration

    from rmtkd.adapters import UnsupportedArchitectureError

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=1,
                                                num_heads=4, vocab_size=50)).eval()
    ids = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(UnsupportedArchitectureError, match="model_type 't5'"):
        rmtkd.compress(model, [(ids, ids)], config=CompressConfig(progress=False,
                                                                  distill_epochs=0))
