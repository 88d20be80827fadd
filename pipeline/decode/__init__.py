"""Decoders: iterate this rank's shards as fixed-size Batches. `dali` and `torch` share the header checks
(`samples`), the preprocessing geometry and the normalisation (`assemble`)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch

from pipeline.batch import Batch, ShardFailure
from pipeline.decode.assemble import Preprocess
from pipeline.decode.samples import SampleRules
from pipeline.errors import UserError
from pipeline.shards import Shard

log = logging.getLogger(__name__)


@runtime_checkable
class Decoder(Protocol):
    """What the runner asks of a back-end (`make_decoder` gives one): fixed-size Batches, in shard order,
    each image decoded once and holding one view per preprocessing the decoder was given (in that order),
    and a ShardFailure for each shard it could not read to its end; `stop` ends its threads and workers
    (iterating after it is not allowed); and what decoding cost, for the metrics."""

    def __iter__(self) -> Iterator[Batch | ShardFailure]: ...

    def stop(self) -> None: ...

    @property
    def fallbacks(self) -> int:
        """Decode batches that failed on something other than memory, their images then judged one by one."""

    @property
    def oom_events(self) -> int:
        """Out-of-memory errors while decoding, each retried with memory released."""

    @property
    def reference_decodes(self) -> int:
        """Images the main decoder failed on that a reference decoder decoded, used in their place."""


def dali_reads(shard: Shard, staged: bool = False) -> bool:
    """DALI's webdataset reader takes plain tars, local or in S3 (through its AWS SDK, which uses the
    same AWS_* environment and config files as everything else here), or any remote one staged on local
    disk first (`data.stage_dir`)."""
    from pipeline.stage import can_stage

    return shard.is_plain_tar and (not shard.is_remote or shard.path.startswith("s3://") or (staged and can_stage(shard)))


# DALI's reader fetches each sample component of an s3:// shard with its own ranged request; the torch
# decoder streams a shard with one. Against a local S3 server that made a DALI job 14× slower (BENCHMARKS.md).
REMOTE_DALI = ("DALI reads object storage with one request per sample component (decoder=torch streams each "
               "shard with one request)")


def choose_decoder(name: str, shards: list[Shard], staged: bool = False) -> str:
    """`auto` → DALI when it imports and every shard is a local plain tar (or a remote one staged to local
    disk), else torch (said in the log)."""
    from pipeline.decode.dali import dali_available

    others = [s.path for s in shards if not dali_reads(s, staged)]
    remote = [s.path for s in shards if s.is_remote and not staged]
    if name == "dali":
        if not dali_available():
            raise UserError("decoder=dali but nvidia-dali is not installed; use decoder=torch or decoder=auto")
        if others:
            raise UserError(f"decoder=dali reads plain .tar shards, local or s3://, got {others[0]}; use decoder=torch")
        if remote:
            log.warning("decoder=dali on %s: %s; expect it to be slow", remote[0], REMOTE_DALI)
        return "dali"
    if name == "torch":
        return "torch"
    if not dali_available():
        log.warning("decoder=auto: nvidia-dali does not import; using decoder=torch")
        return "torch"
    if others:
        log.warning("decoder=auto: DALI cannot read %s (compressed, or neither local nor s3://); using decoder=torch",
                    others[0])
        return "torch"
    if remote:
        log.info("decoder=auto: %s is in object storage; %s: using decoder=torch", remote[0], REMOTE_DALI)
        return "torch"
    return "dali"


def make_decoder(name: str, shards: list[Shard], rules: SampleRules, preprocesses: list[Preprocess] | Preprocess,
                 batch_size: int, device: torch.device, dtype: torch.dtype, loader, oom, stager=None) -> Decoder:
    """The back-end `name` over `shards`, each image decoded once into one view per preprocessing (its
    branches: `preprocesses`); `loader` is LoaderSettings (threads, prefetch, DALI options),
    `oom` OomSettings (regrowth of the decode batch, injected errors), `stager` a pipeline.stage.Stager
    for remote shards (DALI only: the torch decoder streams them)."""
    if isinstance(preprocesses, Preprocess):
        preprocesses = [preprocesses]
    if name == "dali":
        from pipeline.decode.dali import DaliDecoder

        return DaliDecoder(shards, rules, preprocesses, batch_size, device, dtype, loader, oom, stager)
    from pipeline.decode.torch import TorchDecoder

    return TorchDecoder(shards, rules, preprocesses, batch_size, device, dtype, loader)


__all__ = ["Decoder", "Preprocess", "SampleRules", "choose_decoder", "make_decoder"]
