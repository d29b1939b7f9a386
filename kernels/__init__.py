"""The NVRTC kernel loader: compile, cache, load and launch the CUDA sources beside this file.

We drive NVRTC ourselves (through CuPy's binding) rather than through `cupy.RawModule(code=...)` so that we
can build for sm_90a without a device (the CI compile check), choose the options, and own the disk cache.
CuPy then loads the cubin and launches it on PyTorch's current stream.

Specialisation: a kernel is named by a C++ name expression (`"decode<__nv_bfloat16, 128, 4>"`-style
template arguments) plus optional `-D` defines; each (source, expression, defines, arch) is one cubin.

Disk cache: `$PAGEDINFER_CACHE_DIR`, else `$XDG_CACHE_HOME/pagedinfer`, else `~/.cache/pagedinfer`;
one directory per user created 0700. An entry is named by a hash of the sources, options, name expression,
architecture, NVRTC and library versions; it is written to a temporary file and renamed into place, so
processes compiling at once never read half a file. Its header names what it holds (source, name expression,
architecture, defines), which `pagedinfer info` lists. An entry (or directory) not owned by the user, or
writable by group/others, is ignored and the kernel is rebuilt in memory: the cache is executable code.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
# An entry: this line, the lowered name, its description (`describe`), then the cubin image.
_ENTRY_MAGIC = b"PAGEDINFER-CUBIN-2\n"
_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8

log = logging.getLogger("pagedinfer")


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel; the message holds the compiler log and the failing source lines."""


# ---------------------------------------------------------------------------------------------- sources

# Sources that use instructions of one architecture only (wgmma: sm_90a); the others build for every target.
SOURCE_ARCHS = {"prefill_sm90.cu": ("sm_90a",)}
# Sources whose kernels read and write nothing they depend on before wait_for_previous_kernel() (common.cuh):
# on sm_90 and newer they are launched with programmatic stream serialization, so that each may start while
# the kernel before it finishes (as FlashInfer does on Hopper). PAGEDINFER_PDL=0 turns it off.
PROGRAMMATIC_SOURCES = ("decode.cu", "cache.cu")


def kernel_sources() -> list[str]:
    return sorted(p.name for p in SOURCE_DIR.glob("*.cu"))


def _read_sources(source: str) -> tuple[str, dict[str, str]]:
    """The .cu text and every .cuh beside it (passed to NVRTC as in-memory headers)."""
    path = SOURCE_DIR / source
    if not path.is_file():
        raise ValueError(f"source: expected one of {', '.join(kernel_sources())}, got {source!r}")
    headers = {p.name: p.read_text() for p in sorted(SOURCE_DIR.glob("*.cuh"))}
    return path.read_text(), headers


def _options(arch: str, defines: dict | None) -> list[str]:
    opts = [f"--gpu-architecture={arch}", "-std=c++17", "-default-device"]
    opts += [f"-D{k}={v}" for k, v in sorted((defines or {}).items())]
    if os.environ.get("PAGEDINFER_LINEINFO", "0") not in ("", "0"):
        opts.append("-lineinfo")  # source lines in compute-sanitizer and ncu reports
    return opts


# ---------------------------------------------------------------------------------------------- compile

@dataclass(frozen=True)
class Cubin:
    image: bytes
    lowered_name: str


def _nvrtc():
    from cupy_backends.cuda.libs import nvrtc
    return nvrtc


def describe(source: str, name_expression: str, arch: str, defines: dict | None = None) -> str:
    """One line naming a specialisation: `decode.cu [decode<...>] for sm_90a -DX=1`."""
    text = f"{source} [{name_expression}] for {arch}"
    text += "".join(f" -D{k}={v}" for k, v in sorted((defines or {}).items()))
    return text.replace("\n", " ")  # one line: the entry header is line-delimited


def _format_compile_error(log_text: str, source: str, text: str, headers: dict[str, str], what: str) -> str:
    files = {source: text, **headers}
    lines = [f"NVRTC failed to compile {what}", log_text.rstrip(), ""]
    shown = set()
    for name, line_no in re.findall(r"^(\S+?)\((\d+)\): (?:catastrophic )?error", log_text, re.M):
        name = os.path.basename(name)
        line_no = int(line_no)
        if name not in files or (name, line_no) in shown:
            continue
        shown.add((name, line_no))
        src_lines = files[name].splitlines()
        lines.append(f"--- {name}:{line_no}")
        for i in range(max(1, line_no - 2), min(len(src_lines), line_no + 2) + 1):
            mark = ">>" if i == line_no else "  "
            lines.append(f"{mark} {i:5d} | {src_lines[i - 1]}")
    return "\n".join(lines)


def compile_cubin(source: str, name_expression: str, arch: str, defines: dict | None = None) -> Cubin:
    """Compiles one specialisation to a cubin. Needs no GPU, only NVRTC."""
    nvrtc = _nvrtc()
    text, headers = _read_sources(source)
    what = describe(source, name_expression, arch, defines)
    prog = nvrtc.createProgram(text, source, [h.encode() for h in headers.values()],
                               [n.encode() for n in headers])
    try:
        nvrtc.addNameExpression(prog, name_expression)
        try:
            nvrtc.compileProgram(prog, _options(arch, defines))
        except nvrtc.NVRTCError:
            raise KernelCompileError(
                _format_compile_error(nvrtc.getProgramLog(prog), source, text, headers, what)) from None
        return Cubin(bytes(nvrtc.getCUBIN(prog)), nvrtc.getLoweredName(prog, name_expression))
    finally:
        nvrtc.destroyProgram(prog)


# ---------------------------------------------------------------------------------------------- disk cache

def cache_dir() -> Path:
    env = os.environ.get("PAGEDINFER_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pagedinfer"


def _owned_and_private(st) -> bool:
    return st.st_uid == os.getuid() and not (st.st_mode & 0o022)


def _usable_cache_dir() -> Path | None:
    path = cache_dir()
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not _owned_and_private(os.stat(path)):
            log.warning("pagedinfer: kernel cache %s is not owned by this user or is group/world-writable; "
                        "compiling in memory only", path)
            return None
        return path
    except OSError as e:
        log.warning("pagedinfer: kernel cache %s unusable (%s); compiling in memory only", path, e)
        return None


def cache_key(source: str, name_expression: str, arch: str, defines: dict | None) -> str:
    text, headers = _read_sources(source)
    h = hashlib.sha256()
    from pagedinfer import __version__
    for part in (__version__, str(_nvrtc().getVersion()), arch, name_expression, source, text,
                 *(f"{k}\0{v}" for k, v in sorted(headers.items())), *_options(arch, defines)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:40]


def _read_private(path: Path, size: int = -1) -> bytes | None:
    """The first `size` bytes of a cache file (all with -1); None when it is missing, a link, or not
    private to this user."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not _owned_and_private(os.fstat(f.fileno())):
            log.warning("pagedinfer: ignoring cache entry %s (not owned by this user or writable by others)", path)
            return None
        return f.read(size)


def _entry_fields(data: bytes | None) -> list[bytes]:
    """[lowered name, description, image] of an entry in the current format, else []."""
    if data is None or not data.startswith(_ENTRY_MAGIC):
        return []
    fields = data[len(_ENTRY_MAGIC):].split(b"\n", 2)
    return fields if len(fields) == 3 and fields[2] else []


def _read_entry(path: Path) -> Cubin | None:
    fields = _entry_fields(_read_private(path))
    return Cubin(fields[2], fields[0].decode()) if fields else None


def cached_kernels() -> tuple[list[str], int]:
    """The descriptions of the entries in the disk cache that this library would load, sorted, and the
    number of other entries (older format, corrupt, or not private to this user: rebuilt on use)."""
    directory = cache_dir()
    paths = sorted(directory.glob("*.cubin")) if directory.is_dir() else []
    if paths and not _owned_and_private(os.stat(directory)):  # the loader does not use such a directory
        return [], len(paths)
    names = []
    for path in paths:
        fields = _entry_fields(_read_private(path, 4096))  # the header is a few hundred bytes
        if fields:
            names.append(fields[1].decode(errors="replace"))
    return sorted(names), len(paths) - len(names)


def _write_entry(path: Path, cubin: Cubin, description: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")  # created 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_ENTRY_MAGIC + cubin.lowered_name.encode() + b"\n" + description.encode() + b"\n"
                    + cubin.image)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("pagedinfer: could not write cache entry %s (%s)", path, e)
        try:
            os.unlink(tmp)
        except OSError:
            pass


def cached_cubin(source: str, name_expression: str, arch: str, defines: dict | None = None) -> Cubin:
    """The cubin from the disk cache, compiling (and storing) it on a miss."""
    directory = _usable_cache_dir()
    path = directory / f"{cache_key(source, name_expression, arch, defines)}.cubin" if directory else None
    what = describe(source, name_expression, arch, defines)
    if path is not None:
        hit = _read_entry(path)
        if hit is not None:
            log.debug("pagedinfer: loaded %s from %s", what, path)
            return hit
    t0 = time.perf_counter()
    cubin = compile_cubin(source, name_expression, arch, defines)
    log.info("pagedinfer: compiled %s in %.2f s", what, time.perf_counter() - t0)
    if path is not None:
        _write_entry(path, cubin, what)
    return cubin


def precompile(specs, arch: str, processes: int | None = None, defines: dict | None = None) -> None:
    """Fills the disk cache for many (source, name expression) pairs in parallel processes: NVRTC runs one
    compilation per thread, so a cold cache for a sweep of shapes is built on every core at once."""
    import concurrent.futures
    import multiprocessing
    todo = sorted(set(specs))
    workers = min(len(todo), processes or os.cpu_count() or 1)
    if workers <= 1:
        for source, expression in todo:
            cached_cubin(source, expression, arch, defines)
        return
    ctx = multiprocessing.get_context("spawn")  # no CUDA state is inherited
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        list(pool.map(_precompile_one, [(s, e, arch, defines) for s, e in todo]))


def _precompile_one(job) -> None:
    cached_cubin(*job)


# ---------------------------------------------------------------------------------------------- launch

def device_arch(device_index: int | None = None) -> str:
    """sm_90a on Hopper (wgmma, setmaxnreg); sm_XY for other architectures."""
    import torch
    major, minor = torch.cuda.get_device_capability(device_index)
    if (major, minor) < (8, 0):
        raise RuntimeError(f"pagedinfer needs compute capability 8.0 or newer, this GPU has {major}.{minor}")
    return f"sm_{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")


class Kernel:
    """A loaded kernel; `launch` runs it on PyTorch's current stream (capturable in a CUDA graph).
    `programmatic`: launched with programmatic dependent launch (see PROGRAMMATIC_SOURCES)."""

    def __init__(self, function, name: str, device_index: int, programmatic: bool = False):
        self._function = function
        self.name = name
        self.device_index = device_index
        self.programmatic = programmatic
        self._smem_limit = 0  # dynamic shared memory opted in so far (static + dynamic > 48 KB needs it)
        self._streams = {}
        self._occupancy = {}

    def _stream(self, torch_stream):
        ptr = torch_stream.cuda_stream
        s = self._streams.get(ptr)
        if s is None:
            import cupy
            if hasattr(torch_stream, "__cuda_stream__"):  # the CUDA stream protocol; keeps the stream alive
                s = cupy.cuda.Stream.from_external(torch_stream)
            else:
                s = cupy.cuda.ExternalStream(ptr, self.device_index)
            self._streams[ptr] = s
        return s

    def _allow_shared_memory(self, shared_mem: int) -> None:
        if shared_mem > self._smem_limit:  # static + dynamic above 48 KB needs the opt-in
            from cupy_backends.cuda.api import driver
            driver.funcSetAttribute(self._function.ptr, _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                    shared_mem)
            self._smem_limit = shared_mem

    def max_active_blocks(self, threads: int, shared_mem: int) -> int:
        """CTAs of this kernel that fit on one multiprocessor at once (registers and shared memory); asked
        once per launch shape, since plan() wants it every step."""
        key = (threads, shared_mem)
        if key not in self._occupancy:
            import cupy
            from cupy_backends.cuda.api import driver
            with cupy.cuda.Device(self.device_index):
                self._allow_shared_memory(shared_mem)
                self._occupancy[key] = driver.occupancyMaxActiveBlocksPerMultiprocessor(
                    self._function.ptr, threads, shared_mem)
        return self._occupancy[key]

    def capped_shared_memory(self, shared_mem: int, ctas: int) -> int:
        """Dynamic shared memory of at least `shared_mem` bytes with which at most `ctas` CTAs fit on one
        multiprocessor (the kernel's registers may allow fewer)."""
        import cupy
        runtime = cupy.cuda.runtime
        per_sm = runtime.deviceGetAttribute(runtime.cudaDevAttrMaxSharedMemoryPerMultiprocessor, self.device_index)
        return max(shared_mem, per_sm // (ctas + 1) + 1)  # ctas + 1 of them would need more than the SM has

    def launch(self, grid, block, args, shared_mem: int = 0) -> None:
        """args: tensors (passed as pointers) and numpy scalars (passed by value, their own C type)."""
        self.launch_prepared(tuple(grid), tuple(block), tuple(_as_arg(a) for a in args), shared_mem)

    def launch_prepared(self, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0) -> None:
        """`launch` for arguments that are numpy scalars already (pointers as numpy.uint64): the per-layer
        path, where every microsecond of Python is paid once per layer and step."""
        import torch
        if shared_mem > self._smem_limit:
            self._allow_shared_memory(shared_mem)
        stream = torch.cuda.current_stream(self.device_index)
        try:
            if torch.cuda.current_device() == self.device_index:
                self._launch(grid, block, args, shared_mem, stream)
            else:  # the module lives in its device's context: make that one current for the launch
                import cupy
                with cupy.cuda.Device(self.device_index):
                    self._launch(grid, block, args, shared_mem, stream)
        except Exception as e:
            raise RuntimeError(f"launch of {self.name} failed: grid {grid}, block {block}, "
                               f"{shared_mem} bytes of shared memory: {e}") from e

    def _launch(self, grid: tuple, block: tuple, args: tuple, shared_mem: int, torch_stream) -> None:
        if self.programmatic:
            _launch_programmatic(self._function.ptr, grid, block, args, shared_mem, torch_stream.cuda_stream)
        else:
            self._function(grid, block, args, shared_mem=shared_mem, stream=self._stream(torch_stream))


# ---------------------------------------------------------------------------------------------- programmatic launch
# cuLaunchKernelEx through ctypes: CuPy launches with cuLaunchKernel, which takes no launch attributes. Run once
# per layer and step, so everything but packing the values is built once per argument layout.

_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6
_STRUCT_CODES = {"uint64": "Q", "int64": "q", "uint32": "I", "int32": "i", "float32": "f", "float64": "d"}


def param_layout(args: tuple) -> tuple[str, list[int]]:
    """The struct format (native sizes, explicit padding) that lays kernel arguments out as C does, each at a
    multiple of its size, and the offset of each; args are numpy scalars."""
    fmt, offsets, at = "=", [], 0
    for a in args:
        size = a.dtype.itemsize
        pad = -at % size
        fmt += "x" * pad + _STRUCT_CODES[a.dtype.name]
        at += pad
        offsets.append(at)
        at += size
    return fmt, offsets


_driver = None
_prepared: dict = {}  # argument types -> (packer, parameter block, pointers to each parameter)
_launch_lock = threading.Lock()  # the prepared blocks are shared; a launch copies them before it returns


def _cuda_driver():
    """libcuda's cuLaunchKernelEx and the launch config, its one attribute asking for programmatic
    serialization."""
    global _driver
    if _driver is None:
        import ctypes

        class Attribute(ctypes.Structure):  # CUlaunchAttribute: id, padding, a 64-byte value union
            _fields_ = [("id", ctypes.c_uint), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int),
                        ("rest", ctypes.c_char * 60)]

        class Config(ctypes.Structure):  # CUlaunchConfig
            _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem", ctypes.c_uint),
                        ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(Attribute)),
                        ("num_attrs", ctypes.c_uint)]

        lib = ctypes.CDLL("libcuda.so.1")
        lib.cuLaunchKernelEx.argtypes = [ctypes.POINTER(Config), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        lib.cuLaunchKernelEx.restype = ctypes.c_int
        attribute = Attribute(_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, b"", 1)
        config = Config(attrs=ctypes.pointer(attribute), num_attrs=1)  # the pointer keeps the attribute alive
        _driver = (ctypes, lib, config)
    return _driver


def _prepare(args: tuple):
    import ctypes
    import struct
    fmt, offsets = param_layout(args)
    packer = struct.Struct(fmt)
    block = ctypes.create_string_buffer(max(packer.size, 1))
    base = ctypes.addressof(block)
    return packer, block, (ctypes.c_void_p * len(offsets))(*(base + o for o in offsets))


def _launch_programmatic(function: int, grid: tuple, block: tuple, args: tuple, shared_mem: int, stream: int):
    ctypes, lib, config = _cuda_driver()
    key = tuple(map(type, args))  # numpy scalar types fix the layout (dtype.name costs ~2 us an argument)
    prepared = _prepared.get(key)
    if prepared is None:
        prepared = _prepared[key] = _prepare(args)
    packer, values, params = prepared
    with _launch_lock:
        packer.pack_into(values, 0, *args)
        for i in range(3):
            config.grid[i] = grid[i] if i < len(grid) else 1
            config.block[i] = block[i] if i < len(block) else 1
        config.shared_mem = shared_mem
        config.stream = stream
        status = lib.cuLaunchKernelEx(ctypes.byref(config), function, params, None)
    if status != 0:
        raise RuntimeError(f"cuLaunchKernelEx returned CUresult {status}")


def _as_arg(a):
    import numpy as np
    import torch
    if isinstance(a, torch.Tensor):
        return np.uint64(a.data_ptr())
    if isinstance(a, np.generic):
        return a
    raise TypeError(f"kernel argument: expected a torch.Tensor or a numpy scalar, got {type(a).__name__}")


_loaded: dict[tuple, Kernel] = {}
_lock = threading.Lock()


def get_kernel(source: str, name_expression: str, *, defines: dict | None = None,
               device_index: int | None = None) -> Kernel:
    """The kernel for one specialisation on one device, compiled or read from the caches once."""
    import torch
    if device_index is None:
        device_index = torch.cuda.current_device()
    key = (source, name_expression, tuple(sorted((defines or {}).items())), device_index)
    kernel = _loaded.get(key)
    if kernel is not None:
        return kernel
    with _lock:
        kernel = _loaded.get(key)
        if kernel is None:
            import cupy
            cubin = cached_cubin(source, name_expression, device_arch(device_index), defines)
            with cupy.cuda.Device(device_index):
                module = cupy.cuda.function.Module()
                module.load(cubin.image)
                programmatic = (source in PROGRAMMATIC_SOURCES and os.environ.get("PAGEDINFER_PDL", "1") != "0"
                                and torch.cuda.get_device_capability(device_index)[0] >= 9)
                kernel = Kernel(module.get_function(cubin.lowered_name), name_expression, device_index, programmatic)
            _loaded[key] = kernel
    return kernel


def _visible_compile_log() -> None:
    """Compiling is the one slow thing a user waits on: say so on stderr unless logging is configured."""
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(os.environ.get("PAGEDINFER_LOG_LEVEL", "INFO").upper())
        log.propagate = False


_visible_compile_log()
