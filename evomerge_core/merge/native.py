"""Fused C kernels for task-vector merges on CPU: build, load and call (`cpu_kernels.c`).

The torch path of `kernels` runs about 25 torch ops per chunk, each a round trip through
memory plus dispatch; the C kernels do one pass per step (TIES histogram, TIES bucket, DARE
sums, combine) with the float32 arithmetic in L1-sized blocks. Results are bit-identical to
the torch path (the DARE L1 rescale sums are accumulated in double and may differ in the last
bit of the factor).

The source is compiled once per machine at first use with the system C compiler (`$CC`, else
`cc`; `-O3 -march=native`) into `$EVOMERGE_NATIVE_CACHE` (default
`~/.cache/evomerge/native`), keyed by the source, compiler and CPU, and loaded with ctypes.
`EVOMERGE_NATIVE=0` turns the kernels off. Without a working compiler the merge uses the torch
path (same results, slower) and says so once in the log.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Sequence

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
KEYS = 1 << 15  # bf16 magnitude buckets
FINE = (1 << 16) + 1  # float32 bit patterns that round to one bucket
_ABI = 1
_FLAGS = ("-O3", "-ffp-contract=off", "-fno-strict-aliasing", "-fPIC", "-shared")
_ARCH_FLAGS = (("-march=native",), ())  # tried in order: tuned for this CPU, then generic

_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


class Library:
    """The loaded kernels with their ctypes signatures."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))  # CDLL releases the GIL during calls
        if lib.evomerge_abi() != _ABI:
            raise OSError(f"{path} is a stale build (ABI {lib.evomerge_abi()}, expected {_ABI})")
        # every pointer (tensor data and ctypes arrays alike) is passed as void*
        p, i, i64, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
        lib.evomerge_ties_hist.argtypes = [p, i, p, p, i, i64, i64, p]
        lib.evomerge_ties_hist.restype = None
        lib.evomerge_ties_fine_hist.argtypes = [p, i, p, i, i64, i64, i, p]
        lib.evomerge_ties_fine_hist.restype = None
        lib.evomerge_nth_equal.argtypes = [p, i, p, i, i64, i64, ctypes.c_uint32, i64]
        lib.evomerge_nth_equal.restype = i64
        lib.evomerge_dare_sums.argtypes = [p, i, p, p, i, p, p, p, i64, i64, p, p]
        lib.evomerge_dare_sums.restype = None
        lib.evomerge_tv_combine.argtypes = [p, i, p, p, i, p, p, p, p, p, p, p, p, p, i, i, i, f32, i, f32, i64, i64, p, i]
        lib.evomerge_tv_combine.restype = None
        self.lib = lib
        self.max_models = int(lib.evomerge_max_models())
        self.has_f16 = bool(lib.evomerge_has_f16())


def cache_dir() -> Path:
    """Where compiled kernels are kept ($EVOMERGE_NATIVE_CACHE or ~/.cache/evomerge/native)."""
    env = os.environ.get("EVOMERGE_NATIVE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "evomerge" / "native"


def _cpu_id() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> str | None:
    cc = os.environ.get("CC", "cc")
    return shutil.which(cc)


def _build(cc: str) -> Path:
    """Compile the kernels (or reuse a cached build); raises OSError with the compiler's words."""
    source = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    errors = []
    for arch in _ARCH_FLAGS:
        flags = (*_FLAGS, *arch)
        key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(flags).encode(), _cpu_id().encode()])).hexdigest()[:20]
        target = cache_dir() / f"cpu_kernels-{key}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        logger.info("building the C merge kernels into %s (once per machine and compiler)", target)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            run = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=300)
            if run.returncode == 0:
                os.replace(tmp, target)  # atomic: concurrent workers never load half a file
                return target
            errors.append(f"{cc} {' '.join(flags)}: {run.stderr.strip()[-500:]}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise OSError("; ".join(errors))


def library() -> Library | None:
    """The kernels, built and loaded on first use; None when off or unavailable (logged once)."""
    global _lib, _tried
    if os.environ.get("EVOMERGE_NATIVE", "") == "0":
        return None
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            cc = _compiler()
            if cc is None:
                logger.warning("no C compiler found (set CC); CPU merges use the slower torch kernels")
            else:
                try:
                    _lib = Library(_build(cc))
                except (OSError, subprocess.SubprocessError) as exc:
                    logger.warning("could not build the C merge kernels (%s); CPU merges use the slower torch kernels", exc)
            _tried = True
    return _lib


def usable(device: torch.device, tensors: Sequence[torch.Tensor], out: torch.Tensor) -> Library | None:
    """The kernels if they can run this merge: CPU, contiguous fp32/bf16/fp16, few models."""
    if device.type != "cpu":
        return None
    lib = library()
    if lib is None or len(tensors) - 1 > lib.max_models:
        return None
    for t in (*tensors, out):
        code = _DTYPES.get(t.dtype)
        if code is None or (code == 2 and not lib.has_f16) or not t.is_contiguous():
            return None
    return lib


def dtype_code(t: torch.Tensor) -> int:
    return _DTYPES[t.dtype]


def pointers(tensors: Sequence[torch.Tensor]) -> tuple[ctypes.Array, ctypes.Array]:
    """(void* array, int dtype-code array) of flat contiguous tensors, for the C calls."""
    ptrs = (ctypes.c_void_p * max(1, len(tensors)))(*[t.data_ptr() for t in tensors])
    codes = (ctypes.c_int * max(1, len(tensors)))(*[dtype_code(t) for t in tensors])
    return ptrs, codes
