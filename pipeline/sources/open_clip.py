"""open_clip image towers: `create_model(name, pretrained=tag)`, a checkpoint, or a seeded random init.
Only the image tower is kept; its output, `encode_image`, is the embedding (and the scores).
Preprocessing comes from the model's own preprocessing config."""

from __future__ import annotations

import logging

from pipeline.errors import UserError
from pipeline.sources import Loaded, SameOutput, final_weights, missing_weights

log = logging.getLogger(__name__)


def load(settings, want_embedding: bool, build=None) -> Loaded:
    try:
        import open_clip
    except ImportError:
        raise UserError("model.source=open_clip needs open_clip: pip install 'shardscore[models]'") from None
    name = settings.name
    if name not in open_clip.list_models():
        raise UserError(f"unknown open_clip model {name!r} (see open_clip.list_models())")
    pretrained = settings.weights if settings.weights and not settings.checkpoint else None
    try:
        model = open_clip.create_model(name, pretrained=pretrained)
    except RuntimeError as e:
        if pretrained and pretrained not in open_clip.list_pretrained_tags_by_model(name):
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
            raise UserError(f"unknown open_clip pretrained tag {pretrained!r} for {name}; known: {tags}") from None
        raise missing_weights(f"{name}/{pretrained}", f"python -c \"import open_clip; open_clip.create_model('{name}', "
                              f"pretrained='{pretrained}')\" fills the Hugging Face cache; then set HF_HUB_OFFLINE=1",
                              e) from None
    weights = final_weights(model, settings, name, pretrained and f"open_clip:{name}/{pretrained}")
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
    if cfg.get("resize_mode", "shortest") != "shortest":
        log.warning("open_clip %s resizes with resize_mode=%s; shardscore resizes the shorter side to %d and "
                    "center-crops", name, cfg["resize_mode"], size)
    preprocess = {"resize_size": size, "crop_size": size, "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]),
                  "interpolation": cfg["interpolation"]}
    return Loaded(SameOutput(model.visual), preprocess, None, weights, classifier=False)
