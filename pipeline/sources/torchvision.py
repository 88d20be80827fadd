"""torchvision classifiers by name: named weights, a checkpoint, or a seeded random init. Preprocessing
comes from the weights' own `transforms()` (those of the architecture's DEFAULT weights when the model
has none loaded); the embedding is the input of the final classifier layer."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from pipeline.errors import UserError
from pipeline.sources import Loaded, final_weights, missing_weights


def load(settings, want_embedding: bool, build=None) -> Loaded:
    name = settings.name
    if name not in torchvision.models.list_models():
        raise UserError(f"unknown model {name!r}; torchvision has e.g. resnet18, resnet50, efficientnet_b3, "
                        "vit_b_16 (see torchvision.models.list_models()); other sources: model.source=timm|open_clip|module")
    enum = _weights_enum(name)
    named = _weights(enum, settings.weights, name) if settings.weights and not settings.checkpoint else None
    if named is not None:
        try:
            state = named.get_state_dict(progress=False, check_hash=True)
        except Exception as e:
            download = (f"python -c \"import torchvision; torchvision.models.get_model('{name}', "
                        f"weights='{settings.weights}')\" puts them in $TORCH_HOME")
            raise missing_weights(str(named), download, e) from None
        net = torchvision.models.get_model(name, weights=None, num_classes=len(named.meta["categories"]))
        net.load_state_dict(state)
        categories, weights = list(named.meta["categories"]), str(named)
    else:
        kwargs = {"num_classes": settings.num_classes} if settings.num_classes else {}
        net = torchvision.models.get_model(name, weights=None, **kwargs)
        weights, categories = final_weights(net, settings, name, None), None
    reference = named or (enum.DEFAULT if enum is not None else None)
    return Loaded(_Heads(net, want_embedding), _preprocess(reference), categories, weights)


class _Heads(nn.Module):
    """The network without its final classifier layer gives the pooled features; the layer applied to
    them gives the logits: one pass, both outputs."""

    def __init__(self, net: nn.Module, want_embedding: bool):
        super().__init__()
        self.net = net
        self.head = None
        if want_embedding:
            self.head = _detach_last_linear(net)

    def forward(self, images):
        if self.head is None:
            return {"output": self.net(images)}
        features = self.net(images)
        return {"output": self.head(features), "embedding": features}


def _detach_last_linear(net: nn.Module) -> nn.Module:
    """Replace the last nn.Linear (the classifier of torchvision's models) by Identity; return it. Checked
    on a probe input: the network must still give the same logits through the detached layer."""
    linears = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    unavailable = UserError("outputs=[embedding] is not available for this torchvision model: its last layer "
                            "is not a linear classifier; use outputs=[scores] or model.source=timm")
    if not linears:
        raise unavailable
    name, layer = linears[-1]
    net.eval()
    with torch.inference_mode():
        probe = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        expected = net(probe)
        parent = net.get_submodule(name.rpartition(".")[0])
        setattr(parent, name.rpartition(".")[2], nn.Identity())
        if not torch.allclose(layer(net(probe)), expected, rtol=1e-4, atol=1e-4):
            raise unavailable
    return layer


def _weights_enum(name: str):
    try:
        return torchvision.models.get_model_weights(name)
    except ValueError:
        return None


def _weights(enum, weights: str, name: str):
    if enum is None:
        raise UserError(f"torchvision has no pretrained weights for {name}; use model.weights=null or model.checkpoint")
    if weights == "DEFAULT":
        return enum.DEFAULT
    try:
        return enum[weights.split(".")[-1]]
    except KeyError:
        names = ", ".join(w.name for w in enum)
        raise UserError(f"unknown model.weights {weights!r} for {name}; choose one of {names}, DEFAULT or null") from None


def _preprocess(weights) -> dict:
    if weights is None:
        return {}
    t = weights.transforms()  # reads the weights' metadata; downloads nothing
    return {"resize_size": t.resize_size[0], "crop_size": t.crop_size[0], "mean": tuple(t.mean),
            "std": tuple(t.std), "interpolation": t.interpolation.value}
