"""Issuing a whole GPU transfer from C (native/issue.c), built on first use.

A transfer is several CUDA calls (events, a kernel launch, copies) plus address arithmetic;
from Python they cost tens of microseconds before the first byte moved (measured on the GPU
machines; a 40 MiB chunk moves in ~0.8 ms). The C functions enqueue the same operations with
one call from Python; the plans they read (addresses, events, streams, the compiled kernel,
launch-table rings) are built here once per engine.

The source needs no CUDA headers (the entry points are passed in as function pointers from the
libraries torch and the engines already loaded), so any C compiler builds it. It is compiled
once per source version into a cache folder (``KVDEPOT_CACHE_DIR``, else
``$XDG_CACHE_HOME/kvdepot``, else ``~/.cache/kvdepot``), the way Triton builds its launchers;
without a compiler the engines issue from Python (same operations, slower), and
``KVDEPOT_NATIVE_ISSUE=0`` asks for that.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading

log = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native", "issue.c")
MAX_SCALARS = 8
MAX_EXTRA = 4
N_POINTERS = 5

# What failed, by the code issue.c puts in *failed.
CALLS = {
    1: "cudaEventRecord", 2: "cudaStreamWaitEvent", 3: "cudaMemcpyAsync", 4: "cuLaunchKernel",
    5: "cudaEventQuery", 6: "cudaEventSynchronize", 7: "plan check", 8: "cudaMemcpyBatchAsync",
    9: "malloc",
}
LAUNCH_CALL = 4

_i32, _i64, _vp = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p


class Api(ctypes.Structure):
    _fields_ = [(name, _vp) for name in
                ("record", "wait", "query", "sync", "memcpy", "launch", "clear_error")]


class DmaPlan(ctypes.Structure):
    _fields_ = [
        ("plane_ptr", _vp), ("plane_stride", _vp), ("piece", _i64),
        ("slot_plane_stride", _i64), ("slot_block_stride", _i64), ("arena", _i64),
        ("batch", _vp), ("batch_attrs", _vp), ("batch_has_fail_idx", _i32),
        ("n_planes", _i32), ("bpc", _i32), ("pad", _i32),
    ]


class Kernel(ctypes.Structure):
    _fields_ = [
        ("function", _vp), ("block_threads", ctypes.c_uint32), ("shared_bytes", ctypes.c_uint32),
        ("scalar_size", _i32 * MAX_SCALARS), ("n_extra", _i32),
    ]


class Ring(ctypes.Structure):
    _fields_ = [
        ("host", _vp), ("device", _i64), ("events", _vp), ("in_flight", _vp),
        ("slots", _i32), ("entries", _i32), ("next", _i32), ("pad", _i32),
    ]


class StagedPlan(ctypes.Structure):
    _fields_ = [
        ("kernel", Kernel * 2),
        ("ring", Ring * 2),
        ("cache", _i64),
        ("plane_off", _i64),
        ("plane_stride", _i64),
        ("n_planes", _i32),
        ("bpc", _i32),
        ("unit", _i64),
        ("piece_units", _i64),
        ("tiles", _i64),
        ("slot_bytes", _i64),
        ("arena", _i64),
        ("staging", (_i64 * 2) * 2),
        ("filled", (_vp * 2) * 2),
        ("freed", (_vp * 2) * 2),
        ("kernel_stream", _vp * 2),
        ("copy_stream", _vp * 2),
        ("staging_chunks", _i32),
        ("max_programs", _i32),
        ("used", (ctypes.c_uint8 * 2) * 2),
        ("next", _i32 * 2),
    ]


def _cache_dir() -> str:
    root = os.environ.get("KVDEPOT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kvdepot"
    )
    return os.path.join(root, "native")


def _compile(source: str, target: str) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise OSError("no C compiler (cc/gcc) on PATH")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(target))
    os.close(fd)
    try:
        subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", tmp, source], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(tmp, target)  # atomic: concurrent engines never load a half-written file
    except subprocess.CalledProcessError as exc:
        raise OSError(f"{cc} failed: {exc.stderr.strip()[-500:]}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    for name, struct in (("kvd_sizeof_api", Api), ("kvd_sizeof_dma_plan", DmaPlan),
                         ("kvd_sizeof_staged_plan", StagedPlan)):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_size_t
        if fn() != ctypes.sizeof(struct):
            raise OSError(f"{name}: C says {fn()} bytes, ctypes {ctypes.sizeof(struct)}")
    lib.kvd_dma.restype = ctypes.c_int
    lib.kvd_dma.argtypes = [_vp, _vp, _vp, _vp, _i32, _i32, _vp, _vp, _vp, _vp, _vp, _vp]
    lib.kvd_staged.restype = ctypes.c_int
    lib.kvd_staged.argtypes = [_vp, _vp, _vp, _vp, _i32, _i32, _vp, _vp, _vp, _vp, _vp]
    return lib


_lib: ctypes.CDLL | None = None
_lib_error: str | None = None
_lib_lock = threading.Lock()


def library() -> ctypes.CDLL | None:
    """The compiled issue functions, or None (reason logged once) where they cannot be built.
    ``KVDEPOT_NATIVE_ISSUE=0`` turns them off."""
    global _lib, _lib_error
    with _lib_lock:
        if _lib is None and _lib_error is None:
            if os.environ.get("KVDEPOT_NATIVE_ISSUE", "1") == "0":
                _lib_error = "KVDEPOT_NATIVE_ISSUE=0"
            else:
                try:
                    with open(SOURCE, "rb") as f:
                        digest = hashlib.sha256(f.read()).hexdigest()[:16]
                    path = os.path.join(_cache_dir(), f"kvd-issue-{digest}.so")
                    if not os.path.exists(path):
                        _compile(SOURCE, path)
                    _lib = _load(path)
                except (OSError, AttributeError, subprocess.SubprocessError) as exc:
                    _lib_error = str(exc)
            if _lib_error:
                log.info("native transfer issue unavailable (%s): issuing from Python",
                         _lib_error)
        return _lib


def function_address(fn) -> int:
    """The C address of a ctypes foreign function."""
    return int(ctypes.cast(fn, ctypes.c_void_p).value or 0)


def make_api(runtime, driver) -> Api:
    """The entry points, from kvdepot's CudaRuntime (torch's libcudart) and CudaDriver (None:
    no kernel launches)."""
    lib = runtime.lib
    return Api(
        record=function_address(lib.cudaEventRecord),
        wait=function_address(lib.cudaStreamWaitEvent),
        query=function_address(lib.cudaEventQuery),
        sync=function_address(lib.cudaEventSynchronize),
        memcpy=function_address(lib.cudaMemcpyAsync),
        launch=function_address(driver.launch_kernel) if driver is not None else None,
        clear_error=function_address(lib.cudaGetLastError),
    )


def raise_failure(code: int, failed: int, runtime, driver) -> None:
    """Raise what a non-zero return of an issue function means."""
    call = CALLS.get(failed, f"call {failed}")
    if failed == LAUNCH_CALL:
        raise RuntimeError(f"{call} failed: {driver.describe(code)}")
    if code > 0:
        runtime.check(code, call)
    raise RuntimeError(f"native transfer issue: {call} failed ({code})")
