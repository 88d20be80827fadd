"""The model to score with: loaded by its source (pipeline/sources/), or from a TorchScript / torch.export
file, put in inference form on the device, with the preprocessing it expects.

Preprocessing: each key the user left null comes from the model (its weights' transforms, timm's data
config, open_clip's preprocessing config); a value given wins. Weights that cannot be loaded are a user
error, never a silent fall-back to random weights.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.decode.assemble import Preprocess
from pipeline.errors import UserError
from pipeline.settings import INTERPOLATIONS, ModelSettings
from pipeline.sources import PREPROCESS_KEYS, Builder, SameOutput, source_module

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    module: nn.Module  # images → {"output": …, "embedding": …}
    categories: list[str] | None  # class names, when the weights carry them
    source: str  # what was loaded, for logs and Parquet metadata
    preprocess: Preprocess | None  # None for a head: it reads another model's output, not images
    classifier: bool = True  # is "output" class scores?


def load_model(settings: ModelSettings, device: torch.device, dtype: torch.dtype, seed: int,
               want_embedding: bool = False, build: Builder | None = None, in_features: int | None = None) -> LoadedModel:
    """`in_features`: for a head, the width of the output it reads."""
    torch.manual_seed(seed)
    classifier = True
    if settings.is_head:
        from pipeline.sources.head import load_head

        loaded = load_head(settings, in_features, build)
        network, own, categories, source = loaded.network, None, None, loaded.weights
    elif settings.path and settings.path.endswith(".onnx"):
        return _load_onnx(settings, device)
    elif settings.path:
        network, own, categories, source = SameOutput(_load_file(settings.path)), {}, None, settings.path
    else:
        loaded = source_module(settings.source).load(settings, want_embedding, build)
        network, own, categories, source = loaded.network, loaded.preprocess, loaded.categories, loaded.weights
        classifier = loaded.classifier
    preprocess = None if settings.is_head else resolve_preprocess(settings, own)
    try:
        network = network.eval()
    except NotImplementedError:  # a torch.export program refuses eval(): it keeps the mode it was exported in
        pass
    network = network.to(device=device, dtype=dtype, memory_format=torch.channels_last)
    if dtype != torch.float32:
        keep_norms_float32(network)
    for p in network.parameters():
        p.requires_grad_(False)
    log.info("model=%s source=%s weights=%s dtype=%s device=%s preprocess=%s",
             settings.label, settings.source_label, source, dtype, device, preprocess)
    return LoadedModel(network, categories, source, preprocess, classifier)


def _load_onnx(settings: ModelSettings, device: torch.device) -> LoadedModel:
    """An ONNX file, run by ONNX Runtime: its preprocessing must be given, as for any file."""
    from pipeline.engines.onnxruntime import OrtModel

    if not os.path.isfile(settings.path):
        raise UserError(f"model.path {settings.path} does not exist")
    preprocess = resolve_preprocess(settings, {})
    module = OrtModel(settings.path, device, settings.onnx_outputs)
    log.info("model=%s source=file (ONNX Runtime, input %s %s) device=%s preprocess=%s", settings.path,
             module.input.type, module.input.shape, device, preprocess)
    return LoadedModel(module, None, settings.path, preprocess)


def keep_norms_float32(network: nn.Module) -> None:
    """BatchNorm layers keep float32 parameters in an fp16/bf16 model: cuDNN runs half-precision batch norm
    only with float32 weights (else torch falls back to its own, slower kernel), and their statistics
    lose nothing to rounding. Inputs and outputs stay in the model's dtype."""
    for module in network.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.float()


def resolve_preprocess(settings: ModelSettings, own: dict) -> Preprocess:
    """The model's own preprocessing, with every key the user gave taking its place."""
    values = {}
    for key in PREPROCESS_KEYS:
        given = getattr(settings, key)
        values[key] = given if given is not None else own.get(key)
    missing = [k for k, v in values.items() if v is None]
    if missing:
        what = settings.path or f"model.source={settings.source}"
        raise UserError(f"{what} does not say how to preprocess its input: give "
                        + " ".join(f"model.{k}=…" for k in missing))
    if values["interpolation"] not in INTERPOLATIONS:
        raise UserError(f"the model's interpolation {values['interpolation']!r} is not supported (only "
                        f"{'|'.join(INTERPOLATIONS)}): give model.interpolation=…")
    if values["resize_size"] < values["crop_size"]:
        raise UserError(f"model.resize_size={values['resize_size']} is smaller than model.crop_size={values['crop_size']}")
    return Preprocess(int(values["resize_size"]), int(values["crop_size"]), tuple(float(v) for v in values["mean"]),
                      tuple(float(v) for v in values["std"]), values["interpolation"])


def compile_model(module: nn.Module) -> nn.Module:
    """torch.compile for the run's one input shape. Called once the batch size is final: compiling
    before `batch_size=auto` would compile every size it tries and then hit dynamo's recompile limit."""
    return torch.compile(module, dynamic=False)


def _load_file(path: str) -> nn.Module:
    if not os.path.isfile(path):
        raise UserError(f"model.path {path} does not exist")
    try:
        if path.endswith(".pt2"):
            return torch.export.load(path).module()
        return torch.jit.load(path, map_location="cpu")
    except Exception as e:
        raise UserError(f"cannot load model.path {path} (TorchScript .pt/.ts or torch.export .pt2 expected): "
                        f"{str(e).splitlines()[0][:160]}") from None
