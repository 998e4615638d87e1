"""Fault tolerance of compression jobs (issue 6): kill -9 at random and at targeted points
(calibration, distillation, every stage of a checkpoint write) and resume to the same model
as an uninterrupted run; checkpoints without pickles (JSON + safetensors); damaged
checkpoints detected (manifest checksums) and never read; an accumulator that does not fit in
memory reported clearly; n < d calibration reported with gamma and still fitted.

The kill tests run the jobs in forked children of one server process (tests/ can't afford a
torch import per run): the server imports rmtkd once, then per command forks a child that
compresses a small saved MLP (3 sites) with a checkpoint directory, optionally with an rmtkd
function patched to SIGKILL the child at its N-th call (no test hook in the library). The
server reaps a child only after the test's ``kill``/``wait``, so a pid it kills is always
its own child.
"""
from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import rmtkd
from rmtkd.checkpoint import (LATEST, MANIFEST, STATE, TENSORS, CorruptCheckpointError,
                              file_entry, load_checkpoint, verify_manifest, write_checkpoint,
                              write_manifest)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

SERVER = textwrap.dedent("""
    import importlib, json, os, signal, sys, time, traceback
    import torch
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    import rmtkd, rmtkd.checkpoint, rmtkd.saving, rmtkd.distill.trainer, rmtkd.ops.covariance
    import safetensors.torch

    def resolve(path):
        parts = path.split(".")
        for i in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            for p in parts[i:]:
                obj = getattr(obj, p)
            return obj
        raise ImportError(path)

    def kill_at(spec):
        # "pkg.module.attr:N:before|after": SIGKILL this process at the N-th call of attr
        target, n, when = spec.rsplit(":", 2)
        owner_path, attr = target.rsplit(".", 1)
        owner = resolve(owner_path)
        original, calls, n = getattr(owner, attr), [0], int(n)
        def wrapper(*args, **kwargs):
            calls[0] += 1
            if when == "before" and calls[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            result = original(*args, **kwargs)
            if when == "after" and calls[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        setattr(owner, attr, wrapper)

    def job(a):
        if a["kill"] != "none":
            kill_at(a["kill"])
        splits = torch.load(a["data"], weights_only=True)
        train = list(zip(*(t.split(64) for t in splits["train"])))
        val = list(zip(*(t.split(128) for t in splits["val"])))
        cfg = rmtkd.CompressConfig(seed=5, progress=False, calib_fraction=0.25,
                                   distill_epochs=1, distill_min_steps=40, warmup_steps=5,
                                   epsilon=100.0)
        res = rmtkd.compress(rmtkd.load(a["teacher"]), train, eval_data=val, config=cfg,
                             checkpoint_dir=a["ckpt"], resume=a["resume"])
        rmtkd.save(res, a["out"])

    print("ready", flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        pid = os.fork()
        if pid == 0:
            log = os.open(cmd["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(log, 1), os.dup2(log, 2)
            code = 0
            try:
                job(cmd)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)
        print("started", pid, flush=True)
        how = sys.stdin.readline().strip()   # "kill" or "wait"
        if how == "kill":
            os.kill(pid, signal.SIGKILL)   # not reaped yet: a zombie at worst, never reused
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print("exit", code, flush=True)
""")


class JobServer:
    """The fork server above, driven over its stdin/stdout."""

    def __init__(self, tmp: Path, teacher: Path, data: Path) -> None:
        script = tmp / "server.py"
        script.write_text(SERVER)
        self.tmp, self.teacher, self.data = tmp, teacher, data
        self.proc = subprocess.Popen([sys.executable, str(script)], env=ENV, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.runs = 0

    def wait_ready(self) -> None:
        assert self._line(timeout=300) == "ready"   # torch and rmtkd imported

    def _line(self, timeout: float = 120.0) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "the job server did not answer"
        line = self.proc.stdout.readline()
        assert line, f"the job server exited ({self.proc.poll()})"
        return line.strip()

    def start(self, job: Path, *, kill: str = "none", resume: bool = True) -> None:
        self.runs += 1
        self.log = self.tmp / f"run-{self.runs}.log"
        cmd = {"teacher": str(self.teacher), "data": str(self.data), "ckpt": str(job / "ckpt"),
               "out": str(job / "out"), "kill": kill, "resume": resume, "log": str(self.log)}
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        assert self._line().startswith("started")

    def finish(self, how: str = "wait") -> int:
        """``wait`` for the child, or ``kill`` it (SIGKILL) now; its exit code (-9: killed)."""
        self.proc.stdin.write(how + "\n")
        self.proc.stdin.flush()
        code = int(self._line().split()[1])
        assert code in (0, -signal.SIGKILL), self.log.read_text()
        return code

    def run(self, job: Path, **kw) -> int:
        self.start(job, **kw)
        return self.finish("wait")

    def close(self) -> None:
        self.proc.stdin.close()   # the server exits once its current child is reaped
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _synthetic(n: int = 2048, d_in: int = 32, rank: int = 6, classes: int = 5
               ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, rank, generator=g)
    x = z @ torch.randn(rank, d_in, generator=g) + 0.3 * torch.randn(n, d_in, generator=g)
    return x, (z @ torch.randn(rank, classes, generator=g)).argmax(1)


def _mlp(d_in: int = 32, classes: int = 5) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, classes))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A trained teacher (3 sites: 64, 64, 48 features), its data and a job server."""
    if not hasattr(os, "fork"):
        pytest.skip("the job server forks (POSIX only)")
    tmp = tmp_path_factory.mktemp("fault")
    srv = JobServer(tmp, tmp / "teacher", tmp / "data.pt")   # imports while we train
    x, y = _synthetic()
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # a tiny model: more threads only contend
    try:
        for _ in range(5):
            for xb, yb in zip(x[:1536].split(64), y[:1536].split(64)):
                loss = nn.functional.cross_entropy(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    rmtkd.save(model.eval(), tmp / "teacher")
    torch.save({"train": (x[:1536], y[:1536]), "val": (x[1536:], y[1536:])}, tmp / "data.pt")
    srv.wait_ready()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory) -> tuple[Path, float]:
    """The uninterrupted run (its output directory) and its wall time in seconds."""
    job = tmp_path_factory.mktemp("reference")
    t0 = time.perf_counter()
    assert server.run(job, resume=False) == 0
    seconds = time.perf_counter() - t0
    plan = rmtkd.saving.read_plan(job / "out")
    assert [h["status"] for h in plan["history"]] == ["applied"] * 3   # every step reduces
    return job / "out", seconds


def _assert_same_model(out: Path, ref: Path) -> None:
    """Bitwise the same weights and the same plan (reductions and step history)."""
    a, b = rmtkd.load(out).state_dict(), rmtkd.load(ref).state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), f"{k} differs"
    pa, pb = rmtkd.saving.read_plan(out), rmtkd.saving.read_plan(ref)
    assert pa["reductions"] == pb["reductions"]
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(pa["history"]) == strip(pb["history"])


def _latest(job: Path) -> str:
    return (job / "ckpt" / LATEST).read_text().strip()


def _temporaries(job: Path) -> list[Path]:
    return sorted((job / "ckpt").glob(".step-*.tmp-*"))


def test_random_kills_resume_to_the_same_model(server, reference, tmp_path):
    """SIGKILL after 4+ seeded random delays (whatever the job is doing), resume each time;
    a chain that completes is checked and a new one starts."""
    ref, seconds = reference
    rng = random.Random(1234)
    job, landed, finished = tmp_path / "chain-0", 0, 0
    for attempt in range(10):
        if landed >= 4:
            break
        server.start(job, resume=True)
        time.sleep(rng.uniform(0.05, 0.75) * seconds)
        if server.finish("kill") == -signal.SIGKILL:
            landed += 1
            assert not (job / "out").exists()
        else:   # the job finished before the kill: check it, start a new chain
            _assert_same_model(job / "out", ref)
            finished += 1
            job = tmp_path / f"chain-{attempt + 1}"
    print(f"random kills: {landed} landed, {finished} chains finished in between "
          f"(uninterrupted run {seconds:.2f} s)")
    assert landed >= 2, f"only {landed} kills hit a running job"
    if not (job / "out").exists():
        assert server.run(job, resume=True) == 0
    _assert_same_model(job / "out", ref)


# (kill point, what the checkpoint directory must look like after the kill). The job has 3
# steps; each run after the first resumes from LATEST. A checkpoint write (rmtkd.checkpoint.
# write_checkpoint): tensors.safetensors (safetensors.torch.save_file) and state.json
# (write_atomic) into a temporary directory, MANIFEST.json (write_manifest), the rename to
# step-NNNN, LATEST (write_atomic), then the older checkpoints are removed.
TARGETED = [
    # the 29th accumulator update: step 1's calibration (24 batches per step)
    ("rmtkd.ops.covariance.CovarianceAccumulator.update:29:before",
     lambda job: _latest(job) == "step-0001"),
    # step 1 again (resumed), its distillation
    ("rmtkd.distill.trainer.kd_loss:10:before", lambda job: _latest(job) == "step-0001"),
    # step 1's checkpoint: tensors written into the temporary directory, no state.json yet
    ("safetensors.torch.save_file:1:after",
     lambda job: _latest(job) == "step-0001" and len(_temporaries(job)) == 1
     and (_temporaries(job)[0] / TENSORS).is_file()
     and not (_temporaries(job)[0] / STATE).exists()),
    # state.json written, no manifest
    ("rmtkd.checkpoint.write_manifest:1:before",
     lambda job: _latest(job) == "step-0001" and any(
         (t / STATE).is_file() and not (t / MANIFEST).exists() for t in _temporaries(job))),
    # manifest written, not renamed into place
    ("rmtkd.checkpoint.write_manifest:1:after",
     lambda job: _latest(job) == "step-0001" and any(
         (t / MANIFEST).is_file() for t in _temporaries(job))),
    # renamed to step-0002, LATEST still names step-0001
    ("pathlib.Path.rename:1:after",
     lambda job: _latest(job) == "step-0001" and (job / "ckpt" / "step-0002").is_dir()),
    # LATEST names step-0002 (the 2nd write_atomic: state.json, LATEST), step-0001 not
    # removed yet
    ("rmtkd.checkpoint.write_atomic:2:after",
     lambda job: _latest(job) == "step-0002" and (job / "ckpt" / "step-0001").is_dir()),
    # the last step's checkpoint (step-0003, finished), half written
    ("safetensors.torch.save_file:1:after", lambda job: _latest(job) == "step-0002"),
]


def test_targeted_kills_resume_to_the_same_model(server, reference, tmp_path):
    """SIGKILL during calibration, during distillation and at every stage of a checkpoint
    write, resuming after each, ends with the uninterrupted run's model."""
    job = tmp_path / "job"
    for i, (kill, check) in enumerate(TARGETED):
        assert server.run(job, kill=kill, resume=i > 0) == -signal.SIGKILL, kill
        assert not (job / "out").exists()
        assert check(job), (kill, sorted(p.name for p in (job / "ckpt").iterdir()))
    assert server.run(job, resume=True) == 0
    _assert_same_model(job / "out", reference[0])


# ----------------------------------------------------------------- damaged checkpoints


@pytest.fixture
def checkpoint(tmp_path) -> tuple[Path, nn.Module]:
    """Two checkpoints of an MLP's weights (``model/<name>`` tensors), as the whole-model
    strategy writes them; the second is the newest."""
    torch.manual_seed(0)
    model = _mlp()
    root = tmp_path / "ck"
    for step in (1, 2):
        tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
        write_checkpoint(root, {"next_step": step, "plan": [], "history": [],
                                "finished": False, "note": f"step {step}"}, tensors, step=step)
    return root, model


def _flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def _nothing_parsed_unverified(monkeypatch) -> list[str]:
    """Record every checkpoint file that is parsed (``Path.read_text``: LATEST, the manifest,
    state.json; ``safetensors.torch.load_file``: the tensors) and forbid unpickling; returns
    the list of parsed file names. The checksums read the bytes through ``open`` (not
    recorded: hashing is the check itself)."""
    import pathlib

    import safetensors.torch

    parsed: list[str] = []
    real_read_text, real_load_file = pathlib.Path.read_text, safetensors.torch.load_file

    def read_text(self, *a, **k):
        parsed.append(self.name)
        return real_read_text(self, *a, **k)

    def load_file(path, *a, **k):
        parsed.append(Path(path).name)
        return real_load_file(path, *a, **k)

    def boom(*a, **k):
        raise AssertionError("a checkpoint was unpickled")

    monkeypatch.setattr(pathlib.Path, "read_text", read_text)
    monkeypatch.setattr(safetensors.torch, "load_file", load_file)
    monkeypatch.setattr(torch, "load", boom)
    return parsed


def test_intact_checkpoint_loads(checkpoint, monkeypatch):
    root, model = checkpoint
    assert (root / LATEST).read_text() == "step-0002"
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step-0002"]
    files = verify_manifest(root / "step-0002")
    assert set(files) == {STATE, TENSORS}
    parsed = _nothing_parsed_unverified(monkeypatch)
    state, tensors = load_checkpoint(root)
    assert parsed == [LATEST, MANIFEST, STATE, TENSORS]   # the manifest checked first
    assert state["note"] == "step 2" and state["next_step"] == 2
    ref = model.state_dict()
    got = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    assert {k for k in tensors if not k.startswith("model/")} == {
        "rng/torch", "rng/numpy", "rng/python"}


def test_a_second_checkpoint_at_the_live_step_gets_its_own_name(checkpoint, monkeypatch):
    """The checkpoint LATEST names is never deleted to make room for one at the same step
    (a kill in between would leave no checkpoint): the new one takes another name, and
    the old one goes only once LATEST names the new one."""
    import rmtkd.checkpoint as CK

    root, _ = checkpoint
    real_rmtree, real_write = CK.shutil.rmtree, CK.write_atomic
    events = []
    monkeypatch.setattr(CK.shutil, "rmtree", lambda p, *a, **k: (
        events.append(("rm", Path(p).name)), real_rmtree(p, *a, **k)))
    monkeypatch.setattr(CK, "write_atomic", lambda p, data: (
        events.append(("latest", data.decode())) if Path(p).name == LATEST else None,
        real_write(p, data)))
    for n, (old, new) in enumerate([("step-0002", "step-0002.1"),
                                     ("step-0002.1", "step-0002")]):
        events.clear()
        write_checkpoint(root, {"note": f"again {n}"}, {}, step=2)
        assert events == [("latest", new), ("rm", old)]
        assert load_checkpoint(root)[0]["note"] == f"again {n}"
        assert sorted(p.name for p in root.iterdir()) == [LATEST, new]


def test_rng_states_are_restored(checkpoint):
    """load_checkpoint restores the torch / NumPy / Python RNG states of the write."""
    import numpy as np

    root, model = checkpoint
    torch.manual_seed(11), np.random.seed(11), random.seed(11)
    write_checkpoint(root, {"note": "rng"}, {}, step=3)
    expect = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    load_checkpoint(root, restore_rng=False)
    assert not torch.equal(torch.rand(3), expect[0])
    load_checkpoint(root)
    assert torch.equal(torch.rand(3), expect[0])
    assert (np.random.rand(3) == expect[1]).all() and random.random() == expect[2]


@pytest.mark.parametrize("name", [STATE, TENSORS])
def test_flipped_byte_is_detected_before_reading(checkpoint, monkeypatch, name):
    root, _ = checkpoint
    _flip_byte(root / "step-0002" / name)
    parsed = _nothing_parsed_unverified(monkeypatch)
    with pytest.raises(CorruptCheckpointError, match=f"{name} fails its checksum") as e:
        load_checkpoint(root)
    assert parsed == [LATEST, MANIFEST]   # neither state.json nor the tensors were read
    assert e.value.path == root / "step-0002" / name
    assert e.value.checkpoint_dir == root
    assert "Delete the checkpoint directory" in str(e.value) and str(root) in str(e.value)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("name", [STATE, TENSORS])
def test_truncated_file_is_detected(checkpoint, monkeypatch, name):
    root, _ = checkpoint
    path = root / "step-0002" / name
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 3)
    parsed = _nothing_parsed_unverified(monkeypatch)
    with pytest.raises(CorruptCheckpointError, match=rf"{name} has {size // 3:,} bytes, "
                       rf"{MANIFEST} says {size:,} \(truncated\)"):
        load_checkpoint(root)
    assert STATE not in parsed and TENSORS not in parsed


def test_missing_unlisted_and_manifest_damage(checkpoint, monkeypatch):
    root, _ = checkpoint
    ck = root / "step-0002"
    parsed = _nothing_parsed_unverified(monkeypatch)
    (ck / "model.pt").write_bytes(b"not from the writer")   # a planted file is refused
    with pytest.raises(CorruptCheckpointError, match="model.pt is not listed"):
        load_checkpoint(root)
    (ck / "model.pt").unlink()
    (ck / STATE).rename(root / "state.json.bak")
    with pytest.raises(CorruptCheckpointError, match=f"{STATE} is missing"):
        load_checkpoint(root)
    (root / "state.json.bak").rename(ck / STATE)
    manifest = (ck / MANIFEST).read_text()
    (ck / MANIFEST).write_text(manifest[: len(manifest) // 2])
    with pytest.raises(CorruptCheckpointError, match=f"{MANIFEST} is unreadable"):
        load_checkpoint(root)
    (ck / MANIFEST).unlink()
    with pytest.raises(CorruptCheckpointError, match=f"{MANIFEST} is missing"):
        load_checkpoint(root)
    assert STATE not in parsed and TENSORS not in parsed


def test_external_files_are_checked(tmp_path):
    """Files outside the step directory listed as external (the block-wise path's shards
    and states) are verified too; a change to one is reported by name."""
    root = tmp_path / "ck"
    root.mkdir()
    shard = tmp_path / "shard.bin"
    shard.write_bytes(b"0123456789")
    write_checkpoint(root, {"n": 1}, {}, step=1,
                     external={"../shard.bin": file_entry(shard)})
    assert load_checkpoint(root)[0]["n"] == 1
    _flip_byte(shard)
    with pytest.raises(CorruptCheckpointError, match="shard.bin fails its checksum") as e:
        load_checkpoint(root)
    assert e.value.path.resolve() == shard.resolve()
    shard.unlink()
    with pytest.raises(CorruptCheckpointError, match="shard.bin is missing"):
        load_checkpoint(root)


def test_tensors_sharing_memory_are_saved(tmp_path):
    """Tied weights (one tensor under two names) and a reduction basis that is a view of a
    fit's eigenvectors share memory; safetensors refuses such tensors unless copied."""
    w = torch.randn(6, 4)
    tensors = {"model/embed.weight": w, "model/lm_head.weight": w, "plan/0/basis": w[:3],
               "fits/s/eigenvectors": w}
    write_checkpoint(tmp_path / "ck", {"n": 1}, tensors, step=1)
    _, got = load_checkpoint(tmp_path / "ck", restore_rng=False)
    assert all(torch.equal(got[k], v) for k, v in tensors.items())


def test_dangling_latest(checkpoint, monkeypatch):
    root, _ = checkpoint
    (root / LATEST).write_text("step-0007")
    parsed = _nothing_parsed_unverified(monkeypatch)
    with pytest.raises(CorruptCheckpointError, match="names the checkpoint 'step-0007', which "
                       "does not exist") as e:
        load_checkpoint(root)
    assert e.value.path == root / LATEST
    assert parsed == [LATEST]
    assert load_checkpoint(root.parent / "nothing-here") is None


def test_manifest_helpers_on_any_directory(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "sub" / "b.txt").write_text("hello")
    write_manifest(tmp_path)
    files = verify_manifest(tmp_path)
    import hashlib
    assert files == {"a.bin": {"size": 3, "sha256": hashlib.sha256(b"abc").hexdigest()},
                     "sub/b.txt": {"size": 5, "sha256": hashlib.sha256(b"hello").hexdigest()}}
    (tmp_path / "sub" / "b.txt").write_text("hellO")
    with pytest.raises(CorruptCheckpointError, match="b.txt fails its checksum"):
        verify_manifest(tmp_path)


def _compress_inputs() -> tuple[nn.Module, list, rmtkd.CompressConfig]:
    x, y = _synthetic(n=256)
    torch.manual_seed(0)
    return (_mlp().eval(), list(zip(x.split(64), y.split(64))),
            rmtkd.CompressConfig(progress=False, distill_epochs=0, max_steps=1,
                                 calib_fraction=1.0))


def test_compress_resume_refuses_a_damaged_checkpoint(tmp_path):
    model, data, cfg = _compress_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rmtkd.compress(model, data, config=cfg, checkpoint_dir=tmp_path / "ckpt")
    _flip_byte(tmp_path / "ckpt" / _latest(tmp_path) / STATE, offset=100)
    with pytest.raises(CorruptCheckpointError, match=f"{STATE} fails its checksum"):
        rmtkd.compress(model, data, config=cfg, checkpoint_dir=tmp_path / "ckpt", resume=True)


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)   # a tiny model: more threads only contend
    yield
    torch.set_num_threads(old)


@pytest.mark.usefixtures("one_thread")
def test_compress_checkpoint_holds_no_pickle_and_resume_never_unpickles(tmp_path,
                                                                        monkeypatch):
    """The whole-model checkpoint is JSON + safetensors: no file starts with the pickle
    protocol byte 0x80 or is a torch.save zip archive; resuming rebuilds the model by
    replaying the recorded reductions on a copy of the original (torch.load and pickle are
    never called) and ends with the uninterrupted run's model."""
    import pickle

    import rmtkd.engine.whole as whole

    x, y = _synthetic(n=256)
    data = list(zip(x.split(64), y.split(64)))
    torch.manual_seed(0)
    model = _mlp().eval()
    cfg = rmtkd.CompressConfig(progress=False, distill_epochs=1, distill_min_steps=8,
                               warmup_steps=2, calib_fraction=1.0, epsilon=100.0, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = rmtkd.compress(model, data, config=cfg)
        real, calls = whole.collect_statistics, [0]

        def stop_at_step_3(*a, **k):   # the third step's calibration
            calls[0] += 1
            if calls[0] == 3:
                raise KeyboardInterrupt("stopped")
            return real(*a, **k)

        monkeypatch.setattr(whole, "collect_statistics", stop_at_step_3)
        ck = tmp_path / "ckpt"
        with pytest.raises(KeyboardInterrupt):
            rmtkd.compress(model, data, config=cfg, checkpoint_dir=ck)
        monkeypatch.setattr(whole, "collect_statistics", real)
        files = sorted(p for p in ck.rglob("*") if p.is_file())
        assert sorted(p.relative_to(ck).as_posix() for p in files) == [
            LATEST, f"step-0002/{MANIFEST}", f"step-0002/{STATE}", f"step-0002/{TENSORS}"]
        for p in files:
            head = p.read_bytes()[:4]
            assert head[:1] != b"\x80" and head != b"PK\x03\x04", p
        state, tensors = load_checkpoint(ck, restore_rng=False)
        assert state["next_step"] == 2 and len(state["history"]) == 2
        # the weights of the model after 2 width cuts (same names, fewer features), and the
        # two reductions' tensors
        weights = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
        assert set(weights) == set(model.state_dict())
        assert sum(v.numel() for v in weights.values()) < sum(
            v.numel() for v in model.state_dict().values())
        assert {k.split("/")[1] for k in tensors if k.startswith("plan/")} == {"0", "1"}

        def boom(*a, **k):
            raise AssertionError("a checkpoint was unpickled")

        for owner, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
            monkeypatch.setattr(owner, name, boom)
        res = rmtkd.compress(model, data, config=cfg, checkpoint_dir=ck, resume=True)
    a, b = res.model.state_dict(), ref.model.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda h: [{k: v for k, v in r.to_dict().items() if k != "seconds"}  # noqa: E731
                       for r in h]
    assert strip(res.history) == strip(ref.history)
    assert res.final_params == ref.final_params < ref.original_params


def test_cli_resume_reports_a_damaged_checkpoint(tmp_path, capsys):
    from rmtkd.cli import main

    model, data, cfg = _compress_inputs()
    torch.save(model, tmp_path / "model.pt")
    x, y = _synthetic(n=256)
    torch.save({"train": (x, y)}, tmp_path / "data.pt")
    out = tmp_path / "out"
    steps = tmp_path / ".out.checkpoint" / "steps"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rmtkd.compress(model, data, config=cfg, checkpoint_dir=steps)
    path = steps / (steps / LATEST).read_text() / TENSORS
    _flip_byte(path)
    with pytest.raises(SystemExit) as e:
        main(["compress", "--model", str(tmp_path / "model.pt"), "--data",
              str(tmp_path / "data.pt"), "--out", str(out), "--quiet", "--resume"])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert err.startswith("rmtkd: error: damaged checkpoint:")
    assert f"{path} fails its checksum" in err and "without --resume" in err
    assert not out.exists()


# ------------------------------------------------------------------ out of memory


# 2**24 features: one float64 d x d matrix is 2**51 bytes (2.25 PB), beyond any 64-bit
# process's address space (128 TiB), so the allocation fails even where memory is
# overcommitted (a 32 TB one can succeed there and be OOM-killed while zero-filled).
HUGE = 1 << 24


def test_cpu_accumulator_too_large_is_reported():
    from rmtkd.ops.covariance import CovarianceAccumulator, accumulator_bytes

    with pytest.raises(rmtkd.AccumulatorMemoryError) as e:
        CovarianceAccumulator(HUGE, acc_dtype=torch.float64)
    err = e.value
    cause = err.__cause__
    assert isinstance(cause, RuntimeError) and "can't allocate memory" in str(cause)
    assert isinstance(err, MemoryError)
    need = HUGE * HUGE * 8 * 2
    assert err.bytes_needed == need == accumulator_bytes(HUGE, torch.float64)
    msg = str(err)
    assert f"d = {HUGE:,}" in msg and f"{need:,} bytes" in msg and "4503.6 TB" in msg
    assert "float32 instead of float64" in msg and "--acc-dtype float32" in msg
    assert "fewer sites at once" in msg and "--sites" in msg
    # float32: the dtype option is not offered (it is already the smaller one)
    with pytest.raises(rmtkd.AccumulatorMemoryError) as e32:
        CovarianceAccumulator(HUGE, acc_dtype=torch.float32)
    assert e32.value.bytes_needed == need // 2 and "instead of float64" not in str(e32.value)


class _Wide(nn.Module):
    """Linear sites of 6 and HUGE features; the huge one is never run (only its width)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)


def test_site_accumulator_too_large_names_the_site():
    from rmtkd.capture import Site, collect_statistics

    model = _Wide()
    sites = [Site(name="b:input", module_name="b", kind="linear", dim=6, where="input"),
             Site(name="a:huge", module_name="a", kind="linear", dim=HUGE, where="input")]
    with pytest.raises(rmtkd.AccumulatorMemoryError) as e:
        collect_statistics(model, [torch.randn(8, 4)], sites, acc_dtype=torch.float64,
                           progress=False)
    msg = str(e.value)
    assert e.value.site == "a:huge" and "of site 'a:huge'" in msg
    assert "the 2 sites calibrated at once need" in msg


def test_cuda_out_of_memory_is_reported(monkeypatch):
    """A CUDA OOM while updating (simulated: no GPU here) names the site and offers the
    CPU; the accumulator state is unchanged."""
    import rmtkd.ops.covariance as cov
    from rmtkd.capture import collect_statistics, find_sites

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    batch = torch.randn(8, 4)
    sites = find_sites(model, batch)
    monkeypatch.setattr(cov, "_shifted_gram_cpu", oom)
    monkeypatch.setattr(cov, "_shifted_gram_matmul", oom)
    with pytest.raises(rmtkd.AccumulatorMemoryError) as e:
        collect_statistics(model, [batch], sites, progress=False)
    msg = str(e.value)
    assert f"updating the covariance accumulator of site {sites[0].name!r}" in msg
    assert "(d = 16, float32)" in msg and f"{16 * 16 * 4 * 2:,} bytes" in msg
    assert isinstance(e.value.__cause__, torch.cuda.OutOfMemoryError)
    # on a GPU: the CPU is offered; simulated by an allocation failing on device "cuda"
    monkeypatch.setattr(cov, "_new_state", oom)
    with pytest.raises(rmtkd.AccumulatorMemoryError) as e:
        cov.CovarianceAccumulator(30_000, acc_dtype=torch.float64, device="cuda")
    msg = str(e.value)
    assert "out of memory on cuda allocating" in msg and "accumulate on the CPU" in msg
    assert "float32 instead of float64" in msg and "--sites" in msg
    assert "(torch: OutOfMemoryError: CUDA out of memory" in msg


def test_cli_prints_the_memory_error(monkeypatch, capsys):
    import rmtkd.cli as cli
    from rmtkd.ops.covariance import AccumulatorMemoryError

    def fail(args):
        raise AccumulatorMemoryError(dim=HUGE, acc_dtype=torch.float64, device="cpu",
                                     site="fc:input")
    monkeypatch.setattr(cli, "_run_analyze", fail)
    with pytest.raises(SystemExit) as e:
        cli.main(["analyze", "--example", "digits-mlp"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("rmtkd: error: out of memory on cpu allocating the covariance "
                          "accumulator of site 'fc:input'")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_cuda_out_of_memory():
    from rmtkd.ops.covariance import CovarianceAccumulator

    free, _ = torch.cuda.mem_get_info()
    d = int((4 * free / 8) ** 0.5)   # one float64 d x d matrix: 4x the free memory
    with pytest.raises(rmtkd.AccumulatorMemoryError, match="accumulate on the CPU") as e:
        CovarianceAccumulator(d, acc_dtype=torch.float64, device="cuda")
    assert isinstance(e.value.__cause__, torch.cuda.OutOfMemoryError)


# ------------------------------------------------------------------------- n < d


def _low_rank_site_data(n: int = 40, d: int = 64, spikes: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    signal_dirs = torch.linalg.qr(torch.randn(d, spikes, generator=g, dtype=torch.float64))[0]
    z = torch.randn(n, spikes, generator=g, dtype=torch.float64) * 6.0
    return z @ signal_dirs.T + torch.randn(n, d, generator=g, dtype=torch.float64)


def _rotation_then(head: nn.Linear) -> nn.Sequential:
    """An orthogonal 64 x 64 layer (keeps the input's spectrum) feeding ``head``: the site
    is ``head``'s input, the rotated data (all 64 features live)."""
    torch.manual_seed(0)
    rot = nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        rot.weight.copy_(torch.linalg.qr(torch.randn(64, 64))[0])
    return nn.Sequential(rot, head).eval()


def test_small_calibration_is_fitted_and_reported(tmp_path):
    """d = 64 features calibrated on n = 40 samples: MP with gamma = 1.6, the atom at 0;
    the fit returns k and analyze warns and reports gamma."""
    from rmtkd.analysis import analyze_model
    from rmtkd.report import write_analysis_report

    x = _low_rank_site_data().float()
    model = _rotation_then(nn.Linear(64, 8))
    with pytest.warns(rmtkd.SmallSampleWarning) as rec:
        fits = analyze_model(model, list(x.split(16)), progress=False)
    (name, fit), = fits.items()
    assert (fit.d, fit.n) == (64, 40) and fit.gamma == pytest.approx(1.6)
    assert fit.k == 3   # the 3 planted directions, above the MP edge for gamma = 1.6
    assert fit.lambda_minus == pytest.approx(fit.sigma2 * (1 - 1.6 ** 0.5) ** 2)
    assert int((fit.eigenvalues < 1e-6 * fit.eigenvalues[0]).sum()) >= 64 - 40   # the atom
    msg = str(rec[0].message)
    assert f"site {name!r}" in msg and "n = 40" in msg and "d = 64" in msg
    assert "gamma = d/n = 1.6" in msg
    out = write_analysis_report(tmp_path / "report", fits, meta={})
    report = json.loads((out / "report.json").read_text())
    assert report["sites"][name]["warning"] == msg and report["warnings"] == [msg]
    assert "gamma = d/n = 1.6" in (out / "index.md").read_text()


def test_large_calibration_gives_no_warning():
    from rmtkd.analysis import analyze_model

    x = _low_rank_site_data(n=200).float()
    model = _rotation_then(nn.Linear(64, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", rmtkd.SmallSampleWarning)
        fit, = analyze_model(model, list(x.split(50)), progress=False).values()
    assert fit.gamma == pytest.approx(64 / 200) and fit.k == 3


def test_compress_records_gamma_and_warns():
    x = _low_rank_site_data().float()
    y = (x[:, :4].sum(1) > 0).long()
    model = _rotation_then(nn.Linear(64, 2))
    cfg = rmtkd.CompressConfig(progress=False, distill_epochs=0, calib_fraction=1.0,
                               epsilon=100.0)
    with pytest.warns(rmtkd.SmallSampleWarning, match=r"n = 40 .*\(gamma = d/n = 1\.6"):
        res = rmtkd.compress(model, list(zip(x.split(20), y.split(20))), config=cfg)
    rec, = res.history
    assert rec.gamma == res.fits[rec.site].gamma == pytest.approx(1.6)
    assert rec.k == 3
    assert rec.to_dict()["gamma"] == rec.gamma
