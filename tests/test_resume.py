"""Resume after kill -9: a compression job killed at several moments (SIGKILL, in a
subprocess) and resumed from its checkpoint ends with the same model as an uninterrupted
run with the same seed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import rmtkd

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# The driver compresses a saved teacher (cheap, from rmtkd.load) with a checkpoint dir.
# KILL = "none" | "before:N" (SIGKILL as the N-th checkpoint write starts, i.e. after N-1
# finished steps and in the middle of step N's work) | "mid:N" (SIGKILL with the N-th
# checkpoint's files half written, before it is renamed and named in LATEST).
DRIVER = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    import rmtkd, rmtkd.checkpoint as CK
    C = sys.modules["rmtkd.engine.whole"]   # the whole-model strategy
    from rmtkd.examples import digits_mlp_data
    teacher, ckpt, out, kill, resume = sys.argv[1:6]
    how, _, n = kill.partition(":")
    count = [0]
    write_checkpoint, write_manifest = C.write_checkpoint, CK.write_manifest
    def wc(*a, **k):
        count[0] += 1
        if how == "before" and count[0] == int(n):
            os.kill(os.getpid(), signal.SIGKILL)
        return write_checkpoint(*a, **k)
    def wm(*a, **k):   # the step directory is complete but not yet renamed into place
        r = write_manifest(*a, **k)
        if how == "mid" and count[0] == int(n):
            os.kill(os.getpid(), signal.SIGKILL)
        return r
    C.write_checkpoint, CK.write_manifest = wc, wm
    train, _, evals = digits_mlp_data(seed=0)
    cfg = rmtkd.CompressConfig(seed=3, progress=False, distill_epochs=1, warmup_steps=5,
                               epsilon=100.0)
    res = rmtkd.compress(rmtkd.load(teacher), train, eval_data=evals, config=cfg,
                         checkpoint_dir=ckpt, resume=resume == "1")
    rmtkd.save(res, out)
""")


def _drive(tmp: Path, teacher: Path, ckpt: Path, out: Path, kill: str, resume: bool
           ) -> subprocess.CompletedProcess:
    script = tmp / "driver.py"
    script.write_text(DRIVER)
    return subprocess.run([sys.executable, str(script), str(teacher), str(ckpt), str(out),
                           kill, "1" if resume else "0"], env=ENV, capture_output=True,
                          text=True, timeout=120)


def _state(path: Path) -> dict[str, torch.Tensor]:
    return rmtkd.load(path).state_dict()


def _assert_same(a: Path, b: Path) -> None:
    sa, sb = _state(a), _state(b)
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k], sb[k]), f"{k} differs after resume"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    from rmtkd.examples import train_digits_mlp

    model, _ = train_digits_mlp(seed=0, epochs=4, progress=False)
    path = tmp_path_factory.mktemp("teacher") / "teacher"
    rmtkd.save(model, path)
    return path


@pytest.fixture(scope="module")
def reference(teacher, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ref")
    r = _drive(tmp, teacher, tmp / "ckpt", tmp / "out", "none", False)
    assert r.returncode == 0, r.stderr
    return tmp / "out"


@pytest.mark.parametrize("kill", ["before:2", "mid:2"])
def test_killed_and_resumed_matches_uninterrupted(teacher, reference, tmp_path, kill):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    r = _drive(tmp_path, teacher, ckpt, out, kill, False)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    assert not out.exists()
    r = _drive(tmp_path, teacher, ckpt, out, "none", True)
    assert r.returncode == 0, r.stderr
    _assert_same(out, reference)
    plan = rmtkd.saving.read_plan(out)
    assert [h["site"] for h in plan["history"]] == [
        h["site"] for h in rmtkd.saving.read_plan(reference)["history"]]


def test_resume_with_other_config_is_refused(teacher, tmp_path):
    from rmtkd.examples import digits_mlp_data

    train, _, evals = digits_mlp_data(seed=0)
    cfg = rmtkd.CompressConfig(seed=3, progress=False, distill_epochs=0, max_steps=1)
    rmtkd.compress(rmtkd.load(teacher), train, eval_data=evals, config=cfg,
                   checkpoint_dir=tmp_path / "ck")
    assert (tmp_path / "ck" / "LATEST").is_file()
    cfg2 = rmtkd.CompressConfig(seed=4, progress=False, distill_epochs=0, max_steps=1)
    with pytest.raises(ValueError, match="different config.*seed"):
        rmtkd.compress(rmtkd.load(teacher), train, eval_data=evals, config=cfg2,
                       checkpoint_dir=tmp_path / "ck", resume=True)


def _cli(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rmtkd.cli", "compress", "--example", "digits-mlp",
            "--quiet", "--out", str(out), *extra]


@pytest.mark.slow
def test_cli_kill_and_resume(tmp_path):
    """`rmtkd compress` killed with SIGKILL once its checkpoint exists, then `--resume`."""
    full = tmp_path / "full"
    r = subprocess.run(_cli(full), env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / ".full.checkpoint").exists()

    out = tmp_path / "job"
    ckpt = tmp_path / ".job.checkpoint"
    proc = subprocess.Popen(_cli(out), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while not (ckpt / "job.json").exists() and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL) if killed else None
    proc.wait(timeout=30)
    if killed:
        assert not out.exists()
        assert (ckpt / "teacher" / "plan.json").is_file()
        r = subprocess.run(_cli(out, "--resume"), env=ENV, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
    a = rmtkd.load(full / "model").state_dict()
    b = rmtkd.load(out / "model").state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not ckpt.exists()
