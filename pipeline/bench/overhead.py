"""mode=overhead: the pipeline's own cost per row and per shard, with decoding and the model made nearly free.

Per row: `shards` × `samples_per_shard` tiny JPEGs (+cls) and a TorchScript model that costs almost
nothing (average-pool → flatten → Linear(3, 1000)), resize = crop = the image size. The job's sustained
images/s is then its own ceiling on a GPU node, where nvJPEG and the model take the rest off the host:
reading, header checks, batching, Parquet. Beside it, `bare_loop` is the floor of any Python loop over
the same tars: tarfile reads every member and PIL opens every image's header, nothing more.

Per shard: the same rows as few big shards and as many small ones, each a whole `jobs.score` process
from index creation to the completion record; (wall(many) − wall(few)) / (many − few) is what one more
shard costs. The process start (imports) costs the same in both and varies by far more between runs
than 400 shards cost, so the job's own time from planning to the last file on disk (`job_seconds` in
its metrics) is reported beside the whole-process wall time. Every run is its own process (as a user
runs it), rounds interleave the variants, and the report gives medians of paired differences. Peak
RSS per process comes from wait4.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from pipeline.bench import BenchSettings
from pipeline.bench.report import format_overhead_table, write_json
from pipeline.cluster import cpus_available
from pipeline.pack import damage_scan, encode_jpeg, synthetic_image, write_shards
from pipeline.settings import ScoreSettings

log = logging.getLogger(__name__)


def run_overhead(settings: ScoreSettings, bench: BenchSettings) -> dict:
    o = bench.overhead
    root = os.path.join(bench.out_dir, "overhead")
    os.makedirs(os.path.join(root, "logs"), exist_ok=True)
    model = free_model(os.path.join(root, "free-model.pt"), 1000)
    embedder = free_model(os.path.join(root, "free-embedder.pt"), EMBEDDING_WIDTH)
    rows_dir = tiny_shards(os.path.join(root, f"rows-{o.shards}x{o.samples_per_shard}-{o.image_size}px"),
                           o.shards, o.samples_per_shard, o.image_size)
    job = JobRunner(root, model, embedder, o, settings)
    job.clean()  # what a benchmark that was stopped left
    rows: dict[str, list[dict]] = {v: [] for v in o.variants}
    shard_cost: dict[str, list[dict]] = {}
    layouts = {}
    if o.shard_cost:
        for count in o.shard_cost_layouts:
            layouts[count] = tiny_shards(os.path.join(root, f"shards-{count}x{o.shard_cost_rows // count}"),
                                         count, o.shard_cost_rows // count, o.image_size)
    print(f"mode=overhead: {o.shards} shards x {o.samples_per_shard} rows of {o.image_size}px JPEGs, "
          f"batch_size={o.batch_size}, {o.rounds} rounds; cpu={cpu_flags()}", flush=True)
    for r in range(o.rounds):
        turn = r % max(len(o.variants), 1)
        for name in list(o.variants)[turn:] + list(o.variants)[:turn]:
            if name == "bare_loop":
                result = bare_loop(rows_dir)
            else:
                result = job.rows(rows_dir, name.split("_")[1], r, embedding=name.endswith("_embedding"))
            rows[name].append(result)
            print(f"round={r + 1}/{o.rounds} variant={name} rows_per_sec={result['rows_per_sec']:.0f}", flush=True)
        # Paired per round; the order alternates, so drift over a round hits both layouts alike.
        for count, folder in (list(layouts.items())[:: 1 if r % 2 == 0 else -1]):
            for decoder in ("dali", "torch"):
                result = job.whole_process(folder, decoder, f"shards{count}-{decoder}-{r}")
                shard_cost.setdefault(f"{decoder}/{count}", []).append(result)
                print(f"round={r + 1}/{o.rounds} shards={count} decoder={decoder} wall={result['wall_seconds']:.2f}s "
                      f"peak_rss={result['peak_rss_mb']:.0f}MB", flush=True)
    report = summarise(o, rows, shard_cost)
    if o.storage_cost:
        from pipeline.bench.storage import storage_cost

        few = min(o.shard_cost_layouts)
        folder = layouts.get(few) or tiny_shards(os.path.join(root, f"shards-{few}x{o.shard_cost_rows // few}"),
                                                 few, o.shard_cost_rows // few, o.image_size)
        report["storage_cost"] = storage_cost(job, folder, o.rounds, o.storage_decoders)
    job.clean()
    if o.corrupt_cost:
        report["corrupt_cost"] = corrupt_cost(root, settings, o.rounds)
    print(format_overhead_table(report), flush=True)
    path = os.path.join(bench.out_dir, "overhead.json")
    write_json(report, path)
    print(f"wrote {path}", flush=True)
    return report


def corrupt_cost(root: str, settings: ScoreSettings, rounds: int, batch: int = 256) -> dict:
    """What one corrupt JPEG costs the DALI decoder in a batch of `batch` photo-like images: the same
    batch decoded clean and with one image whose scan is damaged (every check on its bytes passes, so
    only decoding finds it), interleaved over rounds; the difference of the medians."""
    from pipeline.decode import Preprocess, SampleRules, make_decoder
    from pipeline.shards import open_shard

    rng = np.random.default_rng(1)
    images = [encode_jpeg(synthetic_image(rng)) for _ in range(batch)]
    cut = list(images)
    cut[batch // 3] = damage_scan(cut[batch // 3])
    shards = {}
    for name, data in (("clean", images), ("one-cut", cut)):
        folder = os.path.join(root, f"corrupt-{name}")
        shutil.rmtree(folder, ignore_errors=True)
        path = write_shards(((f"{i:05d}", {"jpg": d}) for i, d in enumerate(data)), folder, batch, name)[0]
        shards[name] = open_shard(path)
    d = settings.data
    loader = replace(settings.loader, threads=settings.loader.threads or cpus_available())
    rules = SampleRules(tuple(e.lower() for e in d.image_extensions), d.label_extension, d.max_pixels)
    preprocess = Preprocess(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear")
    seconds: dict[str, list[float]] = {name: [] for name in shards}
    for _ in range(rounds):
        for name, shard in shards.items():
            decoder = make_decoder("dali", [shard], rules, preprocess, batch, torch.device("cpu"), torch.float32, loader,
                                   settings.oom)
            start = time.perf_counter()
            bad = sum(b.rows.status.count("decode_error") for b in decoder)
            seconds[name].append(time.perf_counter() - start)
            decoder.stop()
            assert bad == (name == "one-cut"), f"{name}: {bad} decode errors"
    clean, cut_s = statistics.median(seconds["clean"]), statistics.median(seconds["one-cut"])
    result = {"batch": batch, "seconds_clean": round(clean, 3), "seconds_one_corrupt": round(cut_s, 3),
              "seconds_per_corrupt_image": round(cut_s - clean, 3), "image_size": f"{preprocess.resize_size}px",
              "rounds": {k: [round(v, 3) for v in vals] for k, vals in seconds.items()}}
    print(f"corrupt image at B={batch}: {clean:.2f} s clean, {cut_s:.2f} s with one damaged JPEG → "
          f"{cut_s - clean:.2f} s per corrupt image", flush=True)
    return result


def summarise(o, rows: dict[str, list[dict]], shard_cost: dict[str, list[dict]]) -> dict:
    report = {"mode": "overhead", "cpu_flags": cpu_flags(), "cpu_count": os.cpu_count(), "rounds": o.rounds,
              "shards": o.shards, "samples_per_shard": o.samples_per_shard, "image_size": o.image_size,
              "batch_size": o.batch_size, "extra": list(o.extra), "variants": {}, "shard_cost": {}}
    for name, results in rows.items():
        report["variants"][name] = {"rows_per_sec": round(statistics.median(r["rows_per_sec"] for r in results)),
                                    "rounds": results}
    if "score_dali" in rows and "score_dali_embedding" in rows:
        ratios = [e["rows_per_sec"] / t["rows_per_sec"] for t, e in zip(rows["score_dali"], rows["score_dali_embedding"])]
        report["embedding_to_topk"] = round(statistics.median(ratios), 3)  # paired per round
    few, many = sorted(o.shard_cost_layouts)
    for decoder in ("dali", "torch"):
        if f"{decoder}/{few}" not in shard_cost:
            continue
        a, b = shard_cost[f"{decoder}/{few}"], shard_cost[f"{decoder}/{many}"]
        # Medians of the rounds' paired differences: steadier than differences of medians.
        wall = [(y["wall_seconds"] - x["wall_seconds"]) * 1000 / (many - few) for x, y in zip(a, b)]
        job = [(y["job_seconds"] - x["job_seconds"]) * 1000 / (many - few) for x, y in zip(a, b)]
        report["shard_cost"][decoder] = {
            "few": few, "many": many, "rows": o.shard_cost_rows,
            "wall_seconds_few": round(statistics.median(r["wall_seconds"] for r in a), 3),
            "wall_seconds_many": round(statistics.median(r["wall_seconds"] for r in b), 3),
            "ms_per_extra_shard": round(statistics.median(wall), 2),
            "ms_per_extra_shard_per_round": [round(v, 2) for v in wall],
            # The same without the process start (imports: ~5 s here, varying by ±0.7 s between runs).
            "job_ms_per_extra_shard": round(statistics.median(job), 2),
            "job_ms_per_extra_shard_per_round": [round(v, 2) for v in job],
            "peak_rss_mb_few": round(statistics.median(r["peak_rss_mb"] for r in a)),
            "peak_rss_mb_many": round(statistics.median(r["peak_rss_mb"] for r in b)),
            "rounds": {"few": a, "many": b},
        }
    return report


class JobRunner:
    """Runs `python -m jobs.score` over tiny shards with a free model, as its own process."""

    def __init__(self, root: str, model: str, embedder: str, o, settings: ScoreSettings):
        self.root, self.model, self.embedder, self.o = root, model, embedder, o
        threads = "null" if settings.loader.threads is None else settings.loader.threads
        self.loader = [f"loader.threads={threads}", f"loader.prefetch={settings.loader.prefetch}"]

    def args(self, folder: str, out: str, decoder: str, embedding: bool = False, shards: str | None = None) -> list[str]:
        o = self.o
        model = [f"model.path={self.embedder}", "outputs=[embedding]"] if embedding else [f"model.path={self.model}"]
        return [f"data.shards='{shards or folder + '/*.tar'}'", f"output.dir={out}", *model,
                f"model.resize_size={o.image_size}", f"model.crop_size={o.image_size}", "model.mean=[0.5,0.5,0.5]",
                "model.std=[0.5,0.5,0.5]", "model.interpolation=bilinear", f"batch_size={o.batch_size}",
                "precision=fp32", "device=cpu", f"decoder={decoder}", "progress=false", *self.loader, *o.extra]

    def run(self, args: list[str], name: str, env: dict | None = None, nofile: int | None = None) -> tuple[float, float]:
        """(wall seconds, peak RSS MB) of one jobs.score process (under an open-file limit `nofile`);
        raises when it fails."""
        log_path = os.path.join(self.root, "logs", f"{name}.log")
        limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))) if nofile else None
        with open(log_path, "w") as out:
            start = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-m", "jobs.score", *args], stdout=out, stderr=subprocess.STDOUT,
                                    cwd=self.root, env={**os.environ, **(env or {})}, preexec_fn=limit)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"jobs.score ({name}) ended with exit code {proc.returncode}; see {log_path}")
        return wall, usage.ru_maxrss / 1024

    def rows(self, folder: str, decoder: str, round_: int, embedding: bool = False) -> dict:
        name = f"{decoder}{'-embedding' if embedding else ''}"
        out = os.path.join(self.root, f"out-{name}")
        shutil.rmtree(out, ignore_errors=True)
        wall, rss = self.run(self.args(folder, out, decoder, embedding), f"rows-{name}-{round_}")
        metrics = read_rank_metrics(out)
        return {"rows_per_sec": metrics["sustained_images_per_sec"], "rows": metrics["images"],
                "whole_run_rows_per_sec": metrics["images_per_sec"], "wall_seconds": round(wall, 3),
                "peak_rss_mb": round(rss), "time_split_seconds": metrics.get("time_split_seconds")}

    def whole_process(self, folder: str, decoder: str, name: str, shards: str | None = None, env: dict | None = None,
                      extra: tuple[str, ...] = ()) -> dict:
        """One run from scratch, deleting nothing until the benchmark ends (`clean`): the shards hard-linked
        into a fresh folder (no index files yet), a fresh output folder. On a file system without a journal
        (this machine's ext4) creating a file steps over every inode deleted in the last minutes, so
        deleting one run's thousands of files just before the next would be timed as the next run's cost.
        `shards` (a spec) and `env` for the same shards elsewhere (their index files removed first)."""
        run = os.path.join(self.root, "runs", name)  # new: `clean` emptied runs/ before the first
        if shards is None:
            folder = link_shards(folder, os.path.join(run, "shards"))
        else:
            for idx in glob.glob(os.path.join(folder, "*.idx")):
                os.remove(idx)
        out = os.path.join(run, "out")
        wall, rss = self.run([*self.args(folder, out, decoder, shards=shards), *extra], name, env,
                             self.o.shard_cost_nofile)
        metrics = read_rank_metrics(out)
        return {"wall_seconds": round(wall, 3), "job_seconds": metrics.get("job_seconds"), "peak_rss_mb": round(rss),
                "rows": metrics["images"], "rows_per_sec": metrics["sustained_images_per_sec"]}

    def clean(self) -> None:
        shutil.rmtree(os.path.join(self.root, "runs"), ignore_errors=True)


def link_shards(folder: str, into: str) -> str:
    """`into` holding hard links to (or, across file systems, copies of) the tars of `folder`."""
    os.makedirs(into)
    for tar in glob.glob(os.path.join(folder, "*.tar")):
        target = os.path.join(into, os.path.basename(tar))
        try:
            os.link(tar, target)
        except OSError:
            shutil.copy(tar, target)
    return into


def read_rank_metrics(out: str) -> dict:
    for folder in ("_metrics", "metrics"):
        path = os.path.join(out, folder, "rank-00000.json")
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
    raise RuntimeError(f"no rank metrics under {out}")


def bare_loop(folder: str) -> dict:
    """The floor of a Python loop: tarfile reads each member, PIL opens each image's header."""
    rows, start = 0, time.perf_counter()
    for path in sorted(glob.glob(os.path.join(folder, "*.tar"))):
        with tarfile.open(path) as tar:
            for member in tar:
                data = tar.extractfile(member).read()
                if member.name.endswith(".jpg"):
                    with Image.open(io.BytesIO(data)) as image:
                        image.size  # noqa: B018 (the header is parsed here)
                    rows += 1
    seconds = time.perf_counter() - start
    return {"rows_per_sec": rows / seconds, "rows": rows, "wall_seconds": round(seconds, 3)}


def tiny_shards(folder: str, shards: int, per_shard: int, size: int) -> str:
    """`shards` shards of `per_shard` size×size JPEGs with a cls label each, made once and reused."""
    done = os.path.join(folder, ".complete")
    if os.path.exists(done):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(0)
    pool = [encode_jpeg(synthetic_image(rng, size, size)) for _ in range(64)]
    samples = ((f"{i:08d}", {"jpg": pool[i % len(pool)], "cls": str(i % 1000).encode()})
               for i in range(shards * per_shard))
    write_shards(samples, folder, per_shard, "tiny")
    open(done, "w").close()
    return folder


EMBEDDING_WIDTH = 768  # a ViT-B's


class FreeModel(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(3, width)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(x), 1))


def free_model(path: str, width: int) -> str:
    """A TorchScript model that costs almost nothing: average-pool → flatten → Linear(3, width)."""
    torch.manual_seed(0)
    torch.jit.script(FreeModel(width).eval()).save(path)
    return path


def cpu_flags() -> str:
    """The CPU's vector extensions that matter for these figures (they differ between machines)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    wanted = [f for f in flags if f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni")]
    return " ".join(wanted) or "no avx2"
