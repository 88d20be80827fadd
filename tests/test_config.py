"""Every shipped config composes into valid settings, the way jobs/ builds them (no model is loaded)."""

from __future__ import annotations

import os

import pytest
from hydra import compose, initialize_config_dir

from jobs._entry import CONF_DIR, to_plain
from pipeline.settings import ScoreSettings, from_mapping

MODELS = sorted(f[:-5] for f in os.listdir(os.path.join(CONF_DIR, "model")) if f.endswith(".yaml") and f != "base.yaml")


@pytest.mark.parametrize("model", MODELS)
def test_every_model_config_composes(model, tmp_path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model}", "data.shards=x.tar", f"output.dir={tmp_path}",
                                           f"paths.root={tmp_path}"])
    settings = from_mapping(ScoreSettings, to_plain(cfg))
    assert settings.model.name and settings.model.source in ("torchvision", "timm", "open_clip")
    assert settings.model.resize_size is None  # preprocessing left to the model


def test_a_given_preprocessing_value_wins_over_none(tmp_path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["model=efficientnet_b3", "model.resize_size=288", "data.shards=x.tar",
                                           f"output.dir={tmp_path}", f"paths.root={tmp_path}", "outputs=[topk,embedding]"])
    settings = from_mapping(ScoreSettings, to_plain(cfg))
    assert settings.model.resize_size == 288 and settings.outputs == ("topk", "embedding")


def test_the_models_group_composes_the_worked_example(tmp_path):
    """conf/models/: every option together (CLIP, the aesthetic head on its embedding, a watermark
    classifier, a second backbone), each key of every model overridable by its path."""
    options = sorted(f[:-5] for f in os.listdir(os.path.join(CONF_DIR, "models")) if f.endswith(".yaml"))
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"+models=[{','.join(options)}]", "models.watermark.batch_size=64",
                                           "data.shards=x.tar", f"output.dir={tmp_path}", f"paths.root={tmp_path}"])
    settings = from_mapping(ScoreSettings, to_plain(cfg))
    assert sorted(settings.models) == options == ["aesthetic", "clip", "resnet50", "watermark"]
    names = [name for name, _ in settings.named_models]
    assert names.index("aesthetic") > names.index("clip") and settings.models["aesthetic"].input == "clip.embedding"
    assert settings.models["watermark"].batch_size == 64 and settings.models["clip"].outputs == ("embedding",)
