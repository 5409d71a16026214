"""Timing and memory of one forward + backward step, and the GEMM floor.

- **time**: on CUDA the median of ``reps`` device-event timings, with a ~20 ms ``torch.cuda._sleep`` queued before
  each timed step (see :func:`time_fn`); on the CPU the median of ``reps`` wall-clock (``time.perf_counter``)
  timings. Warm-up steps come first on both.
- **extra memory**: the peak beyond the inputs and the two gradients. On CUDA: ``torch.cuda.max_memory_allocated``
  after ``reset_peak_memory_stats`` minus the allocation before the step. On the CPU (Linux) PyTorch's CPU
  allocator keeps no statistics, so the process's resident set is used instead: freed heap pages are returned to
  the OS (``malloc_trim(0)``), the kernel's peak-RSS mark is reset (``/proc/self/clear_refs`` ← ``5``), and the
  extra is ``VmHWM`` after the step minus ``VmRSS`` before it, minus the gradients. That counts every page the step
  touched (the allocator's and the libraries' scratch included) at page granularity; where the peak mark cannot be
  reset (not Linux) the column is left empty.
- **floor**: the three GEMMs an exact forward + backward must do (``x@Wᵀ``, ``dz@W``, ``dzᵀ@x``, 6·N·H·V FLOPs) on
  shapes padded to multiples of 128, in the input dtype, timed the same way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import statistics
import sys
import time

import torch

MiB = 2**20

__all__ = [
    "MiB",
    "time_fn",
    "CpuPeakMemory",
    "cpu_memory",
    "floor_ms",
    "floor_operands",
    "synchronize",
    "empty_cache",
    "is_cuda",
    "occupy_device",
]


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def time_fn(step, reps, warmup=2, device="cuda"):
    """Median time of ``step`` in ms: between CUDA events on CUDA, wall-clock elsewhere.

    CUDA: before each timed step a ~20 ms GPU sleep is queued so that the host can enqueue the whole step while the
    device waits: the events then measure the device's work, not the Python launch latency of the first kernels
    (which a training step hides behind the previous layer's work). Every method is timed the same way.
    CPU: the step runs synchronously, so ``time.perf_counter`` around it is its time.
    """
    if not is_cuda(device):
        return _time_fn_cpu(step, reps, warmup)
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        occupy_device()
        a.record()
        step()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


_SLEEP_CYCLES = 40_000_000  # ~20 ms at H100 clocks: longer than the host needs to enqueue one step


def occupy_device(steps: int = 1) -> None:
    """Queue ``steps`` × ~20 ms of GPU sleep: the host then enqueues what follows without waiting on the device."""
    torch.cuda._sleep(steps * _SLEEP_CYCLES)


def _time_fn_cpu(step, reps, warmup):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class CpuPeakMemory:
    """Peak resident memory of a region of code on the CPU (Linux), in bytes: see the module's docstring.

    ``start()`` returns the resident bytes after releasing freed heap pages and resetting the kernel's peak mark;
    ``peak()`` the peak since. ``available`` is False where the peak mark cannot be reset (then both return None).
    """

    def __init__(self):
        self._malloc_trim = None
        libc_name = ctypes.util.find_library("c")
        if sys.platform.startswith("linux") and libc_name:
            try:
                self._malloc_trim = ctypes.CDLL(libc_name).malloc_trim
            except (OSError, AttributeError):
                self._malloc_trim = None
        self.available = self._reset_peak() and self._status_kib("VmHWM") is not None

    @staticmethod
    def _reset_peak() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _status_kib(key):
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    def start(self):
        if not self.available:
            return None
        gc.collect()
        if self._malloc_trim is not None:
            self._malloc_trim(0)
        self._reset_peak()
        return self._status_kib("VmRSS") * 1024

    def peak(self):
        if not self.available:
            return None
        return self._status_kib("VmHWM") * 1024


_CPU_MEMORY = None


def cpu_memory() -> CpuPeakMemory:
    global _CPU_MEMORY
    if _CPU_MEMORY is None:
        _CPU_MEMORY = CpuPeakMemory()
    return _CPU_MEMORY


def synchronize(device):
    if is_cuda(device):
        torch.cuda.synchronize()


def empty_cache(device):
    if is_cuda(device):
        torch.cuda.empty_cache()


def floor_operands(n, h, v, dtype, device="cuda"):
    """``(x, w, dz)``: random ``(N, H)``, ``(V, H)`` and ``(N, V)`` operands of the floor's GEMMs, each dimension
    padded to a multiple of 128 (cuBLAS's fast kernels; an odd V such as 50257 would otherwise cost a multiple)."""
    pad = lambda d: -(-d // 128) * 128  # noqa: E731
    n, h, v = pad(n), pad(h), pad(v)
    return (
        torch.randn(n, h, device=device, dtype=dtype),
        torch.randn(v, h, device=device, dtype=dtype),
        torch.randn(n, v, device=device, dtype=dtype),
    )


def floor_ms(n, h, v, dtype, reps, warmup=2, device="cuda"):
    x, w, dz = floor_operands(n, h, v, dtype, device)

    def step():
        torch.mm(x, w.T, out=dz)
        torch.mm(dz, w)
        torch.mm(dz.T, x)

    return time_fn(step, reps, warmup, device)
