"""TensorRT (GPU only): an engine built from the exported ONNX graph at its static batch size, fp16/bf16 by
builder flag, int8 from the QDQ graph ONNX Runtime's calibration wrote (explicit quantisation); run with
the job's torch CUDA tensors bound in place, on torch's current stream.

Engines are specific to the GPU model and the TensorRT version, both part of the cache key
(pipeline/engines/__init__.py): a cache folder shared by different GPUs holds one engine per kind.
"""

from __future__ import annotations

import logging

import torch

from pipeline.engines.onnxruntime import output_name
from pipeline.errors import UserError

log = logging.getLogger(__name__)


def trt():
    try:
        import tensorrt
    except ImportError:
        raise UserError("model.backend=tensorrt needs TensorRT on the GPU node: pip install -e '.[tensorrt]'") from None
    return tensorrt


def version() -> str:
    return trt().__version__


def build_engine(onnx_path: str, out_path: str, precision: str) -> None:
    t = trt()
    logger = t.Logger(t.Logger.WARNING)
    builder = t.Builder(logger)
    network = builder.create_network(0)  # explicit batch: the only kind TensorRT 10 builds
    parser = t.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors[:300]}")
    config = builder.create_builder_config()
    if precision in ("fp16", "int8"):  # int8: the QDQ graph says where; fp16 where it does not
        config.set_flag(t.BuilderFlag.FP16)
    if precision == "bf16":
        config.set_flag(t.BuilderFlag.BF16)
    if precision == "int8":
        config.set_flag(t.BuilderFlag.INT8)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build an engine from {onnx_path} (its log says why, above)")
    with open(out_path, "wb") as f:
        f.write(serialized)


class TrtModel:
    """images → {"output", "embedding"} through one TensorRT engine of a fixed batch size."""

    def __init__(self, path: str, device: torch.device, outputs: dict | None = None):
        t = trt()
        self.device = device
        self._runtime = t.Runtime(t.Logger(t.Logger.WARNING))
        with open(path, "rb") as f:
            self.engine = self._runtime.deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise RuntimeError(f"TensorRT cannot load {path} (built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise torch.OutOfMemoryError(f"out of memory: TensorRT cannot create an execution context for {path}")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == t.TensorIOMode.INPUT for n in names}
        self.input = next(n for n in names if is_input[n])
        self.shapes = {n: tuple(self.engine.get_tensor_shape(n)) for n in names}
        self.dtypes = {n: torch.from_numpy(t.nptype(self.engine.get_tensor_dtype(n))(0).reshape(1)).dtype
                       for n in names}
        graph_outputs = [n for n in names if not is_input[n]]
        self.output_names = {key: output_name(graph_outputs, key, (outputs or {}).get(key), path)
                             for key in ("output", "embedding")}

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.to(self.dtypes[self.input]).contiguous()
        if tuple(x.shape) != self.shapes[self.input]:
            raise RuntimeError(f"a TensorRT engine of input {self.shapes[self.input]} got {tuple(x.shape)}")
        out = {n: torch.empty(self.shapes[n], dtype=self.dtypes[n], device=self.device)
               for n in set(self.output_names.values())}
        self.context.set_tensor_address(self.input, x.data_ptr())
        for name, tensor in out.items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError("TensorRT's execute_async_v3 failed (its log says why, above)")
        return {key: out[name] for key, name in self.output_names.items()}
