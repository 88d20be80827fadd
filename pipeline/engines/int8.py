"""precision=int8: ONNX Runtime's static quantisation (QDQ) of the exported fp32 graph, calibrated on the
first images of the dataset being scored, through the job's own decode and preprocessing.

The calibration cache (each tensor's range, ONNX Runtime's JSON) is kept beside the engines: it does not
depend on the batch size, so an engine rebuilt at a smaller size after an out-of-memory error, or by a
later run, is quantised from it without decoding the calibration images again. TensorRT reads the same
QDQ graph (explicit quantisation, the form TensorRT 10 recommends over its implicit calibrators).
"""

from __future__ import annotations

import logging
import os

import numpy as np

log = logging.getLogger(__name__)

METHODS = ("minmax", "entropy", "percentile")


def cpu_has_vnni() -> bool:
    """x86 dot-product instructions for 8-bit integers (AVX512-VNNI or AVX-VNNI)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


class _Batches:
    """ONNX Runtime's CalibrationDataReader protocol over fixed-size batches."""

    def __init__(self, batches: list[np.ndarray], input_name: str):
        self.batches, self.input_name, self.i = batches, input_name, 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {self.input_name: self.batches[self.i - 1]}

    def __len__(self):
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int):
        self.batches = self.batches[start_index:end_index]
        self.i = 0


def as_batches(images: np.ndarray, size: int) -> list[np.ndarray]:
    """Calibration images [N, …] as batches of the graph's static size, the last one filled with the first
    images again (repeating real images shifts no range; zeros would)."""
    out = []
    for start in range(0, len(images), size):
        chunk = images[start : start + size]
        if len(chunk) < size:
            chunk = np.concatenate([chunk, np.resize(images, (size - len(chunk), *images.shape[1:]))])
        out.append(np.ascontiguousarray(chunk, dtype=np.float32))
    return out


def quantize(fp32_path: str, out_path: str, calibration_cache: str, images, size: int, method: str,
             for_tensorrt: bool) -> None:
    """`fp32_path` → `out_path` in QDQ int8. `images()` gives the calibration images [N, …] (float32) and is
    called only when `calibration_cache` does not exist yet (it decodes them)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out_path + ".prepared.onnx"
    quant_pre_process(fp32_path, prepared, skip_symbolic_shape=True)
    reader = None if os.path.exists(calibration_cache) else _Batches(as_batches(images(), size), "images")
    calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[method]
    if for_tensorrt:  # TensorRT takes symmetric int8 only
        types = dict(activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, reduce_range=False,
                     extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    else:  # ONNX Runtime's advice for x86: u8 activations, s8 weights, 7-bit weights without VNNI (saturation)
        types = dict(activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=not cpu_has_vnni())
    try:
        quantize_static(prepared, out_path, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        calibrate_method=calibrate, calibration_cache_path=calibration_cache, **types)
    finally:
        os.remove(prepared)
    log.info("int8 quantised %s (calibration %s: %s)", os.path.basename(fp32_path),
             "measured" if reader is not None else "from cache", calibration_cache)
