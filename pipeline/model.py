"""Load the model to score with: a torchvision model by name (weights, a state_dict checkpoint, or a
seeded random init), or a TorchScript / torch.export file. Put it in inference form on the device.

Weights that cannot be loaded are a user error, never a silent fall-back to random weights.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from pipeline.errors import UserError
from pipeline.settings import ModelSettings

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    module: nn.Module
    categories: list[str] | None  # class names, when the weights carry them
    source: str  # what was loaded, for logs and Parquet metadata


def load_model(settings: ModelSettings, device: torch.device, dtype: torch.dtype, seed: int) -> LoadedModel:
    torch.manual_seed(seed)
    if settings.path:
        module, categories, source = _load_file(settings.path), None, settings.path
    else:
        module, categories, source = _build_torchvision(settings)
    try:
        module = module.eval()
    except NotImplementedError:  # a torch.export program refuses eval(): it keeps the mode it was exported in
        pass
    module = module.to(device=device, dtype=dtype, memory_format=torch.channels_last)
    for p in module.parameters():
        p.requires_grad_(False)
    log.info("model=%s source=%s dtype=%s device=%s", settings.name, source, dtype, device)
    return LoadedModel(module, categories, source)


def compile_model(module: nn.Module) -> nn.Module:
    """torch.compile for the run's one input shape. Called once the batch size is final: compiling
    before `batch_size=auto` would compile every size it tries and then hit dynamo's recompile limit."""
    return torch.compile(module, dynamic=False)


def _build_torchvision(settings: ModelSettings) -> tuple[nn.Module, list[str] | None, str]:
    if settings.name not in torchvision.models.list_models():
        raise UserError(f"unknown model {settings.name!r}; torchvision has e.g. resnet18, resnet50, "
                        "mobilenet_v3_small, vit_b_16 (see torchvision.models.list_models())")
    if settings.checkpoint:
        module = torchvision.models.get_model(settings.name, weights=None, num_classes=settings.num_classes)
        _load_checkpoint(module, settings.checkpoint)
        return module, None, settings.checkpoint
    if settings.weights is None:
        module = torchvision.models.get_model(settings.name, weights=None, num_classes=settings.num_classes)
        log.warning("model.weights=null: %s has seeded random weights; its scores mean nothing", settings.name)
        return module, None, "random-init"
    weights = _weights_enum(settings.name, settings.weights)
    try:
        state_dict = weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:
        raise UserError(
            f"cannot load weights {weights} for {settings.name} ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
            f"pre-download them where there is network (python -c \"import torchvision; "
            f"torchvision.models.get_model('{settings.name}', weights='{settings.weights}')\") "
            f"into $TORCH_HOME, or pass model.checkpoint=<state_dict file>") from None
    module = torchvision.models.get_model(settings.name, weights=None, num_classes=len(weights.meta["categories"]))
    module.load_state_dict(state_dict)
    return module, list(weights.meta["categories"]), str(weights)


def _weights_enum(name: str, weights: str):
    enum = torchvision.models.get_model_weights(name)
    if weights == "DEFAULT":
        return enum.DEFAULT
    try:
        return enum[weights.split(".")[-1]]
    except KeyError:
        names = ", ".join(w.name for w in enum)
        raise UserError(f"unknown model.weights {weights!r} for {name}; choose one of {names}, DEFAULT or null") from None


def _load_checkpoint(module: nn.Module, path: str) -> None:
    if not os.path.isfile(path):
        raise UserError(f"model.checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read model.checkpoint {path}: {str(e).splitlines()[0][:200]}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"model.checkpoint {path} does not fit the model: {' '.join(str(e).split())[:200]}") from None


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
