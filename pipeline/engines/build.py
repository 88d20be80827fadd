"""Building a model's engine: which files it takes (the exported graph, its int8 form, the TensorRT plan),
each under its own cache key, and what it is gated against."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable

import numpy as np
import torch

from pipeline.engines import Engine, cache, engine_folder, target_parts
from pipeline.engines.gate import checks_for

log = logging.getLogger(__name__)


def engine_for(m, backend: str, precision: str, dtype: torch.dtype, device: torch.device, settings,
               calibration: Callable[[], np.ndarray] | None, calibration_id: dict | None,
               embedding_read: bool) -> Engine | None:
    """The Engine of planned model `m` (pipeline.models.PlannedModel), or None where the model already is
    what the engine would be (an ONNX file run by ONNX Runtime as it is)."""
    from pipeline.engines.onnxruntime import OrtModel

    onnx_file = isinstance(m.loaded.module, OrtModel)
    if onnx_file and backend == "onnxruntime" and precision != "int8":
        return None
    folder = engine_folder(settings)
    shape = tuple(m.input_shape)
    if onnx_file:
        identity = {"file": m.settings.path, "digest": cache.file_digest(m.settings.path)}
        reference = m.loaded.module
    else:
        identity = {"model": m.label, "weights": m.loaded.source, "digest": cache.module_digest(m.loaded.module)}
        reference = m.loaded.module
    graph_dtype = torch.float32 if precision == "int8" else dtype
    versions = target_parts(backend, device)

    def graph(size: int) -> cache.Cached:
        """The fp32/fp16 ONNX graph at this batch size: the file itself, or the model exported."""
        if onnx_file:
            return cache.Cached(m.settings.path, True, 0.0)
        parts = {**identity, "input": [size, *shape], "dtype": str(graph_dtype), "opset": settings.opset,
                 "torch": torch.__version__}
        return cache.cached_file(folder, f"{cache.engine_key(parts)}.onnx",
                                 lambda tmp: _export(m, graph_dtype, device, size, shape, tmp, settings.opset), parts)

    def quantized(size: int, source: cache.Cached) -> cache.Cached:
        from pipeline.engines.int8 import cpu_has_vnni, quantize

        calib = {**identity, "input": list(shape), "calibration": calibration_id, "method": settings.calibration_method}
        calib_path = f"{folder}/{cache.engine_key(calib)}.calibration.json"
        parts = {**identity, "graph": source.path, "input": [size, *shape], "int8": calib,
                 "for_tensorrt": backend == "tensorrt", "vnni": cpu_has_vnni(), **versions}
        return cache.cached_file(folder, f"{cache.engine_key(parts)}.int8.onnx",
                                 lambda tmp: quantize(source.path, tmp, calib_path, calibration, size,
                                                      settings.calibration_method, backend == "tensorrt"), parts)

    def make(size: int):
        source = graph(size)
        seconds = source.seconds
        if precision == "int8":
            source = quantized(size, source)
            seconds += source.seconds
        if backend == "onnxruntime":
            built = source
            runner = OrtModel(source.path, device, m.settings.onnx_outputs)
        else:
            from pipeline.engines.tensorrt import TrtModel, build_engine

            graph_id = identity["digest"] if source.path == m.settings.path else os.path.basename(source.path)
            parts = {"graph": graph_id, "precision": precision, **versions}  # an exported graph's name is its key
            built = cache.cached_file(folder, f"{cache.engine_key(parts)}.plan",
                                      lambda tmp: build_engine(source.path, tmp, precision), parts)
            seconds += built.seconds
            runner = TrtModel(built.path, device, m.settings.onnx_outputs if onnx_file else None)
        return runner, cache.Cached(built.path, built.hit and source.hit, seconds)

    kinds = [type(getattr(k, "kind", k)).__name__.lower() for k in m.outputs]  # topk | embedding | scores
    checks = checks_for(kinds, m.loaded.classifier, embedding_read)
    return Engine(m.label, backend, precision, make, reference, checks, settings)


def _export(m, dtype: torch.dtype, device: torch.device, size: int, shape: tuple, path: str, opset: int) -> None:
    from pipeline.engines.export import export_onnx

    module = m.loaded.module
    if next(iter(module.parameters()), torch.empty(0, dtype=dtype)).dtype != dtype:
        module = copy.deepcopy(module).to(dtype)  # int8 starts from fp32, whatever the run's float dtype
    example = torch.zeros((size, *shape), dtype=dtype, device=device)
    export_onnx(module, example, path, opset, m.label)



FLOAT_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def attach_engines(models: list, settings, batch_size: int, device: torch.device, dtype: torch.dtype,
                   precision: str, calibration) -> None:
    """Give every model whose backend is an engine its Engine, built (or loaded) now at its micro-batch.
    In an int8 run, the backbones' engines are quantised; heads and eager models run in the float dtype."""
    read = {m.settings.input_model for m in models if m.settings.is_head and m.settings.input.endswith(".embedding")}
    for m in models:
        backend = m.settings.engine_backend
        own = precision
        if precision == "int8" and (backend not in ("onnxruntime", "tensorrt") or m.branch is None):
            own = m.precision = FLOAT_NAMES[dtype]
        if backend not in ("onnxruntime", "tensorrt"):
            continue
        int8 = own == "int8"
        m.engine = engine_for(m, backend, own, dtype, device, settings.engine,
                              (lambda p=m.loaded.preprocess: calibration(p)) if int8 else None,
                              calibration.identity if int8 else None, m.name in read)
        if m.engine is not None:
            m.engine.prepare(min(m.settings.batch_size or batch_size, batch_size))
