"""Every kernel source builds with NVRTC for sm_80 and sm_90a (Hopper-only sources for sm_90a), on any machine
(no GPU needed)."""
import importlib

import pytest

from pagedinfer import kernels

# The op modules that launch kernels; each lists its instantiations in SPECIALIZATIONS.
# verify launches decode.cu
OP_MODULES = ["pagedinfer.cache", "pagedinfer.decode", "pagedinfer.plan", "pagedinfer.prefill"]


def all_specializations():
    return [spec for name in OP_MODULES for spec in importlib.import_module(name).SPECIALIZATIONS]


def test_every_source_is_covered():
    covered = {source for source, _ in all_specializations()}
    assert covered == set(kernels.kernel_sources())


def targets():
    return [(source, expression, arch) for source, expression in all_specializations()
            for arch in kernels.SOURCE_ARCHS.get(source, ("sm_80", "sm_90a"))]


@pytest.mark.parametrize("source,expression,arch", targets())
def test_compiles(source, expression, arch):
    cubin = kernels.compile_cubin(source, expression, arch)
    assert cubin.image[:4] == b"\x7fELF" and cubin.lowered_name


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_decode_compiles_with_its_timeline(arch):
    """benchmarks/timeline.py's build of the decode kernels (kernels/timeline.cuh's stamps compiled in)."""
    from pagedinfer.decode import SPECIALIZATIONS
    for source, expression in SPECIALIZATIONS[:2]:
        cubin = kernels.compile_cubin(source, expression, arch, defines={"PAGEDINFER_TIMELINE": 1})
        assert b"timeline" in cubin.image
