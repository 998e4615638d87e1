"""Block-wise compression of Llama decoders (rmtkd.blockwise) on tiny random models (hidden
64, GQA 4 query / 2 key-value heads, vocab 128): calibration statistics against a full-model
forward with hooks, identity when every direction is kept, load + generate, kill -9 and
--resume giving identical weights, memory-mapped states on disk, the CLI."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import rmtkd  # noqa: E402
from rmtkd import blockwise  # noqa: E402
from rmtkd.blockwise import BlockwiseConfig, compress_blockwise  # noqa: E402
from rmtkd.ops.covariance import CovarianceAccumulator  # noqa: E402

HID, FF, HEADS, KV, VOCAB, SEQ = 64, 176, 4, 2, 128, 32
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: these tiny shapes gain nothing from more, and the CPUs are shared."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def llama(layers=3, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=HID, intermediate_size=FF, num_hidden_layers=layers,
                      num_attention_heads=HEADS, num_key_value_heads=KV, vocab_size=VOCAB,
                      max_position_embeddings=64, initializer_range=0.1)
    return LlamaForCausalLM(cfg).eval()


def tokens(n=16, seed=1):
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))


def cfg(**kw):
    base = dict(seq_len=SEQ, calib_tokens=16 * SEQ, batch_size=4, distill_epochs=1,
                progress=False)
    return BlockwiseConfig(**{**base, **kw})


def test_statistics_match_full_model_hooks(tmp_path):
    model, ids = llama(), tokens()
    res = compress_blockwise(model, ids, out=tmp_path / "o", config=cfg(
        mode="width", keep_all=True, keep_stats=True, acc_dtype="float64"))
    for i, layer in enumerate(model.model.layers):   # reference: one full forward, hooks
        accs = {"mlp.down_proj:input": CovarianceAccumulator(FF, acc_dtype=torch.float64),
                "self_attn.v_proj:output": CovarianceAccumulator(KV * HID // HEADS,
                                                                 acc_dtype=torch.float64)}
        def feed(site, x):
            accs[site].update(x)   # returns None: the hook leaves the activation alone

        hs = [layer.mlp.down_proj.register_forward_pre_hook(
                  lambda _m, a: feed("mlp.down_proj:input", a[0])),
              layer.self_attn.v_proj.register_forward_hook(
                  lambda _m, _a, o: feed("self_attn.v_proj:output", o))]
        with torch.no_grad():
            model(input_ids=ids)
        for h in hs:
            h.remove()
        for site, acc in accs.items():
            ref, got = acc.finalize(), res.stats[i][site]
            assert got.n == ref.n == ids.numel()
            rel = float((got.cov - ref.cov).norm() / ref.cov.norm())
            assert rel < 1e-6, (i, site, rel)
            assert float((got.mean - ref.mean).norm() / ref.mean.norm()) < 1e-6


@pytest.mark.parametrize("mode", ["width", "project"])
def test_keep_all_reproduces_the_logits(tmp_path, mode):
    model, ids = llama(), tokens()
    res = compress_blockwise(model, ids, out=tmp_path / "o", config=cfg(mode=mode,
                                                                         keep_all=True))
    out = rmtkd.load(tmp_path / "o")
    assert all(s["k"] == s["d"] for b in res.blocks for s in b.sites)
    with torch.no_grad():
        ref, got = model(input_ids=ids).logits, out(input_ids=ids).logits
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5
    if mode == "project":   # the surgery did happen: ProjectedLinear everywhere
        assert type(out.model.layers[1].mlp.down_proj).__name__ == "ProjectedLinear"


def test_compressed_directory_model_loads_and_generates(tmp_path):
    model = llama(layers=2)
    model.save_pretrained(tmp_path / "hf")
    ids = tokens(16)
    res = compress_blockwise(tmp_path / "hf", ids, out=tmp_path / "o", config=cfg())
    assert res.params_after < res.params_before == sum(p.numel() for p in model.parameters())
    assert not (tmp_path / ".o.work").exists()   # work dir removed at the end
    out = rmtkd.load(tmp_path / "o")
    assert sum(p.numel() for p in out.parameters()) == res.params_after
    assert out.model.layers[0].mlp.gate_proj.out_features < FF
    gen = out.generate(ids[:1, :8], max_new_tokens=6, min_new_tokens=6, do_sample=False,
                       pad_token_id=0)
    assert gen.shape == (1, 14)
    plan = json.loads((tmp_path / "o" / "plan.json").read_text())
    assert len(plan["blockwise"]["blocks"]) == 2
    # the local distillation never ends worse than the plain cut
    assert all(b.error_final <= b.error_cut for b in res.blocks)


CHILD = textwrap.dedent("""
    import os, signal, sys
    import torch
    from rmtkd import blockwise
    from rmtkd.llm import hfdir
    point = sys.argv[3]
    calls = {"state": 0, "shard": 0, "distill": 0}

    def kill_at(kind, n, fn):
        def wrapped(*a, **k):
            calls[kind] += 1
            if kind == "distill" and point == f"distill:{calls[kind]}":
                os.kill(os.getpid(), signal.SIGKILL)   # in the middle of a block
            out = fn(*a, **k)
            if point == f"{kind}:{calls[kind]}":
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        return wrapped

    blockwise._save_state = kill_at("state", 0, blockwise._save_state)
    blockwise.write_shard = kill_at("shard", 0, blockwise.write_shard)
    blockwise.distill_block = kill_at("distill", 0, blockwise.distill_block)
    cfg = blockwise.BlockwiseConfig(seq_len=32, calib_tokens=256, batch_size=4,
                                    distill_epochs=1, progress=False, seed=3)
    blockwise.compress_blockwise(sys.argv[1], torch.load(sys.argv[2]), out=sys.argv[4],
                                 config=cfg, resume=sys.argv[5] == "resume")
""")


def test_resume_after_kill_gives_identical_weights(tmp_path):
    llama().save_pretrained(tmp_path / "hf")
    torch.save(tokens(), tmp_path / "ids.pt")
    (tmp_path / "child.py").write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def run(point, out, resume):
        return subprocess.run([sys.executable, str(tmp_path / "child.py"), str(tmp_path / "hf"),
                               str(tmp_path / "ids.pt"), point, str(out), resume], env=env,
                              capture_output=True, text=True, timeout=120)

    # The uninterrupted reference, in this process (one thread, like the children).
    compress_blockwise(tmp_path / "hf", tokens(), out=tmp_path / "ref", config=BlockwiseConfig(
        seq_len=32, calib_tokens=256, batch_size=4, distill_epochs=1, progress=False, seed=3))
    # Killed in block 1's distillation (block 0 checkpointed), then, resumed, after block
    # 2's shard was written but before its checkpoint; then resumed to the end.
    work = tmp_path / ".o.work"
    for point, resume, done in (("distill:2", "fresh", 1), ("shard:2", "resume", 2)):
        r = run(point, tmp_path / "o", resume)
        assert r.returncode == -signal.SIGKILL, (point, r.returncode, r.stderr[-2000:])
        assert not (tmp_path / "o").exists()
        state = blockwise._load_state(work)   # checksums verified
        assert state["next_block"] == done   # resume continues from here
    assert (work / "model" / "model-00004-of-00005.safetensors").is_file()  # block 2, unsaved
    r = run("none", tmp_path / "o", "resume")
    assert r.returncode == 0, r.stderr
    ref = (tmp_path / "ref" / "model.safetensors").read_bytes()
    assert (tmp_path / "o" / "model.safetensors").read_bytes() == ref


@pytest.mark.parametrize("damage", ["states", "shard", "state-truncated", "state-flipped"])
def test_damaged_checkpoint_is_refused(tmp_path, monkeypatch, damage):
    """A job stopped after block 0; a damaged file of its checkpoint is reported by name
    on --resume, never loaded."""
    model, ids = llama(layers=3), tokens(8)
    real = blockwise.load_layer

    def stop_at_block_1(src, i, dev):
        if i == 1:
            raise KeyboardInterrupt("stopped")
        return real(src, i, dev)

    monkeypatch.setattr(blockwise, "load_layer", stop_at_block_1)
    with pytest.raises(KeyboardInterrupt):
        compress_blockwise(model, ids, out=tmp_path / "o", config=cfg(mode="project"))
    monkeypatch.setattr(blockwise, "load_layer", real)
    work = tmp_path / ".o.work"
    assert blockwise._load_state(work)["next_block"] == 1
    target = {"states": work / "states-b.f32",
              "shard": work / "model" / "model-00002-of-00005.safetensors",
              "state-truncated": work / "state.pt", "state-flipped": work / "state.pt"}[damage]
    data = bytearray(target.read_bytes())
    if damage == "state-truncated":
        data = data[: len(data) - 100]
    else:
        data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(rmtkd.CorruptCheckpointError, match=target.name):
        compress_blockwise(model, ids, out=tmp_path / "o", config=cfg(mode="project"),
                           resume=True)


def test_states_are_memory_mapped_on_disk(tmp_path, monkeypatch):
    model, ids = llama(layers=4), tokens(8)
    seen = []
    orig = blockwise.teacher_pass

    def spy(layer, states, targets, *a, **k):
        work = tmp_path / ".o.work"
        files = sorted(p.name for p in work.glob("*.f32"))
        seen.append((isinstance(states, np.memmap), Path(states.filename).parent == work,
                     files, [os.path.getsize(work / f) for f in files]))
        return orig(layer, states, targets, *a, **k)

    monkeypatch.setattr(blockwise, "teacher_pass", spy)
    compress_blockwise(model, ids, out=tmp_path / "o", config=cfg(mode="project"))
    size = ids.numel() * HID * 4
    assert len(seen) == 4
    for is_mm, in_work, files, sizes in seen:   # three files whatever the depth
        assert is_mm and in_work
        assert files == ["states-a.f32", "states-b.f32", "targets.f32"]
        assert sizes == [size] * 3


def test_cli_compress_llm(tmp_path, capsys):
    from rmtkd.cli import main

    llama(layers=2).save_pretrained(tmp_path / "hf")
    torch.save(tokens(12), tmp_path / "ids.pt")
    args = ["compress-llm", "--model", str(tmp_path / "hf"), "--text", str(tmp_path / "ids.pt"),
            "--out", str(tmp_path / "o"), "--seq-len", str(SEQ), "--calib-tokens", "256",
            "--mode", "project", "--new-tokens", "4", "--quiet"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "perplexity" in text and "tokens/s" in text and "parameters" in text
    assert isinstance(rmtkd.load(tmp_path / "o"), LlamaForCausalLM)
    with pytest.raises(SystemExit):   # exists, no --force
        main(args)
