"""The wheel carries everything the package needs; importing rmtkd stays light."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _source_files() -> set[str]:
    """Package files as they must appear in the wheel (csrc/ -> rmtkd/csrc)."""
    want = {str(p.relative_to(ROOT)) for p in (ROOT / "rmtkd").rglob("*.py")}
    for ext in ("*.py", "*.cu", "*.cuh", "*.cpp", "*.h"):
        want |= {f"rmtkd/{p.relative_to(ROOT)}" for p in (ROOT / "csrc").rglob(ext)}
    return {w for w in want if "__pycache__" not in w}


@pytest.mark.slow
def test_wheel_contains_every_package_file(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), "-q"], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PIP_NO_INPUT": "1"})
    assert out.returncode == 0, out.stderr
    wheel = next(tmp_path.glob("rmtkd-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = _source_files() - names
    assert not missing, f"files missing from the wheel: {sorted(missing)}"
    assert any(n.endswith("entry_points.txt") and "dist-info" in n for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "rmtkd = rmtkd.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_import_is_light():
    code = ("import sys, rmtkd; heavy = [m for m in ('triton', 'matplotlib', 'transformers', "
            "'sklearn') if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "", f"import rmtkd pulled in: {out.stdout}"


def test_kernels_importable_as_subpackage():
    import rmtkd.kernels  # noqa: F401
    assert Path(rmtkd.kernels.__file__).parent.name == "kernels"
