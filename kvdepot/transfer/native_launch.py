"""Launching a kernel Triton compiled with one CUDA driver call.

A chunk moves in ~0.8 ms, and measured on the H200 machines a launch through Triton's Python
launcher cost ~60 us warm and ~200 us right after the host had waited for the GPU (binding the
arguments, the cache key, the launcher's own checks), most of it before the first byte moves.
The fused copy kernel is launched again and again with the same pointers and only a few
changing integers, so this module keeps the argument block of one compiled kernel in ctypes
storage, built once, and each launch is a handful of integer stores and one cuLaunchKernel.

What is relied on, and checked before the first native launch (else the caller keeps using
Triton's launcher): the kernel takes its non-constexpr arguments in signature order (pointers
as 64-bit device addresses, integers as 32- or 64-bit values, sizes read back from the driver
with cuFuncGetParamInfo), followed only by pointer-sized scratch arguments that this kernel
does not use (Triton's global/profile scratch, absent or sized 0); one CTA per program, no
cooperative or programmatic-dependent launch.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

_POINTER_ATTRIBUTE_DEVICE_POINTER = 3  # CU_POINTER_ATTRIBUTE_DEVICE_POINTER (cuda.h)
_MAX_PARAMS = 64


class CudaDriver:
    """The libcuda entry points a native launch needs."""

    def __init__(self) -> None:
        lib = ctypes.CDLL("libcuda.so.1")
        vp, c_uint, c_size, c_int = ctypes.c_void_p, ctypes.c_uint, ctypes.c_size_t, ctypes.c_int
        self.launch_kernel = lib.cuLaunchKernel
        self.launch_kernel.restype = c_int
        self.launch_kernel.argtypes = [
            vp, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, vp, vp, vp,
        ]
        # CUDA >= 12.4; without it the argument sizes cannot be checked: no native launch.
        self.param_info = lib.cuFuncGetParamInfo
        self.param_info.restype = c_int
        self.param_info.argtypes = [vp, c_size, ctypes.POINTER(c_size), ctypes.POINTER(c_size)]
        self.pointer_attribute = lib.cuPointerGetAttribute
        self.pointer_attribute.restype = c_int
        self.pointer_attribute.argtypes = [vp, c_int, ctypes.c_uint64]
        self.error_string = lib.cuGetErrorString
        self.error_string.restype = c_int
        self.error_string.argtypes = [c_int, ctypes.POINTER(ctypes.c_char_p)]

    def describe(self, code: int) -> str:
        text = ctypes.c_char_p()
        if self.error_string(code, ctypes.byref(text)) == 0 and text.value:
            return f"{text.value.decode()} ({code})"
        return f"CUDA driver error {code}"

    def param_sizes(self, function: int) -> list[int]:
        sizes = []
        offset, size = ctypes.c_size_t(), ctypes.c_size_t()
        for i in range(_MAX_PARAMS):
            if self.param_info(function, i, ctypes.byref(offset), ctypes.byref(size)) != 0:
                break  # CUDA_ERROR_INVALID_VALUE past the last parameter
            sizes.append(size.value)
        return sizes

    def device_pointer(self, address: int) -> int:
        """The device address of ``address`` (registered host memory may map elsewhere)."""
        out = ctypes.c_uint64()
        if self.pointer_attribute(ctypes.byref(out), _POINTER_ATTRIBUTE_DEVICE_POINTER, address):
            return address  # not known to CUDA as such: plain device memory under UVA
        return out.value


_driver: CudaDriver | None = None
_driver_error: str | None = None
_driver_lock = threading.Lock()


def cuda_driver() -> CudaDriver | None:
    """The process's driver bindings, or None where libcuda lacks what is needed."""
    global _driver, _driver_error
    with _driver_lock:
        if _driver is None and _driver_error is None:
            try:
                _driver = CudaDriver()
            except (OSError, AttributeError) as exc:
                _driver_error = str(exc)
                log.info("native kernel launch unavailable: %s", exc)
        return _driver


@dataclass(frozen=True)
class KernelSpec:
    """What a launch of one compiled kernel needs besides its arguments."""

    function: int  # CUfunction
    block_threads: int
    shared_bytes: int
    scalar_sizes: tuple[int, ...]  # widths (4 or 8) of the integer arguments, in order
    n_extra: int  # trailing pointer-sized scratch arguments, passed as zeros

    @classmethod
    def from_triton(cls, compiled, n_pointers: int, n_scalars: int) -> KernelSpec | None:
        """From Triton's CompiledKernel (what launching it returned), or None with the reason
        logged when this kernel cannot be launched natively."""
        driver = cuda_driver()
        if driver is None:
            return None
        meta = getattr(compiled, "metadata", None)
        function = getattr(compiled, "function", None)
        why = ""
        if meta is None or not function:
            why = "no compiled function handle"
        elif getattr(meta, "num_ctas", 1) != 1 or any(
            d != 1 for d in (getattr(meta, "cluster_dims", None) or (1, 1, 1))
        ):
            why = "clusters of CTAs"
        elif getattr(meta, "launch_cooperative_grid", False) or getattr(meta, "launch_pdl", False):
            why = "a cooperative or dependent launch"
        elif getattr(meta, "global_scratch_size", 0) or getattr(meta, "profile_scratch_size", 0):
            why = "scratch memory"
        if why:
            log.info("native launch off for %s: %s", getattr(compiled, "name", "?"), why)
            return None
        sizes = driver.param_sizes(int(function))
        fixed = n_pointers + n_scalars
        extra = sizes[fixed:]
        if (
            len(sizes) < fixed
            or any(s != 8 for s in sizes[:n_pointers])
            or any(s not in (4, 8) for s in sizes[n_pointers:fixed])
            or any(s != 8 for s in extra)
        ):
            log.info("native launch off for %s: parameter sizes %s do not match %d pointers + "
                     "%d integers", getattr(compiled, "name", "?"), sizes, n_pointers, n_scalars)
            return None
        warp = getattr(meta, "warp_size", 32) or 32
        return cls(int(function), meta.num_warps * warp, meta.shared,
                   tuple(sizes[n_pointers:fixed]), len(extra))

    def fits(self, scalars: Sequence[int]) -> bool:
        """Whether these integer values fit this compilation's widths (signed)."""
        return all(size == 8 or -(1 << 31) <= v < (1 << 31)
                   for size, v in zip(self.scalar_sizes, scalars))


class NativeLaunch:
    """One compiled kernel with fixed pointer arguments and per-launch integer arguments."""

    def __init__(self, driver: CudaDriver, spec: KernelSpec, pointers: Sequence[int]):
        self.driver = driver
        self.function = ctypes.c_void_p(spec.function)
        self.block = spec.block_threads
        self.shared = spec.shared_bytes
        self._pointers = [ctypes.c_uint64(driver.device_pointer(p)) for p in pointers]
        self._scalars = [ctypes.c_uint32() if s == 4 else ctypes.c_uint64()
                         for s in spec.scalar_sizes]
        self._masks = [(1 << (8 * s)) - 1 for s in spec.scalar_sizes]
        self._extra = [ctypes.c_uint64(0) for _ in range(spec.n_extra)]
        storage = self._pointers + self._scalars + self._extra
        self._params = (ctypes.c_void_p * len(storage))(
            *[ctypes.addressof(v) for v in storage]
        )

    @classmethod
    def from_triton(cls, compiled, pointers: Sequence[int], n_scalars: int) -> NativeLaunch | None:
        spec = KernelSpec.from_triton(compiled, len(pointers), n_scalars)
        if spec is None:
            return None
        return cls(cuda_driver(), spec, pointers)

    def __call__(self, grid: int, stream: int, scalars: Sequence[int]) -> int:
        """Enqueue on ``stream`` (a cudaStream_t/CUstream handle); returns the CUresult.
        The values must fit the widths of this compilation (callers key launchers by them).
        Not thread-safe: the argument block is shared (callers launch under a lock)."""
        for cell, mask, v in zip(self._scalars, self._masks, scalars):
            cell.value = v & mask
        return self.driver.launch_kernel(
            self.function, grid, 1, 1, self.block, 1, 1, self.shared, stream, self._params, None
        )
