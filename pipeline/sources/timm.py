"""timm models by name (`timm.create_model`): a pretrained tag, a checkpoint, or a seeded random init.
Preprocessing comes from timm's resolved data config; the embedding is `forward_head(pre_logits=True)`."""

from __future__ import annotations

import math

from torch import nn

from pipeline.errors import UserError
from pipeline.sources import Loaded, final_weights, missing_weights


def load(settings, want_embedding: bool, build=None) -> Loaded:
    try:
        import timm
        from timm.data import ImageNetInfo, infer_imagenet_subset, resolve_model_data_config
    except ImportError:
        raise UserError("model.source=timm needs timm: pip install 'shardscore[models]'") from None
    name = settings.name
    full = f"{name}.{settings.weights}" if settings.weights and settings.weights != "DEFAULT" else name
    if not timm.is_model(full.split(".")[0]):
        raise UserError(f"unknown timm model {name!r} (see timm.list_models())")
    kwargs = {"num_classes": settings.num_classes} if settings.num_classes else {}
    pretrained = bool(settings.weights) and not settings.checkpoint
    download = (f"python -c \"import timm; timm.create_model('{full}', pretrained=True)\" fills the Hugging Face "
                "cache; then set HF_HUB_OFFLINE=1")
    try:
        net = timm.create_model(full, pretrained=pretrained, **kwargs)
    except RuntimeError as e:
        if "unknown model" in str(e).lower() or "invalid pretrained tag" in str(e).lower():
            raise UserError(f"unknown timm model or tag {full!r}: {' '.join(str(e).split())[:160]}") from None
        raise missing_weights(full, download, e) from None
    except Exception as e:  # huggingface_hub's errors when the hub cannot be reached
        raise missing_weights(full, download, e) from None
    weights = final_weights(net, settings, full, f"timm:{full}" if pretrained else None)
    categories = None
    if pretrained and net.num_classes:
        subset = infer_imagenet_subset(net)
        if subset:
            info = ImageNetInfo(subset)
            categories = [info.index_to_description(i) for i in range(net.num_classes)]
    return Loaded(_Heads(net, want_embedding), _preprocess(resolve_model_data_config(net)), categories, weights,
                  classifier=net.num_classes > 0)


class _Heads(nn.Module):
    def __init__(self, net: nn.Module, want_embedding: bool):
        super().__init__()
        self.net, self.want_embedding = net, want_embedding

    def forward(self, images):
        features = self.net.forward_features(images)
        result = {"output": self.net.forward_head(features)}
        if self.want_embedding:
            result["embedding"] = self.net.forward_head(features, pre_logits=True)
        return result


def _preprocess(config: dict) -> dict:
    _, height, width = config["input_size"]
    if height != width or config.get("crop_mode", "center") != "center":
        raise UserError(f"the model expects {height}x{width} input with crop_mode={config.get('crop_mode')}; shardscore "
                        "center-crops a square: give model.resize_size and model.crop_size")
    return {"resize_size": math.floor(height / config["crop_pct"]), "crop_size": height,
            "mean": tuple(config["mean"]), "std": tuple(config["std"]), "interpolation": config["interpolation"]}
