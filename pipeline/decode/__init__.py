"""Decoders: iterate this rank's shards as fixed-size Batches. `dali` and `torch` share the header checks
(`samples`), the preprocessing geometry and the normalisation (`assemble`)."""

from __future__ import annotations

import logging

import torch

from pipeline.decode.assemble import Preprocess
from pipeline.decode.samples import SampleRules
from pipeline.errors import UserError
from pipeline.shards import Shard

log = logging.getLogger(__name__)


def choose_decoder(name: str, shards: list[Shard]) -> str:
    """`auto` → DALI when it imports and every shard is a plain tar, else torch (said in the log)."""
    from pipeline.decode.dali import dali_available

    if name == "dali":
        if not dali_available():
            raise UserError("decoder=dali but nvidia-dali is not installed; use decoder=torch or decoder=auto")
        compressed = [s.path for s in shards if not s.is_plain_tar]
        if compressed:
            raise UserError(f"decoder=dali reads plain .tar shards only, got {compressed[0]}; use decoder=torch")
        return "dali"
    if name == "torch":
        return "torch"
    if not dali_available():
        log.warning("decoder=auto: nvidia-dali does not import; using decoder=torch")
        return "torch"
    if not all(s.is_plain_tar for s in shards):
        log.warning("decoder=auto: some shards are compressed tars, which DALI cannot read; using decoder=torch")
        return "torch"
    return "dali"


def make_decoder(name: str, shards: list[Shard], rules: SampleRules, preprocess: Preprocess, batch_size: int,
                 device: torch.device, dtype: torch.dtype, loader, inject_oom_above: int | None = None):
    """The back-end `name` over `shards`; `loader` is LoaderSettings (threads, prefetch, DALI options)."""
    if name == "dali":
        from pipeline.decode.dali import DaliDecoder as cls
    else:
        from pipeline.decode.torch import TorchDecoder as cls
    return cls(shards, rules, preprocess, batch_size, device, dtype, loader, inject_oom_above)


__all__ = ["Preprocess", "SampleRules", "choose_decoder", "make_decoder"]
