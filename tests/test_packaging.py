"""A built wheel carries the kernel sources and imports from a fresh virtual environment."""
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(REPO)],
                   check=True)
    (path,) = out.glob("pagedinfer-*.whl")
    return path


def test_wheel_contains_kernel_sources(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    expected = {f"pagedinfer/kernels/{p.name}" for p in (REPO / "kernels").iterdir() if p.suffix in (".cu", ".cuh")}
    assert expected and expected <= set(names)
    assert any(n.endswith("entry_points.txt") for n in names)


def test_wheel_imports_in_a_fresh_venv(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True)
    code = ("import pagedinfer, pagedinfer.kernels, pagedinfer.adapters;"
            "print(pagedinfer.kernels.SOURCE_DIR, len(pagedinfer.kernels.kernel_sources()))")
    out = subprocess.run([py, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    where, count = out.split()
    assert str(env_dir) in where and int(count) == len(list((REPO / "kernels").glob("*.cu")))
