"""NVIDIA DALI back-end: `fn.readers.webdataset` reads each shard, `fn.decoders.image` decodes.

Two pipelines: a reader per shard (raw bytes, never fails on a bad image) and one decode pipeline
fed by `external_source`. Between them every sample's header is checked, so bad samples become error
rows instead of failing a whole DALI batch; a batch that still fails to decode (a truncated JPEG, say)
is decoded again one sample at a time so only the bad samples become error rows.
Device `mixed` (nvJPEG, output stays on the GPU) on CUDA, `cpu` otherwise: the same code.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from collections.abc import Callable, Iterator

import numpy as np
import torch

from pipeline.batch import OK, Batch, Row, ShardFailure
from pipeline.decode.assemble import BackgroundBatches, BatchAssembler, Preprocess
from pipeline.decode.samples import SampleRules, make_row, one_line
from pipeline.shards import Shard, read_index

log = logging.getLogger(__name__)

READER_BATCH = 128
INTERP = {"bilinear": "INTERP_LINEAR", "bicubic": "INTERP_CUBIC", "nearest": "INTERP_NN"}


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


class DaliDecoder:
    """Yields fixed-size Batches (and ShardFailures) for `shards`, in shard order."""

    def __init__(self, shards: list[Shard], rules: SampleRules, preprocess: Preprocess, batch_size: int,
                 device: torch.device, dtype: torch.dtype, threads: int, prefetch: int):
        self.shards = shards
        self.rules = rules
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype
        self.threads = max(1, threads)
        self.fallbacks = 0  # batches re-decoded one sample at a time
        self._background = BackgroundBatches(self._produce, prefetch)
        self._decode_pipe = None

    def __iter__(self) -> Iterator[Batch | ShardFailure]:
        return iter(self._background)

    def stop(self) -> None:
        self._background.stop()
        # The decoder and its thread refer to each other; left to the cycle collector, a DALI pipeline
        # can be destroyed inside a process forked later (a DataLoader worker) and hang there.
        self._decode_pipe = None

    def _produce(self, stopped: Callable[[], bool]) -> Iterator[Batch | ShardFailure]:
        self._decode_pipe = self._build_decode_pipeline()
        assembler = BatchAssembler(self.batch_size, self.preprocess, self.device, self.dtype)
        rows: list[Row] = []
        encoded: list[np.ndarray | None] = []
        for shard in self.shards:
            if stopped():
                return
            try:
                for row, data in self._read_shard(shard):
                    rows.append(row)
                    encoded.append(data)
                    if len(rows) == self.batch_size:
                        yield from assembler.add(rows, self._decode(rows, encoded))
                        rows, encoded = [], []
            except RuntimeError as e:
                log.error("shard failed shard=%s reason=%s", shard.path, one_line(e))
                yield ShardFailure(shard.name, one_line(e))
        if rows:
            yield from assembler.add(rows, self._decode(rows, encoded))
        yield from assembler.flush()

    def _read_shard(self, shard: Shard) -> Iterator[tuple[Row, np.ndarray | None]]:
        """Every index entry of the shard, in order, as (row, encoded image or None)."""
        entries = read_index(shard.index_path)
        exts = sorted({e for entry in entries for e in entry.components})
        image_exts = [e for e in exts if self.rules.is_image(e)]
        label_exts = [e for e in exts if self.rules.is_label(e)]
        reader = self._build_reader(shard, image_exts, label_exts, min(READER_BATCH, len(entries)))
        seen: set[str] = set()
        outputs: tuple = ()
        for i, entry in enumerate(entries):
            j = i % READER_BATCH if reader else 0
            if reader and j == 0:
                outputs = reader.run()
            has_image = any(e in entry.components for e in image_exts)
            image = np.array(outputs[0][j]) if has_image else None
            label = np.array(outputs[1][j]).tobytes() if reader and label_exts else None
            row = make_row(entry.key, shard.name, image.tobytes() if image is not None else None, label, self.rules, seen)
            yield row, image if row.status == OK else None

    def _build_reader(self, shard: Shard, image_exts: list[str], label_exts: list[str], batch: int):
        if not image_exts:
            return None
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=batch, num_threads=self.threads, device_id=None, prefetch_queue_depth=2)
        def reader():
            ext = [";".join(image_exts)] + ([";".join(label_exts)] if label_exts else [])
            return tuple(fn.readers.webdataset(
                paths=[shard.path], index_paths=[shard.index_path], ext=ext,
                missing_component_behavior="empty", dtypes=[types.UINT8] * len(ext),
                pad_last_batch=True, name="reader"))

        pipe = reader()
        pipe.build()
        return pipe

    def _build_decode_pipeline(self):
        from nvidia.dali import fn, pipeline_def, types

        p = self.preprocess
        gpu = self.device.type == "cuda"
        out_type = types.FLOAT16 if self.dtype == torch.float16 else types.FLOAT

        @pipeline_def(batch_size=self.batch_size, num_threads=self.threads,
                      device_id=(self.device.index or 0) if gpu else None, prefetch_queue_depth=1)
        def decode():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
            images = fn.resize(images, resize_shorter=p.resize_size, antialias=True,
                               interp_type=getattr(types, INTERP[p.interpolation]))
            return fn.crop_mirror_normalize(
                images, crop=(p.crop_size, p.crop_size), dtype=out_type, output_layout="CHW",
                mean=[m * 255 for m in p.mean], std=[s * 255 for s in p.std])

        pipe = decode()
        pipe.build()
        return pipe

    def _decode(self, rows: list[Row], encoded: list[np.ndarray | None]) -> list[torch.Tensor | None]:
        """Decoded images aligned with `rows` (None for error rows); marks rows that fail to decode."""
        todo = [i for i, data in enumerate(encoded) if data is not None]
        images: list[torch.Tensor | None] = [None] * len(rows)
        if not todo:
            return images
        decoded = self._try_decode([encoded[i] for i in todo])
        if decoded is not None:
            for i, image in zip(todo, decoded):
                images[i] = image
            return images
        # DALI cannot skip one sample inside a batch: find the bad ones by decoding one at a time.
        self.fallbacks += 1
        log.warning("DALI batch failed to decode; decoding its %d images one at a time", len(todo))
        for i in todo:
            decoded = self._try_decode([encoded[i]])
            if decoded is None:
                rows[i] = replace(rows[i], status="decode_error", error="corrupt or truncated image data (DALI)")
            else:
                images[i] = decoded[0]
        return images

    def _try_decode(self, encoded: list[np.ndarray]) -> list[torch.Tensor] | None:
        """None when DALI fails; the pipeline is rebuilt then, as a failed DALI pipeline is not reusable."""
        try:
            return self._run_decode(encoded)
        except (RuntimeError, IndexError) as e:
            log.debug("DALI decode failed: %s", one_line(e))
        self._decode_pipe = self._build_decode_pipeline()
        return None

    def _run_decode(self, encoded: list[np.ndarray]) -> list[torch.Tensor]:
        self._decode_pipe.feed_input("encoded", encoded)
        (out,) = self._decode_pipe.run()
        return list(to_torch(out.as_tensor(), self.device))


def to_torch(tensor, device: torch.device) -> torch.Tensor:
    """A DALI dense tensor as a torch tensor on `device`, without a host round-trip on CUDA."""
    if device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        result = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device=device)
        feed_ndarray(tensor, result, cuda_stream=torch.cuda.current_stream(device))
        return result
    return torch.from_numpy(np.array(tensor))
