"""`jobs.bench`: how fast is the model alone (mode=sweep), how close does the whole job get to its
ceilings (mode=e2e), what does the pipeline itself cost per row and per shard when decoding and
the model are made nearly free (mode=overhead), does a rank's memory stay flat (mode=memory), what does decoding once for several models save
(mode=models), and how fast are verify, select and resharding over a million rows (mode=select)? The settings and the dispatch live here; each mode has
its module, and `report` draws their tables and plots.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from pipeline.bench.select import SelectBenchSettings
from pipeline.errors import EXIT_FAILED, EXIT_OK, UserError
from pipeline.settings import BACKENDS, PRECISIONS, ScoreSettings

MODES = ("sweep", "e2e", "overhead", "memory", "models", "engines", "select")
E2E_VARIANTS = ("naive", "dataloader", "score_dali", "score_torch", "decode_only", "model_only")
OVERHEAD_VARIANTS = ("bare_loop", "score_dali", "score_torch", "score_dali_embedding")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


@dataclass(frozen=True)
class E2ESettings:
    """mode=e2e: which variants, how many rounds, over how many images."""

    variants: tuple[str, ...] = E2E_VARIANTS
    rounds: int = 3
    images: int | None = None  # None: every image of data.shards; N: the leading whole shards holding >= N
    workers: int = 2  # DataLoader workers of the `dataloader` variant

    def __post_init__(self):
        unknown = [v for v in self.variants if v not in E2E_VARIANTS]
        _check(not unknown and len(self.variants) > 0,
               f"bench.e2e.variants must be a non-empty list of {', '.join(E2E_VARIANTS)}; got {list(self.variants)}")
        _check(self.rounds >= 1, "bench.e2e.rounds must be >= 1")
        _check(self.images is None or self.images >= 1, "bench.e2e.images must be >= 1 or null")
        _check(self.workers >= 0, "bench.e2e.workers must be >= 0")


@dataclass(frozen=True)
class OverheadSettings:
    """mode=overhead: tiny JPEGs and a nearly free model, so the job's own per-row and per-shard cost shows."""

    variants: tuple[str, ...] = OVERHEAD_VARIANTS
    rounds: int = 3
    shards: int = 16
    samples_per_shard: int = 2000
    image_size: int = 24
    batch_size: int = 1024
    shard_cost: bool = True  # also time whole processes over few big and many small shards
    shard_cost_rows: int = 4000
    shard_cost_layouts: tuple[int, ...] = (4, 400)  # shard counts the rows are split into
    shard_cost_nofile: int | None = None  # the open-file limit of those processes (ulimit -n), e.g. 1024
    corrupt_cost: bool = True  # also: what one corrupt JPEG costs DALI in a batch of 256 photos
    storage_cost: bool = False  # also: the few-shards layout read from a local S3 server vs local disk (needs moto)
    storage_decoders: tuple[str, ...] = ("dali", "torch")
    extra: tuple[str, ...] = ()  # more jobs.score overrides for the score_* runs, e.g. [loader.threads=1]

    def __post_init__(self):
        unknown = [v for v in self.variants if v not in OVERHEAD_VARIANTS]
        _check(not unknown, f"bench.overhead.variants must be a list of {', '.join(OVERHEAD_VARIANTS)}; "
                            f"got {list(self.variants)}")
        _check(self.rounds >= 1, "bench.overhead.rounds must be >= 1")
        _check(self.shards >= 1 and self.samples_per_shard >= 1, "bench.overhead.shards and samples_per_shard must be >= 1")
        _check(self.image_size >= 8, "bench.overhead.image_size must be >= 8")
        _check(self.batch_size >= 1, "bench.overhead.batch_size must be >= 1")
        _check(len(self.shard_cost_layouts) == 2 and all(self.shard_cost_rows % n == 0 for n in self.shard_cost_layouts),
               "bench.overhead.shard_cost_layouts must be two shard counts that divide shard_cost_rows")


@dataclass(frozen=True)
class MemorySettings:
    """mode=memory: one rank's memory over few and many img2dataset-style shards."""

    shard_counts: tuple[int, ...] = (10, 100)
    rows_per_shard: int = 10000
    image_size: int = 24
    batch_size: int = 1024
    decoders: tuple[str, ...] = ("dali", "torch")
    interval_s: float = 0.1  # how often the process tree's memory is read
    extra: tuple[str, ...] = ()  # more jobs.score overrides

    def __post_init__(self):
        _check(len(self.shard_counts) == 2 and min(self.shard_counts) >= 1, "bench.memory.shard_counts must be two counts")
        _check(self.rows_per_shard >= 1 and self.image_size >= 8 and self.batch_size >= 1,
               "bench.memory.rows_per_shard, image_size (>= 8) and batch_size must be positive")
        _check(set(self.decoders) <= {"dali", "torch"} and self.decoders, "bench.memory.decoders: dali and/or torch")


@dataclass(frozen=True)
class ModelsBenchSettings:
    """mode=models: three models from one decode against three runs, over photo-size JPEGs, free models."""

    images: int = 4096
    shard_size: int = 1024
    batch_size: int = 128
    rounds: int = 5
    decoder: str = "dali"
    extra: tuple[str, ...] = ()  # more jobs.score overrides for every run

    def __post_init__(self):
        _check(self.images >= 1 and self.shard_size >= 1 and self.batch_size >= 1 and self.rounds >= 1,
               "bench.models.images, shard_size, batch_size and rounds must be >= 1")
        _check(self.decoder in ("dali", "torch"), "bench.models.decoder must be dali or torch")


@dataclass(frozen=True)
class EnginesBenchSettings:
    """mode=engines: eager against onnxruntime end to end per model, and fp32 against int8 on a fitted classifier."""

    models: tuple[str, ...] = ("resnet18", "resnet50", "vit")
    images: int = 1024
    shard_size: int = 512
    batch_size: int = 64
    rounds: int = 3
    decoder: str = "dali"
    int8: bool = True
    calibration_images: int = 512
    extra: tuple[str, ...] = ()  # more jobs.score overrides for every run

    def __post_init__(self):
        from pipeline.bench.engines import ARCHITECTURES

        _check(set(self.models) <= set(ARCHITECTURES),
               f"bench.engines.models must be among {', '.join(ARCHITECTURES)}; got {list(self.models)}")
        _check(min(self.images, self.shard_size, self.batch_size, self.rounds, self.calibration_images) >= 1,
               "bench.engines.images, shard_size, batch_size, rounds and calibration_images must be >= 1")
        _check(self.decoder in ("dali", "torch"), "bench.engines.decoder must be dali or torch")


@dataclass(frozen=True)
class BenchSettings:
    """The `bench:` node of conf/bench.yaml."""

    out_dir: str
    max_batch_size: int = 256
    precisions: tuple[str, ...] = ("fp32", "auto")
    backends: tuple[str, ...] = ("eager",)  # mode=sweep: eager | compile | onnxruntime | tensorrt (int8: engines only)
    repeats: int = 5
    warmup: int = 1
    tolerance: float = 0.03
    e2e: E2ESettings = field(default_factory=E2ESettings)
    overhead: OverheadSettings = field(default_factory=OverheadSettings)
    memory: MemorySettings = field(default_factory=MemorySettings)
    models: ModelsBenchSettings = field(default_factory=ModelsBenchSettings)
    engines: EnginesBenchSettings = field(default_factory=EnginesBenchSettings)
    select: SelectBenchSettings = field(default_factory=SelectBenchSettings)

    def __post_init__(self):
        _check(bool(self.out_dir), "bench.out_dir is required")
        _check(self.max_batch_size >= 1, "bench.max_batch_size must be >= 1")
        bad = [p for p in self.precisions if p not in PRECISIONS]
        _check(not bad and len(self.precisions) > 0,
               f"bench.precisions must be a non-empty list of {', '.join(PRECISIONS)}; got {list(self.precisions)}")
        _check(len(self.backends) > 0 and set(self.backends) <= set(BACKENDS),
               f"bench.backends must be a non-empty list of {', '.join(BACKENDS)}; got {list(self.backends)}")
        _check(self.repeats >= 1, "bench.repeats must be >= 1")
        _check(self.warmup >= 0, "bench.warmup must be >= 0")
        _check(0 <= self.tolerance < 1, "bench.tolerance must be in [0, 1)")


def run_bench(mode: str, settings: ScoreSettings, bench: BenchSettings, build=None) -> int:
    """Run one benchmark mode, print its table, write its files under bench.out_dir; returns the exit code."""
    _check(mode in MODES, f"mode must be one of {'|'.join(MODES)}, got {mode!r}")
    os.makedirs(bench.out_dir, exist_ok=True)
    if mode == "sweep":
        from pipeline.bench.sweep import run_sweep

        report = run_sweep(settings, bench, build)
        return EXIT_OK if all(p["recommended"] is not None for p in report["series"]) else EXIT_FAILED
    if mode == "overhead":
        from pipeline.bench.overhead import run_overhead

        run_overhead(settings, bench)
        return EXIT_OK
    if mode == "models":
        from pipeline.bench.several import run_models

        run_models(settings, bench)
        return EXIT_OK
    if mode == "engines":
        from pipeline.bench.engines import run_engines

        run_engines(settings, bench)
        return EXIT_OK
    if mode == "select":
        from pipeline.bench.select import run_select

        run_select(bench.select, bench.out_dir)
        return EXIT_OK
    if mode == "memory":
        from pipeline.bench.memory import run_memory

        run_memory(settings, bench)
        return EXIT_OK
    from pipeline.bench.e2e import run_e2e

    run_e2e(settings, bench, build)
    return EXIT_OK
