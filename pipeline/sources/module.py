"""Any nn.Module: built from `model.module` ({_target_: package.Class, **arguments}) by the job (Hydra's
instantiate), weights from `model.checkpoint` or a seeded random init. Its output is the scores and the
embedding; it says nothing about preprocessing, so every preprocessing key must be given."""

from __future__ import annotations

from torch import nn

from pipeline.errors import UserError
from pipeline.sources import Loaded, SameOutput, final_weights


def load(settings, want_embedding: bool, build=None) -> Loaded:
    target = settings.module["_target_"]
    if build is None:
        raise UserError("model.source=module is built by the job from model.module: run it with python -m jobs.score")
    try:
        net = build(settings.module)
    except Exception as e:  # an import error, a wrong argument: the user's to fix
        cause = e.__cause__ or e
        raise UserError(f"cannot build model.module {target}: {type(cause).__name__}: "
                        f"{' '.join(str(cause).split())[:200]}") from None
    if not isinstance(net, nn.Module):
        raise UserError(f"model.module {target} built a {type(net).__name__}, not a torch.nn.Module")
    return Loaded(SameOutput(net), {}, None, final_weights(net, settings, target, None))
