"""An ONNX graph run by ONNX Runtime on the job's device: the CPU execution provider here, CUDA's on a GPU.

Inputs and outputs are torch tensors bound in place (IO binding): no copy through numpy, and on CUDA no
trip to the host. A graph whose batch dimension is fixed runs any number of rows in chunks of that size.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from pipeline.errors import UserError

log = logging.getLogger(__name__)

_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64,
           "tensor(int64)": torch.int64, "tensor(int32)": torch.int32}


def ort():
    try:
        import onnxruntime
    except ImportError:
        raise UserError("model.backend=onnxruntime and .onnx models need ONNX Runtime: "
                        "pip install -e '.[engines]'") from None
    return onnxruntime


def providers(device: torch.device) -> list:
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort().get_available_providers():
        raise UserError("ONNX Runtime here has no CUDA execution provider: install onnxruntime-gpu for device=cuda")
    return [("CUDAExecutionProvider", {"device_id": device.index or 0})]


class OrtModel:
    """images → {"output", "embedding"} through one ONNX Runtime session. `outputs` maps those two to the
    graph's outputs by name or position (default: an output named so, else the first)."""

    def __init__(self, path: str, device: torch.device, outputs: dict | None = None, threads: int | None = None):
        rt = ort()
        options = rt.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        # No spinning between runs: its idle threads would take the cores the decoder's threads decode on.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise here
        try:
            self.session = rt.InferenceSession(path, options, providers=providers(device))
        except Exception as e:
            raise UserError(f"ONNX Runtime cannot load {path}: {' '.join(str(e).split())[:200]}") from None
        self.path, self.device = path, device
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise UserError(f"{path} takes {len(inputs)} inputs; an image model here takes one ([B, 3, S, S])")
        self.input = inputs[0]
        if self.input.type not in ("tensor(float)", "tensor(float16)"):
            raise UserError(f"{path} takes {self.input.type}; float32 or float16 images expected")
        self.dtype = _DTYPES[self.input.type]
        batch = self.input.shape[0]
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None
        names = [o.name for o in self.session.get_outputs()]
        self.output_names = {key: output_name(names, key, (outputs or {}).get(key), path)
                             for key in ("output", "embedding")}
        self._shapes: dict[int, dict[str, tuple]] = {}

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        rows = x.shape[0]
        size = self.fixed_batch or rows
        if rows == size:
            return self._run(x)
        parts = []
        for start in range(0, rows, size):  # a graph of another fixed batch: its chunks, the tail padded
            chunk = x[start : start + size]
            if chunk.shape[0] < size:
                chunk = torch.cat([chunk, chunk.new_zeros((size - chunk.shape[0], *chunk.shape[1:]))])
            parts.append(self._run(chunk))
        return {k: torch.cat([p[k] for p in parts])[:rows] for k in parts[0]}

    def _run(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.to(self.dtype).contiguous()  # the graph reads NCHW rows; a channels_last batch is copied here
        binding = self.session.io_binding()
        kind, index = self.device.type, self.device.index or 0
        binding.bind_input(self.input.name, kind, index, _np_dtype(x.dtype), list(x.shape), x.data_ptr())
        shapes = self._output_shapes(x)
        out = {name: torch.empty(shape, dtype=dtype, device=self.device) for name, (shape, dtype) in shapes.items()}
        for name, tensor in out.items():
            binding.bind_output(name, kind, index, _np_dtype(tensor.dtype), list(tensor.shape), tensor.data_ptr())
        if kind == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the input is written before ONNX Runtime reads it
        self.session.run_with_iobinding(binding)
        return {key: out[name] for key, name in self.output_names.items()}

    def _output_shapes(self, x: torch.Tensor) -> dict[str, tuple]:
        """Each output's shape and dtype at this batch size: from the graph where its shapes are static,
        else from one run of a single blank row."""
        rows = x.shape[0]
        if rows not in self._shapes:
            wanted = [o for o in self.session.get_outputs() if o.name in set(self.output_names.values())]
            dims = {o.name: o.shape[1:] for o in wanted}
            if not all(isinstance(d, int) for shape in dims.values() for d in shape):
                one = np.zeros((self.fixed_batch or 1, *x.shape[1:]), dtype=_np_dtype(x.dtype))
                values = dict(zip([o.name for o in self.session.get_outputs()],
                                  self.session.run(None, {self.input.name: one})))
                dims = {name: values[name].shape[1:] for name in dims}
            self._shapes[rows] = {o.name: ((rows, *dims[o.name]), _DTYPES.get(o.type, torch.float32)) for o in wanted}
        return self._shapes[rows]


def output_name(names: list[str], key: str, given, path: str) -> str:
    """The graph output that stands for `key` ("output": the scores; "embedding")."""
    if given is None:
        aliases = ("output", "scores", "logits") if key == "output" else ("embedding", "embeddings", "features")
        return next((n for n in names if n.lower() in aliases), names[0])
    if isinstance(given, int):
        if not 0 <= given < len(names):
            raise UserError(f"{path} has {len(names)} outputs; model.onnx_outputs asks for position {given}")
        return names[given]
    if given not in names:
        raise UserError(f"{path} has no output {given!r}; its outputs: {', '.join(names)}")
    return given


def _np_dtype(dtype: torch.dtype):
    return {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64,
            torch.int64: np.int64, torch.int32: np.int32}[dtype]
