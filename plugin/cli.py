"""`pagedinfer` command line: `pagedinfer info` (versions, GPU, kernel cache)."""
from __future__ import annotations

import argparse
import sys


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def info() -> int:
    import torch

    import pagedinfer
    from pagedinfer import kernels

    rows = [("pagedinfer", pagedinfer.__version__), ("torch", torch.__version__), ("cupy", _version("cupy"))]
    try:
        rows.append(("nvrtc", ".".join(map(str, kernels._nvrtc().getVersion()))))
    except Exception as e:  # no NVRTC library: say why rather than fail
        rows.append(("nvrtc", f"unavailable ({e.__class__.__name__}: {e})"))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            rows.append((f"gpu {i}", f"{torch.cuda.get_device_name(i)}, compute capability {major}.{minor}"))
        rows.append(("kernel arch", kernels.device_arch()))
    else:
        rows.append(("gpu", "none visible to torch"))
    directory = kernels.cache_dir()
    entries = sorted(directory.glob("*.cubin")) if directory.is_dir() else []
    size = sum(p.stat().st_size for p in entries)
    rows.append(("kernel cache", f"{directory} ({len(entries)} compiled kernels, {size / 1e6:.1f} MB)"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pagedinfer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, GPU, compute capability and the kernel cache")
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    return 2


if __name__ == "__main__":
    sys.exit(main())
