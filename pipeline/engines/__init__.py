"""How a model runs: `eager` torch, `compile` (torch.compile), or an exported engine, `onnxruntime` or
`tensorrt`, per model (`model.backend`).

An engine is built at a static batch size (the model's micro-batch; again at the smaller size after an
out-of-memory halving), cached on disk under a key of everything that makes it valid (the model's weights
and structure, the input shape, precision, opset, the exporter's and the engine library's versions and,
for TensorRT, the GPU), built once per node under a file lock. It scores only after its outputs on the
first real rows agree with the model's reference (pipeline/engines/gate.py); where they do not, one
warning line, the figures in the metrics, and the model runs eager.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from pipeline import device as dev
from pipeline.engines import cache
from pipeline.engines.gate import compare
from pipeline.errors import UserError
from pipeline.sources import as_outputs

log = logging.getLogger(__name__)

BACKENDS = ("eager", "compile", "onnxruntime", "tensorrt")
ENGINES = ("onnxruntime", "tensorrt")


class Engine:
    """A model's engine, one per static batch size, each built (or loaded from the cache) when its size is
    first needed and gated against `reference` on the first rows it runs. Called like the model."""

    def __init__(self, label: str, backend: str, precision: str, make: Callable[[int], tuple[Callable, cache.Cached]],
                 reference: Callable | None, checks: list[str], engine_settings):
        self.label, self.backend, self.precision = label, backend, precision
        self._make, self.reference, self.checks, self.settings = make, reference, checks, engine_settings
        self._runners: dict[int, Callable] = {}
        self._ungated: set[int] = set()
        self.failed_gate = False
        self.builds: dict[int, dict] = {}
        self.gates: dict[int, dict] = {}
        self._gated = None  # (the input, the outputs chosen for it): the scorer's next call on it reuses them

    def prepare(self, size: int) -> None:
        if size in self._runners:
            return
        runner, cached = self._make(size)
        self._runners[size] = runner
        self.builds[size] = {"cache": "hit" if cached.hit else "built", "seconds": round(cached.seconds, 3),
                             "path": cached.path}
        log.info("engine model=%s backend=%s precision=%s batch=%d cache=%s seconds=%.2f path=%s", self.label,
                 self.backend, self.precision, size, "hit" if cached.hit else "built", cached.seconds, cached.path)
        if self.reference is not None:
            self._ungated.add(size)

    def gate(self, x: torch.Tensor, rows: int) -> dict:
        """Compare the engine of x's batch size with the reference on x's first `rows` rows; a failure sends
        every later call to the reference."""
        size = x.shape[0]
        self.prepare(size)
        with torch.inference_mode():
            ours = self._runners[size](x)
            theirs = self.reference(x)
        s = self.settings
        figures = compare(as_outputs(theirs), ours, rows, self.checks, s.gate_top1, s.gate_cosine)
        self.gates[size] = figures
        self._ungated.discard(size)
        self._gated = (_identity(x), ours if figures["passed"] else as_outputs(theirs))
        shown = " ".join(f"{k}={v}" for k, v in figures.items() if k != "passed")
        if figures["passed"]:
            log.info("engine gate passed model=%s backend=%s precision=%s batch=%d %s", self.label, self.backend,
                     self.precision, size, shown)
        else:
            self.failed_gate = True
            log.warning("engine gate FAILED model=%s backend=%s precision=%s batch=%d %s (needs top1>=%s, "
                        "cosine>=%s): scoring with eager instead", self.label, self.backend, self.precision, size,
                        shown, s.gate_top1, s.gate_cosine)
        return figures

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._gated is not None:
            gated, self._gated = self._gated, None
            if gated[0] == _identity(x):  # the rows the gate just ran: their outputs, not a second run
                return gated[1]
        if self.failed_gate:
            return as_outputs(self.reference(x))
        size = x.shape[0]
        self.prepare(size)  # a size first asked for (after an out-of-memory halving): built or loaded now
        if size in self._ungated:
            self.gate(x, size)
            if self.failed_gate:
                return as_outputs(self.reference(x))
        return self._runners[size](x)

    @property
    def pending_gate(self) -> bool:
        return bool(self._ungated) and not self.failed_gate

    def stats(self) -> dict:
        return {"backend": self.backend, "precision": self.precision,
                "scoring_with": "eager" if self.failed_gate else self.backend,
                "builds": {str(k): v for k, v in self.builds.items()},
                "gates": {str(k): v for k, v in self.gates.items()}}


def _identity(x: torch.Tensor) -> tuple:
    return x.data_ptr(), tuple(x.shape), x.stride(), x._version


def check_backend(backend: str, precision: str, device: torch.device, what: str) -> None:
    """User errors of a model's backend on this device and precision, before anything is loaded."""
    if backend == "tensorrt" and device.type != "cuda":
        raise UserError(f"{what}.backend=tensorrt needs a CUDA GPU (device={device.type} here): "
                        f"use {what}.backend=onnxruntime on the CPU")
    if backend == "onnxruntime" and precision == "bf16":
        raise UserError(f"{what}.backend=onnxruntime runs fp32, fp16 (CUDA) or int8: not precision=bf16")
    if backend == "onnxruntime" and precision == "fp16" and device.type != "cuda":
        raise UserError(f"{what}.backend=onnxruntime on the CPU runs fp32 or int8: not precision=fp16")
    if backend in ENGINES:
        from pipeline.engines import onnxruntime

        onnxruntime.ort()  # ONNX Runtime exports (onnx) and calibrates for both; said here if missing
        if backend == "tensorrt":
            from pipeline.engines import tensorrt

            tensorrt.trt()


def library_versions(backend: str) -> dict:
    import onnx

    versions = {"torch": torch.__version__, "onnx": onnx.__version__}
    from pipeline.engines.onnxruntime import ort

    versions["onnxruntime"] = ort().__version__
    if backend == "tensorrt":
        from pipeline.engines.tensorrt import version

        versions["tensorrt"] = version()
    return versions


def engine_folder(settings) -> str:
    return os.path.expanduser(settings.cache_dir) if settings.cache_dir else cache.default_cache_dir()


def target_parts(backend: str, device: torch.device) -> dict:
    """What an engine is specific to beyond the model: the device kind and, for TensorRT, the GPU."""
    parts = {"device": device.type, **library_versions(backend)}
    if backend == "tensorrt" or device.type == "cuda":
        parts.update(dev.gpu_model(device))
    return parts
