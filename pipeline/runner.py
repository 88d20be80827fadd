"""The scoring run: one loop and its state (done shards, failures, signals, metrics, manifest).

State machine per rank: expand + index shards → skip the complete ones → stream the rest through
decoder → scorer → writer → write metrics → write the run manifest when the whole output is complete.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import torch

from pipeline import __version__
from pipeline import device as dev
from pipeline.autobatch import choose_batch_size
from pipeline.batch import ShardFailure
from pipeline.decode import Preprocess, SampleRules, choose_decoder, make_decoder
from pipeline.errors import EXIT_FAILED, EXIT_OK, EXIT_REQUEUE, OutOfMemoryAtOneRow, UserError
from pipeline.manifest import update_manifest
from pipeline.meter import Meter, write_metrics
from pipeline.model import load_model
from pipeline.scorer import Scorer
from pipeline.settings import ScoreSettings
from pipeline.shards import assign_to_rank, expand_shards, open_shard, rank_from_env
from pipeline.writer import ShardWriter

log = logging.getLogger(__name__)


class StopSignals:
    """First SIGTERM/SIGUSR1: finish the batch in flight, write complete shards, exit EXIT_REQUEUE.
    A second one exits at once; only hidden temporary files can be left, and the next run removes them."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received:
            log.warning("second signal %s: exiting now", name)
            os._exit(EXIT_REQUEUE)
        self.received = name
        log.warning("received %s: finishing the batch in flight, then stopping", name)


def score(settings: ScoreSettings, resolved_config: dict | None = None) -> int:
    """Score this rank's shards; returns the exit code. UserError propagates before any image is read."""
    device = dev.resolve_device(settings.device)
    precision = dev.resolve_precision(settings.precision, device)
    dtype = dev.DTYPES[precision]
    dev.configure(device, settings.seed)
    rank, world_size = rank_from_env(settings.dist)

    all_paths = expand_shards(settings.data.shards)
    my_paths = assign_to_rank(all_paths, rank, world_size)
    shards = [open_shard(p, settings.data.index_cache_dir) for p in my_paths]
    log.info("rank=%d/%d shards=%d of %d device=%s precision=%s", rank, world_size, len(shards),
             len(all_paths), dev.describe(device), precision)

    loaded = load_model(settings.model, device, dtype, settings.seed)
    m = settings.model
    context = f"model={m.name} precision={precision} image_size={m.crop_size}"
    auto_table = None
    batch_size = settings.batch_size
    if batch_size == "auto":
        batch_size, auto_table = choose_batch_size(loaded.module, m.crop_size, dtype, device, settings)

    metadata = {
        "model": m.name if not m.path else m.path, "weights": loaded.source, "precision": precision,
        "batch_size": batch_size, "version": __version__, "config": resolved_config or {},
    }
    readable = [s for s in shards if s.error is None]
    writer = ShardWriter(settings.output.dir, {s.name: s.count for s in readable}, metadata, m.topk,
                         loaded.categories, num_classes=_num_classes(loaded.module, m, device, dtype)
                         if settings.output.save_logits else None, match_keys=("model", "weights", "precision"))
    for s in shards:
        if s.error:
            log.error("shard failed shard=%s reason=%s", s.path, s.error)
            writer.fail(s.name, s.error)
    writer.remove_stale_temporaries([s.name for s in readable])
    todo = _shards_to_do(readable, writer, settings.output.overwrite)

    decoder_name = choose_decoder(settings.decoder, todo) if todo else settings.decoder
    scorer = Scorer(loaded.module, batch_size, m.topk, settings.output.save_logits, device, settings.oom, context)
    meter = Meter(sum(s.count for s in todo), device, settings.progress)
    exit_code, stopped_by, fallbacks, fatal = EXIT_OK, None, 0, None
    try:
        with StopSignals() as signals:
            if todo:
                stopped_by, fallbacks = _stream(todo, decoder_name, settings, batch_size, device, dtype, scorer, writer,
                                     meter, signals)
    except OutOfMemoryAtOneRow as e:  # re-raised once the metrics are written
        fatal = e
        exit_code = EXIT_FAILED
    finally:
        meter.close()

    summary = meter.summary()
    print(f"scored {summary['images']} images in {summary['seconds']:.1f} s: "
          f"{summary['sustained_images_per_sec']:.1f} images/s sustained", flush=True)
    remaining = writer.incomplete()
    if stopped_by and remaining:
        print(f"stopped by {stopped_by}: {len(remaining)} shard(s) remain; rerun with the same output.dir "
              "to resume", flush=True)
        exit_code = EXIT_REQUEUE
    elif remaining and exit_code == EXIT_OK:
        for name in remaining:
            writer.fail(name, "the decoder produced fewer rows than the index lists")
        exit_code = EXIT_FAILED
    if writer.failed:
        log.error("failed shards=%d: %s", len(writer.failed), ", ".join(sorted(writer.failed)))
        exit_code = exit_code or EXIT_FAILED

    metrics = {
        **summary, "rank": rank, "world_size": world_size, "batch_size": batch_size,
        "micro_batch": scorer.micro_batch, "min_micro_batch": scorer.policy.min_size,
        "oom_events": scorer.policy.events, "precision": precision, "device": str(device),
        "decoder": decoder_name, "model": metadata["model"], "shards_assigned": len(shards),
        "shards_skipped_complete": len(readable) - len(todo), "shards_written": len(writer.committed),
        "shards_failed": dict(sorted(writer.failed.items())), "shards_remaining": remaining if stopped_by else [],
        "rows_written": writer.rows_written, "status_counts": writer.status_counts,
        "dali_fallback_batches": fallbacks, "auto_batch_table": auto_table,
        "stopped_by": stopped_by, "exit_code": exit_code, "finished_at": time.time(),
    }
    path = write_metrics(settings.output.dir, rank, metrics)
    log.info("metrics=%s", path)
    update_manifest(all_paths, settings.output.dir, settings.data.index_cache_dir, metadata)
    if fatal is not None:
        raise fatal
    return exit_code


def _shards_to_do(shards, writer: ShardWriter, overwrite: bool):
    todo = []
    for s in shards:
        if overwrite:
            todo.append(s)
            continue
        done, why = writer.completeness(s.name)
        if done:
            writer.committed.append(s.name)
            continue
        if why != "no output yet":
            log.warning("redoing shard=%s reason=%s", s.name, why)
        todo.append(s)
    skipped = len(shards) - len(todo)
    if skipped:
        log.info("resume: %d shard(s) already complete, %d to do", skipped, len(todo))
    return todo


def _stream(todo, decoder_name, settings, batch_size, device, dtype, scorer, writer, meter, signals):
    """Decode → score → write until the input ends or a signal arrives; returns (signal name, fallbacks)."""
    m, d = settings.model, settings.data
    rules = SampleRules(tuple(e.lower() for e in d.image_extensions), d.label_extension, d.max_pixels)
    preprocess = Preprocess(m.resize_size, m.crop_size, m.mean, m.std, m.interpolation)
    decoder = make_decoder(decoder_name, todo, rules, preprocess, batch_size, device, dtype,
                           settings.loader.threads, settings.loader.prefetch)
    items = iter(decoder)
    try:
        while not signals.received:
            with meter.timing("input"):
                item = next(items, None)
            if item is None:
                break
            if isinstance(item, ShardFailure):
                writer.fail(item.shard, item.reason)
                continue
            with meter.timing("model"):
                predictions = scorer(item)
            with meter.timing("write"):
                writer.add(item.rows, predictions)
            meter.batch_done(item.n_valid, micro=scorer.micro_batch)
    finally:
        decoder.stop()
    return signals.received, getattr(decoder, "fallbacks", 0)


def _num_classes(module, m, device, dtype) -> int:
    with torch.inference_mode():
        x = torch.zeros((1, 3, m.crop_size, m.crop_size), device=device, dtype=dtype)
        return int(module(x.contiguous(memory_format=torch.channels_last)).shape[1])


__all__ = ["score", "UserError"]
