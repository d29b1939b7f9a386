"""`pagedinfer` command line: `info` (versions, GPU, kernel cache), `bench` (kernel benchmarks), `demo`."""
from __future__ import annotations

import argparse
import importlib
import sys

# Subcommands whose module (add_arguments(parser), run(args) -> exit code) is imported only when they run, so
# `pagedinfer info` stays quick and a broken optional dependency breaks only its own command.
_MODULE_COMMANDS = {
    "bench": "kernel benchmarks against FlashInfer (or torch): a table, JSON and a PNG plot",
    "demo": "the end-to-end demo",
}


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
    names, others = kernels.cached_kernels()
    for name in names:
        print(f"{'':<{width}}    {name}")
    if others:
        print(f"{'':<{width}}    {others} not listed: older format, or not private to this user (rebuilt on use)")
    return 0


def _run_module(command: str, argv: list[str]) -> int:
    module = importlib.import_module(f"pagedinfer.{command}")
    parser = argparse.ArgumentParser(prog=f"pagedinfer {command}", description=module.__doc__)
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pagedinfer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, GPU, compute capability and the kernel cache")
    for command, text in _MODULE_COMMANDS.items():
        sub.add_parser(command, help=text, add_help=False)  # its module parses the rest, --help included
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return info()
    return _run_module(args.command, rest)


if __name__ == "__main__":
    sys.exit(main())
