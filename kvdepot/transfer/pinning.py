"""Pinning the arena for the GPU, and the few CUDA runtime calls torch does not expose.

The arena is a /dev/shm mapping the server created; an engine maps it and registers it with
``cudaHostRegister(portable | mapped)`` so that DMA runs at link speed (pageable copies reach
5-12 GB/s) and kernels can write it over UVA. Registering tens of GiB takes seconds (it faults
in and locks every page), so it runs on a background thread started at KV-cache registration,
and the first transfer waits for it. A registration is shared by every engine of the process
over the same range and undone when the last one closes.

We call libcudart through ctypes, the copy torch itself loaded, so streams and the primary
context are the ones torch uses. Every failed call is followed by ``cudaGetLastError``: the
runtime also keeps the error as "last error", and torch's next launch check would otherwise
raise it from an unrelated kernel.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import threading
import time

import torch

log = logging.getLogger(__name__)

HOST_REGISTER_PORTABLE = 0x1
HOST_REGISTER_MAPPED = 0x2
MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: direction from the pointers (UVA)
ERR_HOST_MEMORY_ALREADY_REGISTERED = 712
ERR_NOT_READY = 600
EVENT_DISABLE_TIMING = 0x2


class CudaError(RuntimeError):
    def __init__(self, call: str, code: int, text: str):
        super().__init__(f"{call} failed: {text} ({code})")
        self.code = code


class _MemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class MemcpyAttributes(ctypes.Structure):
    """cudaMemcpyAttributes (driver_types.h, identical in CUDA 12.8 and 13.x; 24 bytes)."""

    _fields_ = [
        ("srcAccessOrder", ctypes.c_int),
        ("srcLocHint", _MemLocation),
        ("dstLocHint", _MemLocation),
        ("flags", ctypes.c_uint),
    ]


SRC_ACCESS_ORDER_STREAM = 0x1
MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE = 0x1


def _candidate_paths() -> list[str]:
    # The copy torch already loaded comes first: same runtime instance as torch's streams.
    paths: list[str] = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rstrip("\n").split(" ")[-1]
                if "libcudart.so" in os.path.basename(path) and path not in paths:
                    paths.append(path)
    except OSError:
        pass
    torch_dir = os.path.dirname(torch.__file__)
    site = os.path.dirname(torch_dir)
    for pattern in (
        os.path.join(site, "nvidia", "*", "lib", "libcudart.so*"),
        os.path.join(site, "nvidia", "*", "*", "lib", "libcudart.so*"),
        os.path.join(torch_dir, "lib", "libcudart*.so*"),
    ):
        paths.extend(sorted(glob.glob(pattern), reverse=True))
    paths.extend(["libcudart.so.13", "libcudart.so.12", "libcudart.so"])
    return paths


class CudaRuntime:
    """The libcudart entry points kvdepot needs, typed once (ctypes argument conversion is the
    main per-call cost of a copy loop)."""

    def __init__(self) -> None:
        torch.cuda.init()
        lib = None
        errors = []
        for path in _candidate_paths():
            try:
                lib = ctypes.CDLL(path)
                lib.cudaRuntimeGetVersion  # noqa: B018 - probe that this is a CUDA runtime
                break
            except (OSError, AttributeError) as e:
                errors.append(f"{path}: {e}")
                lib = None
        if lib is None:
            raise OSError("no libcudart found: " + "; ".join(errors[-3:]))
        self.lib = lib
        self.path = getattr(lib, "_name", "?")
        vp, c_int, c_size = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        lib.cudaGetErrorString.argtypes = [c_int]
        lib.cudaGetLastError.restype = c_int
        lib.cudaRuntimeGetVersion.argtypes = [ctypes.POINTER(c_int)]
        lib.cudaSetDevice.argtypes = [c_int]
        lib.cudaThreadExchangeStreamCaptureMode.argtypes = [ctypes.POINTER(c_int)]
        lib.cudaThreadExchangeStreamCaptureMode.restype = c_int
        lib.cudaHostRegister.argtypes = [vp, c_size, ctypes.c_uint]
        lib.cudaHostUnregister.argtypes = [vp]
        lib.cudaHostGetDevicePointer.argtypes = [ctypes.POINTER(vp), vp, ctypes.c_uint]
        lib.cudaMemcpyAsync.argtypes = [vp, vp, c_size, c_int, vp]
        lib.cudaMemcpyAsync.restype = c_int
        # Events and stream waits without torch's per-call overhead (a torch event record costs
        # ~5 us on the GPU machines, these ~1 us): the transfer engines' hot path.
        lib.cudaEventCreateWithFlags.argtypes = [ctypes.POINTER(vp), ctypes.c_uint]
        lib.cudaEventCreateWithFlags.restype = c_int
        lib.cudaEventDestroy.argtypes = [vp]
        lib.cudaEventRecord.argtypes = [vp, vp]
        lib.cudaEventRecord.restype = c_int
        lib.cudaStreamWaitEvent.argtypes = [vp, vp, ctypes.c_uint]
        lib.cudaStreamWaitEvent.restype = c_int
        lib.cudaEventQuery.argtypes = [vp]
        lib.cudaEventQuery.restype = c_int
        lib.cudaEventSynchronize.argtypes = [vp]
        lib.cudaEventSynchronize.restype = c_int
        lib.cudaEventElapsedTime.argtypes = [ctypes.POINTER(ctypes.c_float), vp, vp]
        lib.cudaEventElapsedTime.restype = c_int
        v = c_int(0)
        lib.cudaRuntimeGetVersion(ctypes.byref(v))
        self.version = v.value
        self.memcpy_async = lib.cudaMemcpyAsync
        self._batch = None
        self.batch_has_fail_idx = self.version < 13000  # CUDA 13 dropped the failIdx argument
        if self.version >= 12080:
            try:
                fn = lib.cudaMemcpyBatchAsync
            except AttributeError:
                fn = None
            if fn is not None:
                fn.restype = c_int
                args = [vp, vp, vp, c_size, vp, vp, c_size]
                if self.batch_has_fail_idx:
                    args.append(vp)
                fn.argtypes = args + [vp]
                self._batch = fn

    @property
    def has_batch_memcpy(self) -> bool:
        return self._batch is not None

    @property
    def batch_function(self):
        """The cudaMemcpyBatchAsync entry point (has_batch_memcpy), for native callers."""
        return self._batch

    def check(self, code: int, call: str) -> None:
        if code != 0:
            self.lib.cudaGetLastError()  # clear it, see the module docstring
            raise CudaError(call, code, self.lib.cudaGetErrorString(code).decode())

    def set_device(self, index: int) -> None:
        self.check(self.lib.cudaSetDevice(index), "cudaSetDevice")

    def host_register(self, ptr: int, nbytes: int, flags: int) -> int:
        """Returns the CUDA error code; 0 and 712 (already registered) are not raised."""
        code = self.lib.cudaHostRegister(ptr, nbytes, flags)
        if code == ERR_HOST_MEMORY_ALREADY_REGISTERED:
            self.lib.cudaGetLastError()
            return code
        self.check(code, "cudaHostRegister")
        return 0

    def host_unregister(self, ptr: int) -> None:
        self.check(self.lib.cudaHostUnregister(ptr), "cudaHostUnregister")

    def host_device_pointer(self, ptr: int) -> int:
        out = ctypes.c_void_p()
        self.check(
            self.lib.cudaHostGetDevicePointer(ctypes.byref(out), ptr, 0), "cudaHostGetDevicePointer"
        )
        return int(out.value or 0)

    def event_create(self, timing: bool = False) -> int:
        """A new event (on the current device), with timing only where asked; free with
        event_destroy."""
        out = ctypes.c_void_p()
        flags = 0 if timing else EVENT_DISABLE_TIMING
        self.check(self.lib.cudaEventCreateWithFlags(ctypes.byref(out), flags),
                   "cudaEventCreateWithFlags")
        return int(out.value or 0)

    def elapsed_ms(self, start: int, end: int) -> float:
        """GPU time between two completed timing events."""
        out = ctypes.c_float()
        self.check(self.lib.cudaEventElapsedTime(ctypes.byref(out), start, end),
                   "cudaEventElapsedTime")
        return out.value

    def event_destroy(self, event: int) -> None:
        self.lib.cudaEventDestroy(event)

    def record(self, event: int, stream: int) -> None:
        code = self.lib.cudaEventRecord(event, stream)
        if code:
            self.check(code, "cudaEventRecord")

    def wait(self, stream: int, event: int) -> None:
        """Later work on ``stream`` waits for ``event`` on the GPU."""
        code = self.lib.cudaStreamWaitEvent(stream, event, 0)
        if code:
            self.check(code, "cudaStreamWaitEvent")

    def query(self, event: int) -> bool:
        code = self.lib.cudaEventQuery(event)
        if code == ERR_NOT_READY:
            self.lib.cudaGetLastError()  # not an error; keep it out of torch's next check
            return False
        self.check(code, "cudaEventQuery")
        return True

    def synchronize(self, event: int) -> None:
        self.check(self.lib.cudaEventSynchronize(event), "cudaEventSynchronize")

    def memcpy(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        code = self.memcpy_async(dst, src, nbytes, MEMCPY_DEFAULT, stream)
        if code:
            self.check(code, "cudaMemcpyAsync")

    def memcpy_batch(self, dsts, srcs, sizes, count: int, attrs, stream: int) -> None:
        """dsts/srcs/sizes: addresses of host arrays of count uint64 each."""
        assert self._batch is not None
        idx = (ctypes.c_size_t * 1)(0)
        args = [dsts, srcs, sizes, count, ctypes.addressof(attrs), ctypes.addressof(idx), 1]
        fail = ctypes.c_size_t(0)
        if self.batch_has_fail_idx:
            args.append(ctypes.addressof(fail))
        code = self._batch(*args, stream)
        if code:
            self.check(code, f"cudaMemcpyBatchAsync (copy {fail.value} of {count})")


_runtime: CudaRuntime | None = None
_runtime_lock = threading.Lock()
_CAPTURE_MODE_RELAXED = 2  # cudaStreamCaptureModeRelaxed


def relax_stream_capture() -> None:
    """Let the calling thread's CUDA calls run while another thread captures a CUDA graph.

    vLLM captures its CUDA graphs at start in the global capture mode, in which an allocation,
    a host registration or a module load from ANY thread invalidates the capture
    (cudaErrorStreamCaptureInvalidated: the engine dies). kvdepot's threads (the connector's
    I/O thread, the arena's pinning) may run then: the server may answer while vLLM captures.
    In the relaxed mode (CUDA's cudaThreadExchangeStreamCaptureMode, made for threads like
    these) this thread's calls are not checked against other threads' captures; they never
    touch a captured stream. Call it first thing on such a thread; CudaError when CUDA refuses.
    """
    rt = cuda_runtime()
    mode = ctypes.c_int(_CAPTURE_MODE_RELAXED)
    rt.check(rt.lib.cudaThreadExchangeStreamCaptureMode(ctypes.byref(mode)),
             "cudaThreadExchangeStreamCaptureMode")


def cuda_runtime() -> CudaRuntime:
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = CudaRuntime()
            log.debug("libcudart %s (runtime %d)", _runtime.path, _runtime.version)
        return _runtime


class ArenaPin:
    """One registration of a host range with CUDA, made on a background thread."""

    def __init__(self, ptr: int, nbytes: int, device: torch.device, *, background: bool = True):
        self.ptr = ptr
        self.nbytes = nbytes
        self.device = device
        self.seconds: float | None = None
        self.device_ptr = 0
        self.owned = False  # False: someone else registered the range; we never unregister it
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._refs = 1
        if background:
            threading.Thread(target=self._register, name="kvdepot-pin", daemon=True).start()
        else:
            self._register()

    def _register(self) -> None:
        try:
            rt = cuda_runtime()
            relax_stream_capture()  # a background pin may run while vLLM captures its graphs
            # A new thread's runtime starts on device 0; the registration's mapping must be made
            # in the context of the device that will use it.
            rt.set_device(self.device.index or 0)
            t0 = time.perf_counter()
            code = rt.host_register(
                self.ptr, self.nbytes, HOST_REGISTER_PORTABLE | HOST_REGISTER_MAPPED
            )
            self.seconds = time.perf_counter() - t0
            self.owned = code == 0
            self.device_ptr = rt.host_device_pointer(self.ptr)
            log.info(
                "arena pinned: %.2f GiB in %.2f s (%.1f GiB/s)%s",
                self.nbytes / 2**30,
                self.seconds,
                self.nbytes / 2**30 / max(self.seconds, 1e-9),
                "" if self.owned else " (already registered by another user)",
            )
        except BaseException as e:  # surfaced by wait()
            self._error = e
            log.error("pinning the arena failed: %s", e)
        finally:
            self._done.set()

    def ready(self) -> bool:
        return self._done.is_set() and self._error is None

    def wait(self, timeout: float | None = None) -> None:
        if not self._done.wait(timeout):
            raise TimeoutError(f"arena pinning still running after {timeout} s")
        if self._error is not None:
            raise RuntimeError("the arena could not be pinned") from self._error

    def _unregister(self) -> None:
        self._done.wait()
        if self.owned:
            cuda_runtime().host_unregister(self.ptr)
            self.owned = False
            log.info("arena unpinned (%.2f GiB)", self.nbytes / 2**30)


_pins: dict[tuple[int, int], ArenaPin] = {}
_pins_lock = threading.Lock()


def pin_arena(arena: torch.Tensor, device: torch.device, *, background: bool = True) -> ArenaPin:
    """Register the arena tensor's memory with CUDA (shared per range; release with
    ``release_arena``)."""
    if arena.device.type != "cpu":
        raise ValueError("the arena must be host memory")
    key = (arena.data_ptr(), arena.numel() * arena.element_size())
    with _pins_lock:
        pin = _pins.get(key)
        if pin is not None:
            pin._refs += 1
            return pin
        pin = ArenaPin(key[0], key[1], device, background=background)
        _pins[key] = pin
        return pin


def release_arena(pin: ArenaPin) -> None:
    with _pins_lock:
        pin._refs -= 1
        if pin._refs > 0:
            return
        _pins.pop((pin.ptr, pin.nbytes), None)
    pin._unregister()
