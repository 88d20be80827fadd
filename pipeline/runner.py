"""The scoring run of one rank: plan → loop → report.

`plan` is pure set-up (settings → shards, model, outputs, batch size; every user error surfaces here,
before any image is read) and the benchmark reuses it. The loop streams decoder → scorer → writer, and
writes batch N while batch N+1 runs on the device. The report writes the metrics and this rank's
completion record; whichever rank finds every rank complete writes `_SUCCESS`.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import time
from dataclasses import dataclass, replace

import torch

from pipeline import __version__, cluster
from pipeline import device as dev
from pipeline.autobatch import choose_batch_size
from pipeline.batch import OK, ShardFailure
from pipeline.decode import Decoder, Preprocess, SampleRules, choose_decoder, make_decoder
from pipeline.decode.dali import dali_available
from pipeline.engines import ENGINES, check_backend
from pipeline.engines.build import attach_engines
from pipeline.engines.calibrate import CalibrationImages
from pipeline.errors import EXIT_FAILED, EXIT_OK, EXIT_REQUEUE, OutOfMemoryAtOneRow, UserError
from pipeline.layout import OutputLayout, metrics_file, shard_file, shard_of
from pipeline.manifest import finish_rank, remove_success, run_key
from pipeline.meter import Meter, write_metrics
from pipeline.model import LoadedModel
from pipeline.models import ModelSet, PlannedModel, load_models, model_identities, preprocessings
from pipeline.sources import Builder
from pipeline.outputs import check_names
from pipeline.settings import ScoreSettings
from pipeline.stage import Stager, can_stage, check_stage_dir
from pipeline.shards import BackgroundOpening, Shard, assign_to_rank, expand_shards, open_shard, shard_name
from pipeline.completeness import META_KEY, run_identity
from pipeline.writer import ShardWriter

log = logging.getLogger(__name__)

# Batches between giving freed heap memory back to the system. Side by side over a million rows here, every
# 64 batches kept anonymous memory within 5 % from 10 to 100 shards and cost nothing measurable per row;
# every 16 cost ~6 % of the 24 px benchmark's rows/s (docs/BENCHMARKS.md).
TRIM_EVERY = 64


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


def score(settings: ScoreSettings, resolved_config: dict | None = None, build: Builder | None = None) -> int:
    """Score this rank's shards; returns the exit code. UserError propagates before any image is read."""
    return score_and_report_stop(settings, resolved_config, build)[0]


def score_and_report_stop(settings: ScoreSettings, resolved_config: dict | None = None,
                          build: Builder | None = None) -> tuple[int, str | None]:
    """(exit code, the signal that stopped the run or None). Signals are caught from the start, so a
    stop during indexing or model loading also ends in EXIT_REQUEUE rather than a dead process."""
    with StopSignals() as signals:
        code = Runner(plan(settings, resolved_config, build)).run(signals)
    return code, signals.received


@dataclass
class Plan:
    """Everything a run needs, decided before any image is read."""

    settings: ScoreSettings
    device: torch.device
    precision: str
    dtype: torch.dtype
    rank: int
    world_size: int
    shard_names: list[str]  # every shard of the run, all ranks
    shards: list[Shard]  # this rank's, opened (indexed and counted)
    models: list[PlannedModel]  # in the order they run
    preprocesses: list[Preprocess]  # the decoder's branches
    batch_size: int
    auto_table: list[dict] | None
    metadata: dict
    rules: SampleRules
    started: float  # perf_counter at the start of planning: the job's own time, imports aside
    build: Builder | None = None

    @property
    def loaded(self) -> LoadedModel:
        """The first model (in a one-model run, the model)."""
        return self.models[0].loaded

    @property
    def preprocess(self) -> Preprocess:
        return self.preprocesses[0]

    @property
    def outputs(self) -> list:
        """Every output kind of every model, in column order."""
        return [kind for m in self.models for kind in m.outputs]

    @property
    def model_label(self) -> str:
        return "+".join(m.label for m in self.models)


def plan(settings: ScoreSettings, resolved_config: dict | None = None, build: Builder | None = None) -> Plan:
    """Everything a run needs, from its settings; `build` makes model.module's object (Hydra's instantiate,
    passed by jobs/, so the library itself never imports Hydra)."""
    started = time.perf_counter()
    cluster.use_cpu_share()
    if settings.loader.threads is None:
        settings = replace(settings, loader=replace(settings.loader, threads=cluster.cpus_available()))
    device = cluster.resolve_device(settings.device)
    precision = dev.resolve_precision(settings.precision, device)
    dtype = dev.float_dtype(precision, device)
    dev.configure(device, settings.seed, precision)
    rank, world_size = cluster.rank_and_world(settings.dist)
    all_paths = expand_shards(settings.data.shards)
    mine = assign_to_rank(all_paths, rank, world_size)
    d, out = settings.data, settings.output
    check_names(settings.outputs)  # an unknown kind is a user error before the model is loaded
    if d.stage_dir:
        check_stage_dir(d.stage_dir)
    for name, m in settings.named_models:
        check_backend(m.engine_backend, precision, device, f"models.{name}" if name else "model")
    opening = BackgroundOpening(mine, d.index_cache_dir, settings.loader.threads)
    try:
        models = load_models(settings, device, dtype, build)
        if settings.decoder != "torch":
            dali_available()  # its import, meanwhile
    finally:
        opened = opening.wait()
    shards = [opened.get(p) or open_shard(p, d.index_cache_dir) for p in mine]
    log.info("rank=%d/%d shards=%d of %d device=%s precision=%s", rank, world_size, len(shards), len(all_paths),
             dev.describe(device), precision)
    batch_size, auto_table = settings.batch_size, None
    if batch_size == "auto":  # the decode batch every backbone fits; one with its own batch_size fits by its chunks
        swept = [m for m in models if m.branch is not None and m.settings.batch_size is None] or \
            [m for m in models if m.branch is not None]
        chosen = [choose_batch_size(m.loaded.module, m.loaded.preprocess.crop_size, dtype, device,
                                    _injected_into(settings, m.name)) for m in swept]
        batch_size, auto_table = min(chosen, key=lambda c: c[0])
    rules = SampleRules(tuple(e.lower() for e in d.image_extensions), d.label_extension, d.max_pixels,
                        tuple(c.lower() for c in out.keep_components))
    if any(m.settings.engine_backend in ENGINES for m in models) or precision == "int8":
        calibration = CalibrationImages(all_paths, settings, rules, batch_size, device, dtype) \
            if precision == "int8" else None
        attach_engines(models, settings, batch_size, device, dtype, precision, calibration)
    metadata = {**run_metadata(models, precision), "batch_size": batch_size, "version": __version__,
                "config": resolved_config or {}}
    return Plan(settings, device, precision, dtype, rank, world_size, [shard_name(p) for p in all_paths], shards,
                models, preprocessings(models), batch_size, auto_table, metadata, rules, started, build)


def _injected_into(settings: ScoreSettings, model: str | None) -> ScoreSettings:
    """The settings a model's batch-size sweep runs with: `oom.inject_model` names the one model that gets
    the injected out-of-memory errors."""
    if settings.oom.inject_model in (None, model):
        return settings
    return replace(settings, oom=replace(settings.oom, inject_above=None))


def run_metadata(models: list[PlannedModel], precision: str) -> dict:
    """The run's identity as every file records it: the model's own (one model), or each model's under
    `models` (several)."""
    identities = model_identities(models, precision)
    if models[0].name is None:
        return {**identities[None], "models": None}
    return {"model": None, "source": None, "weights": None, "precision": precision, "outputs": None,
            "preprocess": None, "models": identities}


class Runner:
    """Owns one rank's run: the loop and the report, from a Plan."""

    def __init__(self, p: Plan):
        self.p = p
        self.settings = p.settings
        readable = [s for s in p.shards if s.error is None]
        self.layout = OutputLayout(p.settings.output.dir)
        self.writer = ShardWriter(self.layout, {s.name: s.count for s in readable}, p.metadata, p.outputs,
                                  p.rules.keep)
        self._footers = _refuse_foreign_parquet(self.layout, readable, p.shard_names)
        for s in p.shards:
            if s.error:
                log.error("shard failed shard=%s reason=%s", s.path, s.error)
                self.writer.fail(s.name, s.error)
        self.writer.remove_stale_temporaries([s.name for s in readable])
        self.models = ModelSet(p.models, p.batch_size, p.device, p.dtype, p.precision, p.settings.oom,
                               p.settings.oom.inject_model)
        self.decoder_name = p.settings.decoder
        self._decoder, self._skipped, self._todo, self._staged = None, 0, 0, None

    def run(self, signals: StopSignals) -> int:
        readable = [s for s in self.p.shards if s.error is None]
        todo, write = _shards_to_do(readable, self.writer, self.settings.output.overwrite, self._footers,
                                    {m.name for m in self.p.models})
        if todo and write != {m.name for m in self.p.models}:
            self.models.run_only(write)
            self.writer.compute_only(self.models.outputs)
            log.info("models written=%s run=%s: the others' columns are kept from the files",
                     ",".join(m.label for m in self.models.writing), ",".join(m.label for m in self.models.running))
        if todo:
            self.decoder_name = choose_decoder(self.settings.decoder, todo, staged=bool(self.settings.data.stage_dir))
            remove_success(self.layout)
        self._skipped = len(readable) - len(todo)
        self._todo = len(todo)
        meter = Meter(sum(s.count for s in todo), self.p.device, self.settings.progress,
                      log_every_s=self.settings.log_every_s, on_refresh=self._running_metrics)
        stopped_by, decoder, fatal = None, None, None
        try:
            if todo and not signals.received:
                decoder = self._stream(todo, meter, signals)
            stopped_by = signals.received
        except OutOfMemoryAtOneRow as e:  # raised again once the metrics are written
            fatal = e
        finally:
            meter.close()
        exit_code = self._report(meter, stopped_by, decoder, fatal)
        if fatal is not None:
            raise fatal
        return exit_code

    def _stream(self, todo: list[Shard], meter: Meter, signals: StopSignals) -> Decoder:
        """Decode → score → write until the input ends or a signal arrives; returns the decoder."""
        p, d = self.p, self.settings.data
        stager = None
        if d.stage_dir and any(can_stage(s) for s in todo):
            if self.decoder_name == "dali":
                stager = Stager(todo, d.stage_dir, d.stage_ahead)
            else:
                log.info("data.stage_dir is not used: decoder=torch streams remote shards itself")
        preprocesses = [p.preprocesses[b] for b in self.models.branches]  # those of the models run
        try:
            decoder = make_decoder(self.decoder_name, todo, p.rules, preprocesses, p.batch_size, p.device, p.dtype,
                                   self.settings.loader, self.settings.oom, stager)
        except BaseException:
            if stager is not None:
                stager.close()
            raise
        self._decoder = decoder
        items = iter(decoder)
        pending = None  # (rows, host copy of their outputs) of the batch before the one on the device
        try:
            while not signals.received:
                with meter.timing("input"):
                    item = next(items, None)
                if item is None:
                    break
                if isinstance(item, ShardFailure):
                    self.writer.fail(item.shard, item.reason)
                    continue
                for view in item.views:
                    dev.consume(view, item.ready)
                with meter.timing("model"):
                    host = dev.HostCopy(self.models.forward(item.views, item.n_valid), p.device)
                if pending is not None:
                    self._write(pending, meter)
                pending = (item.rows, host)
                meter.batch_done(item.n_valid, errors=item.n_valid - item.rows.status.count(OK),
                                 oom_events=self.models.oom_events + decoder.oom_events,
                                 micro=self.models.micro_batch)
                if meter.batches % TRIM_EVERY == 0:  # keeps a night's heap from creeping up
                    dev.trim_host_memory()
        finally:
            decoder.stop()
            if stager is not None:
                stager.close()
                self._staged = stager.stats()
            if pending is not None:
                self._write(pending, meter)
        return decoder

    def _metrics(self, summary: dict, decoder: Decoder | None) -> dict:
        """What `_metrics/rank-NNNNN.json` says, while running and at the end."""
        p, models, writer = self.p, self.models, self.writer
        per_model = models.stats()
        return {
            **summary, "rank": p.rank, "world_size": p.world_size, "batch_size": p.batch_size,
            "micro_batch": models.micro_batch, "min_micro_batch": min(m["min_micro_batch"] for m in per_model.values()),
            "oom_events": models.oom_events, "models": per_model if p.models[0].name else None,
            "engines": {label: m["engine"] for label, m in per_model.items() if "engine" in m} or None,
            "precision": p.precision, "device": str(p.device), "decoder": self.decoder_name,
            "model": p.model_label, "shards_assigned": len(p.shards), "shards_skipped_complete": self._skipped,
            "shards_written": len(writer.committed) - self._skipped,
            "shards_failed": dict(sorted(writer.failed.items())), "rows_written": writer.rows_written,
            "status_counts": dict(writer.status_counts),
            "dali_fallback_batches": decoder.fallbacks if decoder else 0,
            "decode_oom_events": decoder.oom_events if decoder else 0,
            "dali_reference_decodes": decoder.reference_decodes if decoder else 0, "auto_batch_table": p.auto_table,
            "log_every_s": self.settings.log_every_s, "loader_threads": self.settings.loader.threads,
            "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "device_name": dev.describe(p.device), "device_id": dev.physical_id(p.device), "staged": self._staged,
        }

    def _running_metrics(self, summary: dict) -> None:
        metrics = {**self._metrics(summary, self._decoder), "running": True, "updated_at": time.time()}
        write_metrics(self.layout, self.p.rank, metrics)

    def _write(self, pending, meter: Meter) -> None:
        rows, host = pending
        with meter.timing("write"):
            self.writer.add(rows, host.wait())

    def _report(self, meter: Meter, stopped_by, decoder: Decoder | None, fatal) -> int:
        """Print the summary, write the metrics and this rank's completion record; returns the exit code."""
        writer, p = self.writer, self.p
        writer.sync()  # every file handed to the writer thread is on disk (or its shard failed) from here
        summary = meter.summary()
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
            remaining = []
        if writer.failed:
            log.error("failed shards=%d: %s", len(writer.failed), ", ".join(sorted(writer.failed)))
            exit_code = exit_code or EXIT_FAILED
        out_dir = self.settings.output.dir
        print(f"output: {out_dir} ({len(writer.committed)} of {len(p.shards)} shard(s) of this rank complete)",
              flush=True)
        metrics = {
            **self._metrics(summary, decoder), "running": False, "shards_remaining": remaining,
            "stopped_by": stopped_by, "exit_code": exit_code,
            # from planning (shard indexing included) to every file on disk
            "job_seconds": round(time.perf_counter() - p.started, 3), "finished_at": time.time(),
        }
        if self._todo == 0 and not writer.failed and self.layout.exists(metrics_file(p.rank)):
            # Nothing was scored (a rerun over a complete output): the runs that did the work keep their record.
            log.info("nothing to score: this rank's metrics from the run that scored its shards are kept")
        else:
            log.info("metrics=%s", write_metrics(self.layout, p.rank, metrics))
        writer.close()
        status_counts: collections.Counter = collections.Counter()
        for done in writer.committed.values():
            status_counts.update(done["status_counts"])
        identity = run_identity(p.metadata)
        record = {
            "rank": p.rank, "world_size": p.world_size, "run": run_key(identity, p.shard_names, p.world_size),
            "identity": identity, "shards": len(p.shards), "done": len(writer.committed),
            "shards_done": sorted(writer.committed),
            "failed": dict(sorted(writer.failed.items())), "remaining": remaining,
            "rows": sum(done["rows"] for done in writer.committed.values()), "status_counts": dict(status_counts),
            "complete": len(writer.committed) == len(p.shards), "finished_at": time.time(),
        }
        finish_rank(self.layout, record, p.metadata)
        return exit_code


def _refuse_foreign_parquet(layout: OutputLayout, shards: list[Shard], run_shards: list[str]) -> dict[str, tuple]:
    """Never overwrite what is not ours: a Parquet file in the output folder without shardscore's metadata
    (an img2dataset folder holds `00000.parquet`, say) stops the run before any work. This rank checks the
    files of its own shards and those no shard of the run would write; each rank checks its own. Returns
    the footers read, by shard name, for resume to use (a shard of ours without a file is not in it)."""
    own = {s.name for s in shards}
    of_run = set(run_shards)
    footers = {}
    for name in layout.shard_files():
        if shard_of(name) in own or shard_of(name) not in of_run:
            meta, why = layout.read_footer(name)
            if meta is None or META_KEY not in (meta.metadata or {}):
                raise UserError(f"output.dir holds {layout.path(name)}, a Parquet file shardscore did not write "
                                f"({why or 'no shardscore metadata'}); move it away or choose another output.dir")
            footers[shard_of(name)] = (meta, why)
    return footers


def _shards_to_do(shards: list[Shard], writer: ShardWriter, overwrite: bool, footers: dict[str, tuple],
                  models: set) -> tuple[list[Shard], set]:
    """(the shards to score, the models to write). With several models, a shard whose file holds some of
    them under the same identity keeps their columns, and only the others are written; a file holding a
    model the run no longer has is a user error unless output.overwrite."""
    if overwrite:
        return list(shards), models
    todo, write, keeping = [], set(), 0
    for s in shards:
        footer = footers.get(s.name, (None, "no output yet"))
        done, why = writer.resume(s.name, footer)
        if done:
            continue
        kept, dropped = writer.kept_and_dropped(s.name, footer)
        if dropped:
            raise UserError(f"{writer.layout.path(shard_file(s.name))} holds model(s) {', '.join(dropped)} that this "
                            "run does not have: add them back to models:, or give output.overwrite=true to rescore "
                            "every shard without them")
        if kept:
            writer.keep_columns(s.name)
            keeping += 1
        elif why != "no output yet":
            log.warning("redoing shard=%s reason=%s", s.name, why)
        write |= models - kept
        todo.append(s)
    skipped = len(shards) - len(todo)
    if skipped:
        log.info("resume: %d shard(s) already complete, %d to do", skipped, len(todo))
    if keeping:
        log.info("resume: %d shard(s) to do keep the columns of the models they hold", keeping)
    return todo, write


