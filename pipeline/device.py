"""Every device-specific call in one place: the CPU path and the CUDA path differ only here (which
device this process uses is `pipeline.cluster`'s call).

The rest of the code passes a `torch.device` around and calls these helpers, so the code the tests
run on CPU is the code that runs on a GPU node.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import resource
import time

import torch


log = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def float_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of the batch and of eager models: int8 engines take float inputs (fp16 on CUDA, fp32 here)
    and are gated against an eager model in that dtype."""
    if precision == "int8":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[precision]


def gpu_model(device: torch.device) -> dict:
    """What a TensorRT engine is specific to: the GPU's name and compute capability."""
    if device.type != "cuda":
        return {}
    return {"gpu": torch.cuda.get_device_name(device), "capability": list(torch.cuda.get_device_capability(device))}


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto` → fp16 on CUDA, bf16 on a CPU with native bf16 kernels, else fp32."""
    if name == "auto":
        if device.type == "cuda":
            return "fp16"
        return "bf16" if cpu_has_bf16() else "fp32"
    if device.type == "cpu" and name not in ("fp32", "int8") and not (name == "bf16" and cpu_has_bf16()):
        log.warning("precision=%s on this CPU has no native kernels: it runs several times slower than fp32 "
                    "(docs/BENCHMARKS.md); precision=auto picks %s here", name, resolve_precision("auto", device))
    return name


def cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def configure(device: torch.device, seed: int, precision: str = "fp32") -> None:
    """Seed; let cuDNN pick the fastest kernels for our fixed shapes; and make fp32 mean IEEE fp32 (torch
    lets cuDNN run fp32 convolutions as TF32 by default, a 10-bit mantissa, on Ampere and Hopper)."""
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        if precision == "fp32":
            torch.backends.cudnn.conv.fp32_precision = "ieee"
            torch.backends.cuda.matmul.fp32_precision = "ieee"


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so that a host clock reads the real time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# What an allocation failure says, in the words of each library that can raise one here. Substrings of
# str(error), matched case-sensitively, each read from the installed library or its headers:
OUT_OF_MEMORY_TEXTS = (
    "out of memory",  # torch's CUDA/HIP/XPU OutOfMemoryError; cudaGetErrorString/cuGetErrorString of an OOM
    "can't allocate memory",  # torch's DefaultCPUAllocator
    "CUDNN_STATUS_ALLOC_FAILED", "CUDNN_STATUS_NOT_SUPPORTED",  # cuDNN (the second: a workspace that did not fit)
    "CUBLAS_STATUS_ALLOC_FAILED",
    "cudaErrorMemoryAllocation", "CUDA_ERROR_OUT_OF_MEMORY",  # DALI's CUDAError names (dali/core/cuda_error.h)
    "CUDA allocation failed", "Can't allocate ",  # DALI's CUDABadAlloc: "Can't allocate N bytes on device D." / "on host."
    "bad_alloc",  # std::bad_alloc from DALI's memory resources (dali/core/mm/*.h)
    "failed to allocate pinned GPU Memory",  # DALI's pinned host buffers
    "Insufficient memory", "Failed to allocate ",  # OpenCV's OutOfMemoryError, inside DALI's CPU operators
    "nvImageCodec failure: '#5'", "nvImageCodec failure: '#15'",  # NVIMGCODEC_STATUS_(EXTENSION_)ALLOCATOR_FAILURE
)


def is_out_of_memory(error: BaseException) -> bool:
    """An allocation failure from torch, CUDA, cuDNN, DALI or nvImageCodec (they raise RuntimeError or
    MemoryError with one of the texts above), as opposed to bad input or a bug."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in OUT_OF_MEMORY_TEXTS)


def release_memory(device: torch.device) -> None:
    """After an out-of-memory error: give back what torch's and DALI's allocators cache, and the heap."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        try:
            from nvidia.dali.backend import ReleaseUnusedMemory
        except ImportError:
            ReleaseUnusedMemory = None
        if ReleaseUnusedMemory is not None:
            ReleaseUnusedMemory()
    trim_host_memory()


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):  # not glibc
            _LIBC = False
    return _LIBC


def trim_host_memory() -> None:
    """Hand freed heap memory back to the system (glibc's malloc_trim; a no-op elsewhere)."""
    libc = _libc()
    if libc:
        libc.malloc_trim(0)


def new_stream(device: torch.device):
    """A CUDA stream of its own for a producer thread; None on the CPU."""
    return torch.cuda.Stream(device) if device.type == "cuda" else None


def on_stream(stream):
    """Make `stream` current in this thread (no-op for None)."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; on CUDA through pinned memory, so the copy is queued on the current
    stream instead of waiting for the work already queued on the GPU."""
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def record_event(device: torch.device):
    """An event marking the work queued so far on the current stream; None on the CPU."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def consume(tensor: torch.Tensor, event) -> None:
    """Make the current stream wait for a tensor produced on another stream, and tell the caching
    allocator that this stream uses it (so its memory is not reused while our work is queued)."""
    if event is None:
        return
    stream = torch.cuda.current_stream(tensor.device)
    stream.wait_event(event)
    tensor.record_stream(stream)


class HostCopy:
    """Tensors copied to host memory without blocking: pinned buffers and an event on CUDA, the tensors
    themselves on the CPU. `wait()` returns them as numpy arrays once the copy has landed."""

    def __init__(self, tensors: dict[str, torch.Tensor], device: torch.device):
        if device.type != "cuda":
            self._host, self._event = tensors, None
            return
        self._host = {}
        for name, t in tensors.items():
            self._host[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self._host[name].copy_(t, non_blocking=True)
        self._event = record_event(device)

    def wait(self) -> dict:
        if self._event is not None:
            self._event.synchronize()
        return {name: t.numpy() for name, t in self._host.items()}


class ModelTimer:
    """Time spent in the model: the host clock on the CPU; on CUDA, events around the work, read once
    they have completed, so timing never makes the host wait for the GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds = 0.0
        self._pending: list = []
        self._start = None

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self) -> None:
        if not self.cuda:
            self.seconds += time.perf_counter() - self._start
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._pending.append((self._start, end))
        while self._pending and self._pending[0][1].query():
            self._add(self._pending.pop(0))

    def total(self) -> float:
        """All model time so far (on CUDA this waits for the events still pending)."""
        for pair in self._pending:
            pair[1].synchronize()
            self._add(pair)
        self._pending = []
        return self.seconds

    def _add(self, pair) -> None:
        self.seconds += pair[0].elapsed_time(pair[1]) / 1000


def reset_peak_memory(device: torch.device) -> None:
    """CUDA: reset max allocated. CPU (Linux): reset the process's peak RSS, so each measurement has its own."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set size
    except OSError:
        pass  # not Linux, or not allowed: the peak then covers the whole process life


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max allocated since the last reset. CPU: peak RSS since the last reset (Linux), else of the process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def physical_id(device: torch.device) -> str:
    """Which physical GPU this is, whatever CUDA_VISIBLE_DEVICES renumbered (its UUID); "cpu" on the CPU."""
    if device.type != "cuda":
        return "cpu"
    return str(torch.cuda.get_device_properties(device).uuid)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"
