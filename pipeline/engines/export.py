"""A torch model as an ONNX graph at one static batch size: what both ONNX Runtime and TensorRT build from.

The graph has one input, `images` [B, 3, S, S] (or a head's [B, F]), and the two outputs every model of
this job has, `output` and `embedding` (the same values where the model has one output).
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.sources import as_outputs

log = logging.getLogger(__name__)

INPUT = "images"
OUTPUTS = ("output", "embedding")


class _TwoOutputs(nn.Module):
    """The job's {"output", "embedding"} as a tuple, which every exporter takes."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x):
        out = as_outputs(self.network(x))
        return out["output"], out.get("embedding", out["output"])


def export_onnx(module: nn.Module, example: torch.Tensor, path: str, opset: int, label: str) -> None:
    """`module` traced at `example`'s shape (its batch size fixed: static shapes) to `path`.

    torch.export first (the maintained exporter); a module it cannot trace (a TorchScript file, control
    flow on values) goes through the TorchScript-based exporter, as torch.onnx offers."""
    for name in ("onnx_ir", "onnxscript", "torch.onnx"):  # their INFO lines are every pass of the optimiser
        logging.getLogger(name).setLevel(logging.WARNING)
    wrapped = _TwoOutputs(module).eval()
    example = example.contiguous()  # the graph's input is NCHW-contiguous, as ONNX Runtime and TensorRT take it
    first_error = None
    for dynamo in ([False] if isinstance(module, torch.jit.ScriptModule) else [True, False]):
        try:
            with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(wrapped, (example,), path, input_names=[INPUT], output_names=list(OUTPUTS),
                                  opset_version=opset, dynamo=dynamo, external_data=False,
                                  **({"optimize": True, "verbose": False} if dynamo else {}))
            return
        except Exception as e:  # the exporters raise many kinds; the first one's words are what to report
            first_error = first_error or e
            if not dynamo:
                break
            log.info("torch.export could not trace %s (%s); exporting through TorchScript", label,
                     " ".join(str(e).split())[:160])
    raise UserError(f"cannot export {label} to ONNX: {type(first_error).__name__}: "
                    f"{' '.join(str(first_error).split())[:200]}") from None
