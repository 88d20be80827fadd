"""Heads (`source: head`): a small module on another model's output (`input: clip.embedding`), e.g. an
aesthetic or NSFW predictor over a CLIP embedding. Built from `layers` (Linear widths after the input's,
`hidden_activation` between them) or from `module` ({_target_: …}, called on [batch, features]);
weights from `checkpoint` (a state_dict) or a seeded random init (warned). A head reads no image: it
has no preprocessing, and it runs on the device right after the model it reads."""

from __future__ import annotations

from torch import nn

from pipeline.errors import UserError
from pipeline.sources import Loaded, SameOutput, build_module, final_weights

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


def mlp(in_features: int, widths: tuple[int, ...], activation: str) -> nn.Sequential:
    """Linear layers in_features → widths[0] → … → widths[-1], `activation` between them (none: nothing, as
    in LAION's aesthetic predictor, whose dropouts are no-ops at inference)."""
    layers: list[nn.Module] = []
    for i, width in enumerate(widths):
        layers.append(nn.Linear(widths[i - 1] if i else in_features, width))
        if i < len(widths) - 1 and activation != "none":
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def load(settings, want_embedding: bool, build=None) -> Loaded:
    raise UserError("model.source=head reads another model's output: give it under models: with input: <model>.embedding")


def load_head(settings, in_features: int, build=None) -> Loaded:
    if settings.layers is not None:
        net, what = mlp(in_features, settings.layers, settings.hidden_activation), settings.label
    else:
        net, what = build_module(settings.module, build, "the head's module"), settings.module["_target_"]
    weights = final_weights(net, settings, what, None)
    return Loaded(SameOutput(net), {}, None, weights)
