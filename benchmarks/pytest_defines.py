"""The GPU tests with every kernel compiled under an ab.py variant's defines, to check a variant before it
lands (the fuzz tests' parallel warm-up compiles under them too):
    python3 benchmarks/pytest_defines.py NAME=D1,@VAR:v [pytest arguments, e.g. -kprefill]"""
import sys

import pytest
from ab import parse, use

from pagedinfer import kernels


def main():
    _, defines = parse(sys.argv[1])
    use(defines)
    compiled = {k: v for k, v in defines.items() if not k.startswith("@")}
    warm = kernels.precompile
    kernels.precompile = lambda specs, arch, **kw: warm(specs, arch, defines=compiled, **kw)
    sys.exit(pytest.main(["-m", "gpu", "-q", "-p", "no:cacheprovider", "tests", *sys.argv[2:]]))


if __name__ == "__main__":
    main()
