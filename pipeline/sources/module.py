"""Any nn.Module: built from `model.module` ({_target_: package.Class, **arguments}) by the job (Hydra's
instantiate), weights from `model.checkpoint` or a seeded random init. Its output is the scores and the
embedding; it says nothing about preprocessing, so every preprocessing key must be given."""

from __future__ import annotations

from pipeline.sources import Loaded, SameOutput, build_module, final_weights


def load(settings, want_embedding: bool, build=None) -> Loaded:
    net = build_module(settings.module, build, "model.module")
    return Loaded(SameOutput(net), {}, None, final_weights(net, settings, settings.module["_target_"], None))
