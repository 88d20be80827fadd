"""Typed settings reject what a user can get wrong before any work starts."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from jobs._entry import CONF_DIR, quote_brace_pattern, to_plain
from pipeline.errors import UserError
from pipeline.settings import ScoreSettings, from_mapping


def compose_config(*overrides):
    """The real configs, composed as a run composes them (with the hydra node, for ${hydra:…})."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["output.dir=/tmp/x", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.mark.parametrize("model", ["resnet18", "resnet50", "mobilenet_v3_small"])
@pytest.mark.parametrize("data", ["webdataset", "sample"])
def test_every_config_group_builds_settings(model, data):
    extra = ["data.shards=/tmp/x.tar"] if data == "webdataset" else []
    settings = from_mapping(ScoreSettings, to_plain(compose_config(f"model={model}", f"data={data}", *extra)))
    assert settings.model.name == model and settings.batch_size == 256
    if data == "sample":
        assert settings.data.shards.endswith("demo/shards/sample-{000000..000003}.tar")


def test_debug_tiny_overrides():
    settings = from_mapping(ScoreSettings, to_plain(compose_config("debug=tiny", "data.shards=/x.tar")))
    assert settings.model.crop_size == 64 and settings.precision == "fp32" and settings.model.weights is None


@pytest.mark.parametrize("change,message", [
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": "big"}, "batch_size"),
    ({"precision": "fp8"}, "precision"),
    ({"device": "tpu"}, "device"),
    ({"surprise": 1}, "unknown config key 'surprise'"),
    ({"model": {"name": "resnet18", "tokp": 5}}, "model.tokp"),
    ({"model": {"name": "resnet18", "resize_size": 10, "crop_size": 20}}, "resize_size"),
    ({"loader": {"threads": "two"}}, "loader.threads must be int"),
])
def test_bad_values_are_user_errors(change, message):
    base = {"data": {"shards": "/x.tar"}, "output": {"dir": "/o"}}
    with pytest.raises(UserError, match=message):
        from_mapping(ScoreSettings, {**base, **change})


def test_brace_patterns_typed_in_a_shell_reach_hydra_quoted():
    assert quote_brace_pattern("data.shards=/d/{000..009}.tar") == "data.shards='/d/{000..009}.tar'"
    assert quote_brace_pattern("output.dir=${oc.env:HOME}/x") == "output.dir=${oc.env:HOME}/x"
    assert quote_brace_pattern("batch_size=4,8") == "batch_size=4,8"
