"""The NVRTC loader: compiling without a GPU, the disk cache and its safety rules, error reporting,
and (on a GPU) launching on torch's stream inside a CUDA graph."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from pagedinfer import kernels

TRIVIAL = textwrap.dedent("""\
    #include "common.cuh"
    template <int SCALE>
    __global__ void scale_add(float* x, float y, int n) {
      int i = blockIdx.x * blockDim.x + threadIdx.x;
      if (i < n) x[i] = x[i] * SCALE + y;
    }
    """)


@pytest.fixture
def sources(tmp_path, monkeypatch):
    """A private source folder (our common.cuh + a trivial kernel) and a private cache directory."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "common.cuh").write_text((kernels.SOURCE_DIR / "common.cuh").read_text())
    (src / "trivial.cu").write_text(TRIVIAL)
    monkeypatch.setattr(kernels, "SOURCE_DIR", src)
    monkeypatch.setenv("PAGEDINFER_CACHE_DIR", str(tmp_path / "cache"))
    return src


@pytest.fixture
def count_compiles(monkeypatch):
    calls = []
    real = kernels.compile_cubin

    def counting(*args, **kw):
        calls.append(args)
        return real(*args, **kw)
    monkeypatch.setattr(kernels, "compile_cubin", counting)
    return calls


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_compiles_without_a_gpu(sources, arch):
    cubin = kernels.compile_cubin("trivial.cu", "scale_add<3>", arch)
    assert cubin.image[:4] == b"\x7fELF"
    assert cubin.lowered_name.startswith("_Z") and "scale_add" in cubin.lowered_name


def test_disk_cache_hit_and_private_directory(sources, count_compiles, tmp_path):
    first = kernels.cached_cubin("trivial.cu", "scale_add<2>", "sm_90a")
    second = kernels.cached_cubin("trivial.cu", "scale_add<2>", "sm_90a")
    assert len(count_compiles) == 1 and first == second
    cache = tmp_path / "cache"
    assert oct(cache.stat().st_mode & 0o777) == "0o700"
    entries = list(cache.glob("*.cubin"))
    assert len(entries) == 1 and oct(entries[0].stat().st_mode & 0o777) == "0o600"


def test_key_changes_with_source_options_and_arch(sources):
    key = kernels.cache_key("trivial.cu", "scale_add<2>", "sm_90a", None)
    assert key != kernels.cache_key("trivial.cu", "scale_add<3>", "sm_90a", None)
    assert key != kernels.cache_key("trivial.cu", "scale_add<2>", "sm_80", None)
    assert key != kernels.cache_key("trivial.cu", "scale_add<2>", "sm_90a", {"X": 1})
    (sources / "common.cuh").write_text((sources / "common.cuh").read_text() + "\n// edited\n")
    assert key != kernels.cache_key("trivial.cu", "scale_add<2>", "sm_90a", None)


def test_writable_entry_is_ignored_and_rebuilt(sources, count_compiles, tmp_path):
    kernels.cached_cubin("trivial.cu", "scale_add<2>", "sm_80")
    (entry,) = (tmp_path / "cache").glob("*.cubin")
    entry.chmod(0o666)
    kernels.cached_cubin("trivial.cu", "scale_add<2>", "sm_80")
    assert len(count_compiles) == 2
    assert oct(entry.stat().st_mode & 0o777) == "0o600"  # replaced by a private entry


def test_shared_cache_directory_is_not_used(sources, count_compiles, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o777)
    cache.chmod(0o777)
    kernels.cached_cubin("trivial.cu", "scale_add<2>", "sm_80")
    kernels.cached_cubin("trivial.cu", "scale_add<2>", "sm_80")
    assert len(count_compiles) == 2 and not list(cache.iterdir())


def test_corrupt_entry_is_rebuilt(sources, count_compiles, tmp_path):
    kernels.cached_cubin("trivial.cu", "scale_add<2>", "sm_80")
    (entry,) = (tmp_path / "cache").glob("*.cubin")
    entry.write_bytes(b"garbage")
    cubin = kernels.cached_cubin("trivial.cu", "scale_add<2>", "sm_80")
    assert len(count_compiles) == 2 and cubin.image[:4] == b"\x7fELF"


def test_processes_compiling_at_once_share_one_valid_entry(sources, tmp_path):
    script = ("from pagedinfer import kernels; import pathlib;"
              f"kernels.SOURCE_DIR = pathlib.Path({str(sources)!r});"
              "c = kernels.cached_cubin('trivial.cu', 'scale_add<5>', 'sm_90a'); print(len(c.image))")
    env = dict(os.environ, PAGEDINFER_CACHE_DIR=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    sizes = set()
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        sizes.add(out.strip())
    assert len(sizes) == 1
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1 and entries[0].suffix == ".cubin"  # no temporary files left behind
    assert kernels._read_entry(entries[0]).image[:4] == b"\x7fELF"


def test_compile_error_shows_failing_lines(sources):
    (sources / "broken.cu").write_text('#include "common.cuh"\n__global__ void k(float* x) {\n'
                                       "  x[0] = undefined_name + 1;\n}\n")
    with pytest.raises(kernels.KernelCompileError) as e:
        kernels.compile_cubin("broken.cu", "k", "sm_80")
    msg = str(e.value)
    assert "broken.cu [k] for sm_80" in msg and "undefined_name" in msg
    assert ">>     3 |   x[0] = undefined_name + 1;" in msg


def test_unknown_source_is_a_value_error(sources):
    with pytest.raises(ValueError, match="source: expected one of .*trivial.cu"):
        kernels.compile_cubin("nope.cu", "k", "sm_80")


def test_compile_is_logged_once_with_its_time(sources, caplog):
    with caplog.at_level("INFO", logger="pagedinfer"):
        kernels.log.propagate = True
        try:
            kernels.cached_cubin("trivial.cu", "scale_add<7>", "sm_80")
            kernels.cached_cubin("trivial.cu", "scale_add<7>", "sm_80")
        finally:
            kernels.log.propagate = False
    lines = [r.getMessage() for r in caplog.records if "compiled" in r.getMessage()]
    assert len(lines) == 1 and "trivial.cu [scale_add<7>] for sm_80 in" in lines[0]


@pytest.mark.gpu
def test_launch_on_torch_stream_and_in_a_cuda_graph(sources):
    kernel = kernels.get_kernel("trivial.cu", "scale_add<3>")
    assert kernels.get_kernel("trivial.cu", "scale_add<3>") is kernel  # in-memory cache
    x = torch.randn(1000, device="cuda")
    expect = x * 3 + 1
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        kernel.launch((4,), (256,), (x, np.float32(1.0), np.int32(x.numel())))
    stream.synchronize()
    torch.testing.assert_close(x, expect)

    y = torch.randn(1000, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernel.launch((4,), (256,), (y, np.float32(2.0), np.int32(y.numel())))
    for _ in range(2):
        before = y.clone()
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(y, before * 3 + 2)


@pytest.mark.gpu
def test_device_arch_on_this_gpu():
    major, minor = torch.cuda.get_device_capability()
    arch = kernels.device_arch()
    assert arch.startswith(f"sm_{major}{minor}")
    assert arch.endswith("a") == ((major, minor) == (9, 0))


def test_param_layout_places_each_argument_at_a_multiple_of_its_size():
    fmt, offsets = kernels.param_layout((np.uint64(1), np.int32(2), np.int64(3), np.float32(4.0), np.int32(5)))
    assert offsets == [0, 8, 16, 24, 28]
    assert fmt == "=Qixxxxqfi"


CHAIN = textwrap.dedent("""\
    #include "common.cuh"
    __global__ void add_one(float* x, int n) {
      allow_next_kernel();
      wait_for_previous_kernel();
      for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) x[i] += 1.f;
    }
    """)


@pytest.mark.gpu
def test_programmatic_launches_still_run_in_order(sources, monkeypatch):
    """Kernels launched with programmatic dependent launch (on sm_90+) each see the previous one's writes,
    eagerly and replayed from a CUDA graph."""
    (sources / "chain.cu").write_text(CHAIN)
    monkeypatch.setattr(kernels, "PROGRAMMATIC_SOURCES", ("chain.cu",))
    kernel = kernels.get_kernel("chain.cu", "add_one")
    assert kernel.programmatic == (torch.cuda.get_device_capability()[0] >= 9)
    x = torch.zeros(1 << 22, device="cuda")
    for _ in range(50):
        kernel.launch((264,), (256,), (x, np.int32(x.numel())))
    torch.cuda.synchronize()
    assert bool((x == 50).all())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(50):
            kernel.launch((264,), (256,), (x, np.int32(x.numel())))
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    assert bool((x == 150).all())
