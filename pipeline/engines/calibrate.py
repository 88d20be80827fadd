"""precision=int8's calibration images: the first images of the run (its first shards in order, the same
on every rank, so that every rank asks for the same engine), decoded and preprocessed by the job's own
decoder, once per preprocessing, only when an engine is built without a calibration cache."""

from __future__ import annotations

import logging

import numpy as np
import torch

from pipeline.batch import OK, ShardFailure
from pipeline.decode import choose_decoder, make_decoder
from pipeline.errors import UserError
from pipeline.shards import open_shard, shard_name

log = logging.getLogger(__name__)


class CalibrationImages:
    def __init__(self, paths: list[str], settings, rules, batch_size: int, device: torch.device, dtype: torch.dtype):
        self.settings, self.rules, self.batch_size, self.device, self.dtype = settings, rules, batch_size, device, dtype
        self.images = settings.engine.calibration_images
        self.shards, have = [], 0
        for path in paths:  # enough leading shards to hold the images asked for
            shard = open_shard(path, settings.data.index_cache_dir)
            if shard.error is None:
                self.shards.append(shard)
                have += shard.count
            if have >= self.images:
                break
        self.identity = {"shards": [shard_name(s.path) for s in self.shards], "images": self.images}
        self._decoded: dict = {}

    def __call__(self, preprocess) -> np.ndarray:
        """[N, 3, S, S] float32: the images the model would see, bad samples left out."""
        if preprocess not in self._decoded:
            self._decoded[preprocess] = self._decode(preprocess)
        return self._decoded[preprocess]

    def _decode(self, preprocess) -> np.ndarray:
        s = self.settings
        try:
            name = choose_decoder(s.decoder, self.shards)
        except UserError:  # e.g. decoder=dali over remote shards, which the run stages: the torch decoder streams them
            name = "torch"
        decoder = make_decoder(name, self.shards, self.rules, [preprocess], self.batch_size, self.device, self.dtype,
                               s.loader, s.oom)
        rows, have = [], 0
        try:
            for item in decoder:
                if isinstance(item, ShardFailure):
                    continue
                ok = [i for i, status in enumerate(item.rows.status) if status == OK]
                rows.append(item.views[0][ok].float().contiguous().cpu().numpy())
                have += len(ok)
                if have >= self.images:
                    break
        finally:
            decoder.stop()
        if not have:
            raise UserError(f"precision=int8: no image of {', '.join(self.identity['shards'])} decodes, nothing to "
                            "calibrate on")
        images = np.concatenate(rows)[: self.images]
        log.info("int8 calibration: %d images from %d shard(s), decoder=%s", len(images), len(self.shards), name)
        return images
