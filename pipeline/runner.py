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
from pipeline.errors import EXIT_FAILED, EXIT_OK, EXIT_REQUEUE, OutOfMemoryAtOneRow
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
        self._pid = os.getpid()
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:  # a forked decoder worker (Slurm signals the whole step): not its call
            return
        name = signal.Signals(signum).name
        if self.received:
            log.warning("second signal %s: exiting now", name)
            os._exit(EXIT_REQUEUE)
        self.received = name
        log.warning("received %s: finishing the batch in flight, then stopping", name)


def score(settings: ScoreSettings, resolved_config: dict | None = None) -> int:
    """Score this rank's shards; returns the exit code. UserError propagates before any image is read."""
    return score_and_report_stop(settings, resolved_config)[0]


def score_and_report_stop(settings: ScoreSettings, resolved_config: dict | None = None) -> tuple[int, str | None]:
    """(exit code, the signal that stopped the run or None). Signals are caught from the start, so a
    stop during indexing or model loading also ends in EXIT_REQUEUE rather than a dead process."""
    with StopSignals() as signals:
        code = Runner(settings, resolved_config).run(signals)
    return code, signals.received


class Runner:
    """Owns one rank's run: setup (everything that can be a user error), the loop, the report."""

    def __init__(self, settings: ScoreSettings, resolved_config: dict | None = None):
        self.settings = settings
        self.device = dev.resolve_device(settings.device)
        self.precision = dev.resolve_precision(settings.precision, self.device)
        self.dtype = dev.DTYPES[self.precision]
        dev.configure(self.device, settings.seed)
        self.rank, self.world_size = rank_from_env(settings.dist)

        self.all_paths = expand_shards(settings.data.shards)
        my_paths = assign_to_rank(self.all_paths, self.rank, self.world_size)
        self.shards = [open_shard(p, settings.data.index_cache_dir) for p in my_paths]
        log.info("rank=%d/%d shards=%d of %d device=%s precision=%s", self.rank, self.world_size,
                 len(self.shards), len(self.all_paths), dev.describe(self.device), self.precision)

        m = settings.model
        self.loaded = load_model(m, self.device, self.dtype, settings.seed)
        self.auto_table = None
        self.batch_size = settings.batch_size
        if self.batch_size == "auto":
            self.batch_size, self.auto_table = choose_batch_size(self.loaded.module, m.crop_size, self.dtype,
                                                                 self.device, settings)
        self.metadata = {
            "model": m.path or m.name, "weights": self.loaded.source, "precision": self.precision,
            "batch_size": self.batch_size, "version": __version__, "config": resolved_config or {},
        }
        self.writer = self._make_writer()
        context = f"model={m.name} precision={self.precision} image_size={m.crop_size}"
        self.scorer = Scorer(self.loaded.module, self.batch_size, m.topk, settings.output.save_logits,
                             self.device, settings.oom, context)

    def _make_writer(self) -> ShardWriter:
        readable = [s for s in self.shards if s.error is None]
        m, out = self.settings.model, self.settings.output
        num_classes = _num_classes(self.loaded.module, m.crop_size, self.device, self.dtype) if out.save_logits else None
        writer = ShardWriter(out.dir, {s.name: s.count for s in readable}, self.metadata, m.topk,
                             self.loaded.categories, num_classes, match_keys=("model", "weights", "precision"))
        for s in self.shards:
            if s.error:
                log.error("shard failed shard=%s reason=%s", s.path, s.error)
                writer.fail(s.name, s.error)
        writer.remove_stale_temporaries([s.name for s in readable])
        return writer

    def run(self, signals: StopSignals) -> int:
        readable = [s for s in self.shards if s.error is None]
        todo = _shards_to_do(readable, self.writer, self.settings.output.overwrite)
        self.decoder_name = choose_decoder(self.settings.decoder, todo) if todo else self.settings.decoder
        meter = Meter(sum(s.count for s in todo), self.device, self.settings.progress)
        stopped_by, fallbacks, fatal = None, 0, None
        try:
            if todo and not signals.received:
                stopped_by, fallbacks = self._stream(todo, meter, signals)
            stopped_by = signals.received
        except OutOfMemoryAtOneRow as e:  # raised again once the metrics are written
            fatal = e
        finally:
            meter.close()
        exit_code = self._report(meter, stopped_by, fallbacks, fatal, skipped=len(readable) - len(todo))
        if fatal is not None:
            raise fatal
        return exit_code

    def _stream(self, todo, meter: Meter, signals: StopSignals) -> tuple[str | None, int]:
        """Decode → score → write until the input ends or a signal arrives; returns (signal, DALI fallbacks)."""
        m, d = self.settings.model, self.settings.data
        rules = SampleRules(tuple(e.lower() for e in d.image_extensions), d.label_extension, d.max_pixels)
        preprocess = Preprocess(m.resize_size, m.crop_size, m.mean, m.std, m.interpolation)
        decoder = make_decoder(self.decoder_name, todo, rules, preprocess, self.batch_size, self.device, self.dtype,
                               self.settings.loader.threads, self.settings.loader.prefetch)
        items = iter(decoder)
        try:
            while not signals.received:
                with meter.timing("input"):
                    item = next(items, None)
                if item is None:
                    break
                if isinstance(item, ShardFailure):
                    self.writer.fail(item.shard, item.reason)
                    continue
                with meter.timing("model"):
                    predictions = self.scorer(item)
                with meter.timing("write"):
                    self.writer.add(item.rows, predictions)
                meter.batch_done(item.n_valid, micro=self.scorer.micro_batch)
        finally:
            decoder.stop()
        return signals.received, getattr(decoder, "fallbacks", 0)

    def _report(self, meter: Meter, stopped_by, fallbacks: int, fatal, skipped: int) -> int:
        """Print the summary, write metrics and the manifest; returns the exit code."""
        writer, summary = self.writer, meter.summary()
        print(f"scored {summary['images']} images in {summary['seconds']:.1f} s: "
              f"{summary['sustained_images_per_sec']:.1f} images/s sustained", flush=True)
        remaining = writer.incomplete()
        exit_code = EXIT_FAILED if fatal else EXIT_OK
        if stopped_by and remaining:
            print(f"stopped by {stopped_by}: {len(remaining)} shard(s) remain; rerun with the same output.dir "
                  "to resume", flush=True)
            exit_code = EXIT_REQUEUE
        elif remaining and not fatal:
            for name in remaining:
                writer.fail(name, "the decoder produced fewer rows than the index lists")
        if writer.failed:
            log.error("failed shards=%d: %s", len(writer.failed), ", ".join(sorted(writer.failed)))
            exit_code = exit_code or EXIT_FAILED
        print(f"output: {self.settings.output.dir} ({len(writer.committed)} of {len(self.shards)} shard(s) "
              "of this rank complete)", flush=True)
        s = self.scorer
        metrics = {
            **summary, "rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size,
            "micro_batch": s.micro_batch, "min_micro_batch": s.policy.min_size, "oom_events": s.policy.events,
            "precision": self.precision, "device": str(self.device), "decoder": self.decoder_name,
            "model": self.metadata["model"], "shards_assigned": len(self.shards), "shards_skipped_complete": skipped,
            "shards_written": len(writer.committed) - skipped, "shards_failed": dict(sorted(writer.failed.items())),
            "shards_remaining": remaining if stopped_by else [], "rows_written": writer.rows_written,
            "status_counts": writer.status_counts, "dali_fallback_batches": fallbacks,
            "auto_batch_table": self.auto_table, "stopped_by": stopped_by, "exit_code": exit_code,
            "finished_at": time.time(),
        }
        log.info("metrics=%s", write_metrics(self.settings.output.dir, self.rank, metrics))
        update_manifest(self.all_paths, self.settings.output.dir, self.settings.data.index_cache_dir, self.metadata)
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


def _num_classes(module, size: int, device, dtype) -> int:
    with torch.inference_mode():
        x = torch.zeros((1, 3, size, size), device=device, dtype=dtype)
        return int(module(x.contiguous(memory_format=torch.channels_last)).shape[1])

