"""Model sources: one module per `model.source` value (torchvision, timm, open_clip, module), each with
`load(settings, want_embedding, build) -> Loaded`. A new source is a new module here.

Every source hands back a network that maps images to {"output": …, "embedding": …} in one forward
pass (the two may be the same tensor), the preprocessing the model itself expects (any key may be None
when it does not say), and, where the weights name them, its class names.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.errors import UserError

log = logging.getLogger(__name__)

PREPROCESS_KEYS = ("resize_size", "crop_size", "mean", "std", "interpolation")


@dataclass
class Loaded:
    network: nn.Module  # images [B, 3, S, S] → {"output": tensor, "embedding": tensor}
    preprocess: dict  # the model's own preprocessing, by PREPROCESS_KEYS; None where it does not say
    categories: list[str] | None  # class names of the output, when the weights carry them
    weights: str  # what was loaded, for logs and the run's identity
    classifier: bool = True  # is "output" class scores (so top-k means something)?


def source_module(name: str):
    """The module of source `name` (pipeline/sources/<name>.py)."""
    if not name.isidentifier() or importlib.util.find_spec(f"pipeline.sources.{name}") is None:
        known = sorted(n[:-3] for n in os.listdir(os.path.dirname(__file__)) if n.endswith(".py") and n[0] != "_")
        raise UserError(f"unknown model.source {name!r}; choose one of {', '.join(known)}")
    return importlib.import_module(f"pipeline.sources.{name}")


def as_outputs(out) -> dict:
    """A network's result as the job's {"output", "embedding"}: a bare tensor is both."""
    return out if isinstance(out, dict) else {"output": out, "embedding": out}


class SameOutput(nn.Module):
    """A network whose one output is both the scores and the embedding (CLIP image towers, own modules)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, images):
        output = self.network(images)
        return {"output": output, "embedding": output}


def load_checkpoint(module: nn.Module, path: str) -> None:
    """A state_dict file (weights_only=True), also when wrapped as {"state_dict": …} or {"model": …}."""
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


def final_weights(net: nn.Module, settings, name: str, pretrained: str | None) -> str:
    """The weights the model ends with, as recorded in every file: model.checkpoint loaded over it, else
    the pretrained tag it was built with, else its seeded random init (warned)."""
    if settings.checkpoint:
        load_checkpoint(net, settings.checkpoint)
        return settings.checkpoint
    if pretrained:
        return pretrained
    log.warning("model.weights=null: %s has seeded random weights; its scores mean nothing", name)
    return "random-init"


def missing_weights(what: str, download: str, error: BaseException) -> UserError:
    """Pretrained weights that are neither cached nor downloadable (no network on a compute node)."""
    reason = " ".join(str(error).split())[:120] or type(error).__name__
    return UserError(f"cannot load pretrained weights {what} ({type(error).__name__}: {reason}); pre-download them "
                     f"where there is network ({download}) or pass model.checkpoint=<state_dict file>")


Builder = Callable[[dict], nn.Module]  # builds model.module's {_target_: …} (jobs/ passes Hydra's instantiate)


def build_module(spec: dict, build: Builder | None, what: str) -> nn.Module:
    """`spec` ({_target_: …, **arguments}) built by the job's `build`; what goes wrong is the user's to fix,
    said in one line naming `what` (model.module, the head's module)."""
    target = spec["_target_"]
    if build is None:
        raise UserError(f"{what} is built by the job: run it with python -m jobs.score")
    try:
        net = build(spec)
    except Exception as e:  # an import error, a wrong argument
        cause = e.__cause__ or e
        raise UserError(f"cannot build {what} {target}: {type(cause).__name__}: "
                        f"{' '.join(str(cause).split())[:200]}") from None
    if not isinstance(net, nn.Module):
        raise UserError(f"{what} {target} built a {type(net).__name__}, not a torch.nn.Module")
    return net
