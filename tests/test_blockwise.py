"""Block-wise compression of Llama decoders (rmtkd.engine.blockwise) on tiny random models
(hidden 64, GQA 4 query / 2 key-value heads, vocab 128): calibration statistics against a
full-model forward with hooks, identity when every direction is kept, load + generate, kill -9
and --resume giving identical weights, damaged checkpoints refused by name, a checkpoint
without pickles, memory-mapped states on disk, the CLI."""
import copy
import json
import os
import pickle
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
from rmtkd.checkpoint import LATEST, STATE, TENSORS, load_checkpoint  # noqa: E402
from rmtkd.engine import BlockwiseSettings, CompressConfig, blockwise  # noqa: E402
from rmtkd.engine.blockwise import compress_blockwise, work_dir  # noqa: E402
from rmtkd.ops.covariance import CovarianceAccumulator  # noqa: E402

HID, FF, HEADS, KV, VOCAB, SEQ = 64, 176, 4, 2, 128, 32
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def llama(layers=3, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=HID, intermediate_size=FF, num_hidden_layers=layers,
                      num_attention_heads=HEADS, num_key_value_heads=KV, vocab_size=VOCAB,
                      max_position_embeddings=64, initializer_range=0.1)
    return LlamaForCausalLM(cfg).eval()


def tokens(n=16, seed=1):
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))


BLOCKWISE = {f.name for f in __import__("dataclasses").fields(BlockwiseSettings)}


def cfg(**kw):
    """A CompressConfig for these tiny models: keyword arguments that are BlockwiseSettings
    fields go there. The budget holds out the last 4 sequences (128 tokens) by default."""
    base = dict(seq_len=SEQ, calib_tokens=16 * SEQ, batch_size=4, heldout_tokens=4 * SEQ,
                distill_epochs=1, progress=False)
    kw = {**base, **kw}
    b = {k: kw.pop(k) for k in list(kw) if k in BLOCKWISE}
    return CompressConfig(**kw, blockwise=BlockwiseSettings(**b))


def read_state(work):
    """The block-wise job's checkpoint state (manifest verified; RNG left alone)."""
    got = load_checkpoint(work / "ckpt", restore_rng=False)
    assert got is not None
    return got[0]


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


def top_eigenvectors(cov, k):
    e, v = torch.linalg.eigh(cov.double())
    return v[:, e.argsort(descending=True)[:k]]


def projection_reference(model, result, student):
    """float64 reference of a block-wise job run without distillation: a copy of the
    original ``model`` with, per block and per applied site record of ``result`` (run with
    keep_stats), the site's activation replaced as the cut says, from that site's statistics
    (mean m, covariance C; U: the top-k eigenvectors of C):

    - width, values (v_proj output): m + P (v - m), P = blockdiag(U_g U_g^T), the top k_g
      eigenvectors of each kv head's diagonal block of C;
    - width, MLP (down_proj input x, gated: unit selection): m + R (x_S - m_S), S and R
      from :func:`rmtkd.reduce.maths.select_units` on (C, U);
    - project (the input x of every Linear that reads the site, where ``student`` holds a
      ProjectedLinear): m + U U^T (x - m).
    """
    from rmtkd.reduce.maths import select_units

    ref = copy.deepcopy(model).double().eval()
    hd = HID // HEADS
    readers = {"q": ("q", "k", "v"), "gate": ("gate", "up")}
    for r in result.history:
        if r.status != "applied":
            continue
        st = result.stats[r.block][r.site]
        m, C = st.mean.double(), st.cov.double()
        name, _, _ = r.site.partition(":")
        layer, cut = ref.model.layers[r.block], student.model.layers[r.block]
        if r.mode == "width" and r.head_ks is not None:
            Us = [top_eigenvectors(C[g * hd:(g + 1) * hd, g * hd:(g + 1) * hd], kg)
                  for g, kg in enumerate(r.head_ks)]
            P = torch.block_diag(*[U @ U.T for U in Us])
            layer.get_submodule(name).register_forward_hook(
                lambda _m, _a, o, P=P, m=m: m + (o - m) @ P)
        elif r.mode == "width":
            S, R = select_units(C, top_eigenvectors(C, r.k))
            assert cut.get_submodule(name).in_features == r.k
            layer.get_submodule(name).register_forward_pre_hook(
                lambda _m, a, S=S, R=R, m=m: (m + (a[0][..., S] - m[S]) @ R.T,))
        else:
            U = top_eigenvectors(C, r.k)
            prefix, _, leaf = name.rpartition(".")
            key = leaf.removesuffix("_proj")
            projected = [g for g in (f"{prefix}.{x}_proj" for x in readers.get(key, (key,)))
                         if type(cut.get_submodule(g)).__name__ == "ProjectedLinear"]
            assert projected and all(cut.get_submodule(g).rank == r.k for g in projected)
            for g in projected:
                layer.get_submodule(g).register_forward_pre_hook(
                    lambda _m, a, P=U @ U.T, m=m: (m + (a[0] - m) @ P,))
    return ref


def check_against_reference(model, result, student, tol=1e-5):
    """The student's logits match :func:`projection_reference`'s (relative Frobenius error
    below ``tol``, float32 against float64), and the reference differs from the original by
    far more than ``tol``: at least one real cut (k < d) was made."""
    assert any(r.status == "applied" and r.k < r.d for r in result.history)
    x = tokens(4, seed=9)
    with torch.no_grad():
        got = student(input_ids=x).logits.double()
        want = projection_reference(model, result, student)(input_ids=x).logits
        uncut = model(input_ids=x).logits.double()
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(got, want) < tol, rel(got, want)
    assert rel(want, uncut) > 1000 * tol, rel(want, uncut)


def test_compressed_directory_model_loads_and_generates(tmp_path):
    """A model directory compressed (no distillation, so every kept cut is a plain
    projection) loads, computes the float64 reference of its cuts, and generates."""
    model = llama(layers=2)
    model.save_pretrained(tmp_path / "hf")
    ids = tokens(16)
    res = compress_blockwise(tmp_path / "hf", ids, out=tmp_path / "o",
                             config=cfg(distill_epochs=0, keep_stats=True))
    assert res.params_after < res.params_before == sum(p.numel() for p in model.parameters())
    assert not (tmp_path / ".o.work").exists()   # work dir removed at the end
    out = rmtkd.load(tmp_path / "o")
    assert sum(p.numel() for p in out.parameters()) == res.params_after
    assert out.model.layers[0].mlp.gate_proj.out_features < FF
    check_against_reference(model, res, out)
    gen = out.generate(ids[:1, :8], max_new_tokens=6, min_new_tokens=6, do_sample=False,
                       pad_token_id=0)
    assert gen.shape == (1, 14)
    plan = json.loads((tmp_path / "o" / "plan.json").read_text())
    assert sorted({r["block"] for r in plan["blockwise"]["history"]}) == [0, 1]
    assert len(res.blocks) == 2 and res.original_ppl is not None   # the default budget
    assert plan["blockwise"]["calibration"]["heldout_sequences"] == 4
    # without distillation the error after the step is the error of the cut
    assert all(b.error_final == b.error_cut > 0.05 for b in res.blocks)


@pytest.mark.parametrize("mode", ["width", "project"])
def test_local_distillation_lowers_the_block_error(tmp_path, mode):
    """Deep cuts (error ~0.7 / 0.35 in width mode) and enough Adam steps at a useful rate:
    the distilled block's error against the original block's outputs ends well below the
    plain cut's (the job keeps the distilled weights only when they help)."""
    model, ids = llama(layers=2), tokens()
    res = compress_blockwise(model, ids, out=tmp_path / "o", config=cfg(
        mode=mode, ppl_ratio=None, distill_epochs=8, lr=3e-3))
    assert len(res.blocks) == 2
    for b in res.blocks:
        assert b.status == "applied" and b.error_cut > 0.1, b
        assert b.error_final < 0.9 * b.error_cut, (b.index, b.error_cut, b.error_final)


def test_distillation_that_does_not_help_is_undone(tmp_path, monkeypatch):
    """A local distillation that makes the block worse is reverted: the block keeps the
    plain cut, its recorded final error is the cut's, and the written weights are those of
    the same job without distillation, byte for byte."""
    model, ids = llama(layers=2), tokens()
    plain = compress_blockwise(model, ids, out=tmp_path / "plain", config=cfg(
        ppl_ratio=None, distill_epochs=0))
    calls = []

    def harmful(layer, *a, **k):   # "distillation" that scrambles the cut block
        calls.append(1)
        with torch.no_grad():
            for p in layer.parameters():
                p.mul_(-1.5)

    monkeypatch.setattr(blockwise, "distill_layer", harmful)
    res = compress_blockwise(model, ids, out=tmp_path / "o", config=cfg(
        ppl_ratio=None, distill_epochs=1))
    assert len(calls) == 2                       # it ran on both blocks ...
    for b, p in zip(res.blocks, plain.blocks):   # ... and was undone on both
        assert b.status == "applied" and b.error_final == b.error_cut == p.error_cut > 0.1
    assert (tmp_path / "o" / "model.safetensors").read_bytes() == \
        (tmp_path / "plain" / "model.safetensors").read_bytes()


# The kill / resume job: a budget (so the held-out states and perplexities go through the
# checkpoint too), seeded.
JOB = dict(seed=3, distill_epochs=1, progress=False)
JOB_BLOCKWISE = dict(seq_len=32, calib_tokens=256, batch_size=4, heldout_tokens=128,
                     ppl_ratio=1.5)

CHILD = textwrap.dedent("""
    import os, signal, sys
    import torch
    from rmtkd.engine import BlockwiseSettings, CompressConfig, blockwise
    point = sys.argv[3]
    calls = {"state": 0, "shard": 0, "distill": 0}

    def kill_at(kind, fn):
        def wrapped(*a, **k):
            calls[kind] += 1
            if point == f"{kind}-before:{calls[kind]}":
                os.kill(os.getpid(), signal.SIGKILL)   # e.g. in the middle of a block
            out = fn(*a, **k)
            if point == f"{kind}:{calls[kind]}":
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        return wrapped

    # the names the block-wise strategy calls, in its module's namespace
    blockwise.write_checkpoint = kill_at("state", blockwise.write_checkpoint)
    blockwise.write_shard = kill_at("shard", blockwise.write_shard)
    blockwise.distill_layer = kill_at("distill", blockwise.distill_layer)
    cfg = CompressConfig(**JOB, blockwise=BlockwiseSettings(**JOB_BLOCKWISE))
    blockwise.compress_blockwise(sys.argv[1], torch.load(sys.argv[2], weights_only=True),
                                 out=sys.argv[4], config=cfg,
                                 resume=sys.argv[5] == "resume")
""").replace("**JOB,", f"**{JOB!r},").replace("**JOB_BLOCKWISE", f"**{JOB_BLOCKWISE!r}")


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
    ref = compress_blockwise(tmp_path / "hf", tokens(), out=tmp_path / "ref",
                             config=CompressConfig(**JOB, blockwise=BlockwiseSettings(
                                 **JOB_BLOCKWISE)))
    # every block kept its first cut: one distillation per block (the kill points count them)
    assert all(r.status == "applied" and r.attempt == 0 for r in ref.history)
    assert ref.final_ppl <= 1.5 * ref.original_ppl
    # Killed with block 1 done (its shard written, the states rewritten in place) just before
    # its checkpoint (block 0's is the last); resumed, killed in block 2's distillation
    # (block 1 checkpointed); then resumed to the end.
    work = tmp_path / ".o.work"
    shard = lambda j: work / "model" / f"model-{j:05d}-of-00005.safetensors"  # noqa: E731
    # write_checkpoint calls of the fresh run: 1 at the start, 2 after block 0, 3 after 1
    for point, resume, done, shard_left in (("state-before:3", "fresh", 1, True),
                                            ("distill-before:2", "resume", 2, False)):
        r = run(point, tmp_path / "o", resume)
        assert r.returncode == -signal.SIGKILL, (point, r.returncode, r.stderr[-2000:])
        assert not (tmp_path / "o").exists()
        assert read_state(work)["next_block"] == done   # checksums verified; resumes here
        # the unfinished block's shard: written (not checkpointed) or not yet
        assert shard(done + 2).is_file() == shard_left, point
    r = run("none", tmp_path / "o", "resume")
    assert r.returncode == 0, r.stderr
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "o" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    plan, ref_plan = (json.loads((tmp_path / d / "plan.json").read_text())["blockwise"]
                      for d in ("o", "ref"))
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(plan["history"]) == strip(ref_plan["history"])
    assert plan["final_ppl"] == ref_plan["final_ppl"]


def stop_at_block(monkeypatch, index):
    """Make the job stop (KeyboardInterrupt) as block ``index`` starts; returns the undo."""
    real = blockwise.Blockwise.prepare

    def prepare(self, unit):
        if unit.index == index:
            raise KeyboardInterrupt("stopped")
        return real(self, unit)

    monkeypatch.setattr(blockwise.Blockwise, "prepare", prepare)
    return lambda: monkeypatch.setattr(blockwise.Blockwise, "prepare", real)


def never_unpickle(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a checkpoint was unpickled")

    for owner, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(owner, name, boom)


@pytest.mark.parametrize("damage", ["states", "shard", "state-truncated", "state-flipped",
                                    "tensors-flipped"])
def test_damaged_checkpoint_is_refused(tmp_path, monkeypatch, damage):
    """A job stopped after block 0; a damaged file of its checkpoint (its own files, or the
    shards and states it lists) is reported by name on resume, never loaded."""
    model, ids = llama(layers=3), tokens(8)
    undo = stop_at_block(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        compress_blockwise(model, ids, out=tmp_path / "o", config=cfg(mode="project"))
    undo()
    work = tmp_path / ".o.work"
    assert work == work_dir(tmp_path / "o")
    assert read_state(work)["next_block"] == 1
    step = work / "ckpt" / (work / "ckpt" / LATEST).read_text().strip()
    assert step.name == "step-0001"
    target = {"states": work / "states-b.f32",
              "shard": work / "model" / "model-00002-of-00005.safetensors",
              "state-truncated": step / STATE, "state-flipped": step / STATE,
              "tensors-flipped": step / TENSORS}[damage]
    data = bytearray(target.read_bytes())
    if damage == "state-truncated":
        data = data[: len(data) - 100]
    else:
        data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    never_unpickle(monkeypatch)
    with pytest.raises(rmtkd.CorruptCheckpointError, match=target.name) as e:
        compress_blockwise(model, ids, out=tmp_path / "o", config=cfg(mode="project"),
                           resume=True)
    assert e.value.path.name == target.name and e.value.checkpoint_dir == work / "ckpt"
    assert not (tmp_path / "o").exists()


def test_checkpoint_holds_no_pickle_and_resume_never_unpickles(tmp_path, monkeypatch):
    """The work dir's checkpoint is JSON + safetensors (no file starts with the pickle
    protocol byte 0x80 or is a torch.save zip); resuming from it never calls torch.load or
    pickle, and ends with the uninterrupted run's weights."""
    model, ids = llama(layers=3), tokens(12)
    config = cfg(mode="width")
    compress_blockwise(model, ids, out=tmp_path / "ref", config=config)
    undo = stop_at_block(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        compress_blockwise(model, ids, out=tmp_path / "o", config=config)
    undo()
    ckpt = work_dir(tmp_path / "o") / "ckpt"
    files = sorted(p for p in ckpt.rglob("*") if p.is_file())
    assert sorted(p.relative_to(ckpt).as_posix() for p in files) == [
        LATEST, "step-0002/MANIFEST.json", f"step-0002/{STATE}", f"step-0002/{TENSORS}"]
    for p in files:
        head = p.read_bytes()[:4]
        assert head[:1] != b"\x80" and head != b"PK\x03\x04", p
    manifest = json.loads((ckpt / "step-0002" / "MANIFEST.json").read_text())
    assert sorted(manifest["external"]) == [
        "../model/model-00001-of-00005.safetensors", "../model/model-00002-of-00005.safetensors",
        "../model/model-00003-of-00005.safetensors", "../states-a.f32"]
    never_unpickle(monkeypatch)
    compress_blockwise(model, ids, out=tmp_path / "o", config=config, resume=True)
    assert (tmp_path / "o" / "model.safetensors").read_bytes() == \
        (tmp_path / "ref" / "model.safetensors").read_bytes()


def test_states_are_memory_mapped_on_disk(tmp_path, monkeypatch):
    model, ids = llama(layers=4), tokens(12)
    seen = []
    orig = blockwise.teacher_pass

    def spy(layer, run, states, targets, *a, **k):
        work = tmp_path / ".o.work"
        files = sorted(p.name for p in work.glob("*.f32"))
        seen.append((isinstance(states, np.memmap), Path(states.filename).parent == work,
                     files, [os.path.getsize(work / f) for f in files]))
        return orig(layer, run, states, targets, *a, **k)

    monkeypatch.setattr(blockwise, "teacher_pass", spy)
    compress_blockwise(model, ids, out=tmp_path / "o", config=cfg(mode="project"))
    size = (ids.shape[0] - 4) * SEQ * HID * 4   # the last 4 sequences are held out
    assert len(seen) == 4
    for is_mm, in_work, files, sizes in seen:   # three files whatever the depth
        assert is_mm and in_work
        assert files == ["states-a.f32", "states-b.f32", "targets.f32"]
        assert sizes == [size] * 3


def test_cli_compress_llm(tmp_path, capsys, monkeypatch):
    from rmtkd.cli import main
    import rmtkd.engine

    model = llama(layers=2)
    model.save_pretrained(tmp_path / "hf")
    torch.save(tokens(12), tmp_path / "ids.pt")
    results, real = [], rmtkd.engine.compress_blockwise

    def keeping_stats(*a, config, **k):   # the CLI's job, with its statistics kept
        config.blockwise.keep_stats = True
        results.append(real(*a, config=config, **k))
        return results[-1]

    monkeypatch.setattr(rmtkd.engine, "compress_blockwise", keeping_stats)
    args = ["compress-llm", "--model", str(tmp_path / "hf"), "--text", str(tmp_path / "ids.pt"),
            "--out", str(tmp_path / "o"), "--seq-len", str(SEQ), "--calib-tokens", "256",
            "--heldout-tokens", "64", "--mode", "project", "--distill-epochs", "0",
            "--new-tokens", "4", "--quiet"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "perplexity" in text and "tokens/s" in text and "parameters" in text
    assert "budget: held-out perplexity" in text
    out = rmtkd.load(tmp_path / "o")
    assert isinstance(out, LlamaForCausalLM)
    # the written model computes the projections its record says (ProjectedLinear layers)
    (res,) = results
    check_against_reference(model, res, out)
    with pytest.raises(SystemExit):   # exists, no --force
        main(args)


def test_block_error_is_relative_per_token():
    """run_states' error is the root mean over tokens of ||y - t||^2 / ||t||^2: a token
    with a massive activation (as each sequence's first token in real decoders) weighs as
    much as any other, and the distillation loss is the same quantity."""
    from rmtkd.llm.states import memmap, run_states, token_error

    t = torch.randn(2, 5, 8)
    t[:, 0] *= 1e4   # massive first tokens
    y = t.clone()
    y[:, 1:] += 0.1 * t[:, 1:]   # 10% error on the ordinary tokens, none on the massive
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        states = memmap(Path(d) / "s", (2, 5, 8), True)
        targets = memmap(Path(d) / "t", (2, 5, 8), True)
        states[:], targets[:] = y.numpy(), t.numpy()
        err = run_states(torch.nn.Identity(), lambda m, x: m(x), states, batch_size=1,
                         device="cpu", targets=targets)
    want = float(token_error(y.double(), t.double()).mean().sqrt())
    assert err == pytest.approx(want, rel=1e-6)
    assert err == pytest.approx((4 / 5) ** 0.5 * 0.1, rel=1e-4)   # 4 of 5 tokens off by 10%
    # summed over tokens, the same error would read as ~1e-5: the massive tokens hide it
    assert float((y - t).norm() / t.norm()) < 1e-4
