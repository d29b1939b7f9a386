"""`pagedinfer info` runs anywhere and names the kernel cache."""
import subprocess
import sys


def test_info_prints_versions_and_cache(tmp_path):
    env = {"PAGEDINFER_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "pagedinfer.cli", "info"], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert "pagedinfer" in out and "torch" in out
    assert f"kernel cache  {tmp_path / 'cache'} (0 compiled kernels" in out
