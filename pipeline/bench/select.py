"""`jobs.bench mode=select`: a scored dataset of a million samples built here (tar shards with their
index files, a complete score folder, img2dataset-style metadata Parquet beside the shards), then timed:
`jobs.verify` over the scores, `jobs.select` with a predicate on two score columns, a keep-list joined
with the metadata, and resharding 30 % of the samples against `cp` of the same bytes (then `sync`). Each
measurement is a whole process (imports included), as a user would run it; medians over `rounds`, the
steps interleaved, each step's input read into the page cache just before it; with `cold`, the reshard
and `cp` again with their inputs evicted from the page cache.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.completeness import META_KEY
from pipeline.layout import MANIFEST, SUCCESS, shard_file
from pipeline.shard_index import create_index

log = logging.getLogger(__name__)

IDENTITY = {"model": "vit_b_16", "source": "torchvision", "weights": "IMAGENET1K_V1", "precision": "fp16",
            "outputs": ["topk(5)", "score"], "preprocess": {"resize_size": 256, "crop_size": 224}, "models": None}


@dataclass(frozen=True)
class SelectBenchSettings:
    samples: int = 1_000_000
    shard_size: int = 10_000
    payload_bytes: int = 1_500  # the image component of each sample (random bytes: nothing decodes them)
    fraction: float = 0.3  # of the samples the reshard keeps
    rounds: int = 3
    folder: str = "/tmp/shardscore-bench-select"  # the dataset is built once and kept here
    cold: bool = True  # also reshard and cp with their inputs evicted from the page cache

    def __post_init__(self):
        from pipeline.errors import UserError

        if min(self.samples, self.shard_size, self.payload_bytes, self.rounds) < 1 or not 0 < self.fraction < 1:
            raise UserError("bench.select.samples, shard_size, payload_bytes and rounds must be >= 1, fraction in (0, 1)")


def make_dataset(root: str, samples: int, shard_size: int, payload: int, workers: int = 2) -> dict:
    """Shards `shards/part-NNNNNN.tar` (an image and a json component per sample) with index files,
    their scores `scores/` (complete, with `_SUCCESS`) and metadata `meta/`; kept when already built."""
    done = os.path.join(root, "dataset.json")
    if os.path.exists(done):
        with open(done) as f:
            info = json.load(f)
        if (info["samples"], info["shard_size"], info.get("payload_bytes")) == (samples, shard_size, payload):
            return info
        shutil.rmtree(root)  # built with other parameters
    shards = -(-samples // shard_size)
    for sub in ("shards", "scores", "meta"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_make_shard, [(root, s, shard_size, min(shard_size, samples - s * shard_size), payload)
                                    for s in range(shards)]))
    names = [f"part-{s:06d}" for s in range(shards)]
    manifest = {"complete": True, "shards": shards, "shards_done": shards, "rows": samples, "failed": {},
                "remaining": [], **IDENTITY}
    for name in (MANIFEST, SUCCESS):
        with open(os.path.join(root, "scores", name), "w") as f:
            json.dump(manifest, f)
    info = {"root": root, "samples": samples, "shards": names, "shard_size": shard_size, "payload_bytes": payload,
            "tar_bytes": sum(os.path.getsize(os.path.join(root, "shards", f"{n}.tar")) for n in names)}
    with open(done, "w") as f:
        json.dump(info, f)
    return info


def _make_shard(args) -> None:
    root, s, size, n, payload = args
    rng = np.random.default_rng(s)
    name = f"part-{s:06d}"
    keys = [f"{s:06d}{i:05d}" for i in range(n)]
    noise = rng.bytes(payload * 4)
    tar = os.path.join(root, "shards", f"{name}.tar")
    with open(tar, "wb") as f:
        for i, key in enumerate(keys):
            start = int(rng.integers(0, payload * 3))
            jpg = b"\xff\xd8\xff" + noise[start:start + payload - 3]
            meta = json.dumps({"key": key, "caption": f"photo {i}"}).encode()
            for ext, data in (("jpg", jpg), ("json", meta)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
                f.write(info.tobuf(tarfile.USTAR_FORMAT))
                f.write(data + bytes(-len(data) % 512))
        f.write(bytes(1024))
    create_index(tar, os.path.join(root, "shards", f"{name}.idx"))
    ok = rng.random(n) >= 0.02
    status = np.where(ok, "ok", "decode_error")
    score = rng.normal(5.0, 1.0, n).astype(np.float32)
    top1 = rng.beta(4, 1.5, n).astype(np.float32)
    index = rng.integers(0, 1000, (n, 5)).astype(np.int32)
    offsets = pa.array(np.arange(0, 5 * n + 1, 5, dtype=np.int32))
    prob = (top1[:, None] * 0.5 ** np.arange(5, dtype=np.float32)).reshape(-1)
    mask = pa.array(~ok)
    table = pa.table({
        "key": pa.array(keys), "shard": pa.repeat(pa.scalar(name), n), "label": pa.nulls(n, pa.int64()),
        "status": pa.array(status), "error": pa.array(np.where(ok, None, "decode_error: not a JPEG")),
        "topk_index": pa.ListArray.from_arrays(offsets, pa.array(index.reshape(-1)), mask=mask),
        "topk_prob": pa.ListArray.from_arrays(offsets, pa.array(prob), mask=mask),
        "score": pa.array(score, mask=~ok),
    })
    stored = {**IDENTITY, "batch_size": 256, "version": "0.1.0", "rows": n,
              "status_counts": {"ok": int(ok.sum()), **({"decode_error": int(n - ok.sum())} if n > ok.sum() else {})},
              "config": {"data": {"shards": os.path.join(root, "shards", "part-*.tar")}}}
    table = table.replace_schema_metadata({META_KEY: json.dumps(stored).encode()})
    pq.write_table(table, os.path.join(root, "scores", shard_file(name)), compression="zstd",
                   use_dictionary=["shard", "status"], write_statistics=["key", "shard", "label", "status"])
    width = rng.integers(64, 2048, n)
    meta = pa.table({"key": pa.array(keys), "url": pc.binary_join_element_wise("https://example.com/", pa.array(keys), ""),
                     "caption": pa.array([f"photo {i}" for i in range(n)]), "width": pa.array(width),
                     "height": pa.array(rng.integers(64, 2048, n)), "sha256": pa.array([f"{k:0>64}" for k in keys])})
    pq.write_table(meta, os.path.join(root, "meta", f"{name}.parquet"), compression="zstd")


def run_select(settings: SelectBenchSettings, out_dir: str) -> dict:
    """Time verify, select, a join and a reshard against cp of the same bytes, whole processes, interleaved."""
    from pipeline.bench.overhead import cpu_flags

    data = make_dataset(settings.folder, settings.samples, settings.shard_size, settings.payload_bytes)
    root, work = data["root"], os.path.join(out_dir, "select-work")
    scores, shards = os.path.join(root, "scores"), os.path.join(root, "shards", "part-*.tar")
    threshold = _threshold(scores, settings.fraction, data["samples"])
    print(f"jobs.bench mode=select: {data['samples']:,} samples in {len(data['shards'])} shards "
          f"({data['tar_bytes'] / 1e9:.2f} GB); {settings.rounds} rounds; cpu={cpu_flags()}", flush=True)
    steps = {
        "verify": ["jobs.verify", f"data.shards={shards}", f"output.dir={scores}"],
        "select_two_columns": ["jobs.select", f"output.dir={scores}", "where=score > 6 AND topk_prob[1] > 0.5",
                               f"keep_list={work}/keep.parquet"],
        "join_metadata": ["jobs.select", f"output.dir={scores}", f"join={root}/meta/*.parquet", "where=width > 0",
                          f"keep_list={work}/joined.parquet"],
        "reshard": ["jobs.select", f"output.dir={scores}", f"where=score > {threshold:.4f}", f"reshard.dir={work}/new"],
    }
    inputs = {"verify": [scores], "select_two_columns": [scores], "join_metadata": [scores, f"{root}/meta"],
              "reshard": [scores, os.path.join(root, "shards")]}
    names = [*steps, "cp", "cp_sync", *(["reshard_cold", "cp_cold", "cp_cold_sync"] if settings.cold else [])]
    times: dict[str, list[float]] = {name: [] for name in names}

    def timed(args: list[str]) -> float:
        subprocess.run(["sync"], check=True)
        started = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"{args[0]} failed: {r.stderr[-2000:]}")
        return time.perf_counter() - started

    def cp_of(tars: list[str], cached: bool) -> tuple[float, float]:
        """cp of the reshard's tars, then sync: (cp, cp + sync)."""
        shutil.rmtree(f"{work}/cp", ignore_errors=True)
        os.makedirs(f"{work}/cp")
        subprocess.run(["sync"], check=True)
        (_warm if cached else _evict)(tars)
        started = time.perf_counter()
        subprocess.run(["cp", *tars, f"{work}/cp/"], check=True)
        copied = time.perf_counter() - started
        subprocess.run(["sync"], check=True)
        return copied, time.perf_counter() - started

    for _ in range(settings.rounds):
        for name, args in steps.items():
            shutil.rmtree(f"{work}/new", ignore_errors=True)
            os.makedirs(work, exist_ok=True)
            _warm(inputs[name])  # in the page cache, as cp's input is
            times[name].append(timed(args))
        tars = sorted(os.path.join(work, "new", n) for n in os.listdir(os.path.join(work, "new")) if n.endswith(".tar"))
        copied = sum(os.path.getsize(t) for t in tars)
        for name, value in zip(("cp", "cp_sync"), cp_of(tars, cached=True)):
            times[name].append(value)
        if settings.cold:  # both read their input from the disk: evicted from the page cache first
            shutil.rmtree(f"{work}/new", ignore_errors=True)
            subprocess.run(["sync"], check=True)
            _evict(inputs["reshard"])
            times["reshard_cold"].append(timed(steps["reshard"]))
            for name, value in zip(("cp_cold", "cp_cold_sync"), cp_of(tars, cached=False)):
                times[name].append(value)
    medians = {name: statistics.median(values) for name, values in times.items()}
    kept = pq.read_metadata(os.path.join(work, "new", "_selection.parquet")).num_rows
    report = {"mode": "select", "cpu_flags": cpu_flags(), "samples": data["samples"], "shards": len(data["shards"]),
              "reshard_kept": kept, "reshard_bytes": copied, "seconds": times, "medians": medians,
              "reshard_over_cp": medians["reshard"] / medians["cp"],
              "reshard_over_cp_sync": medians["reshard"] / medians["cp_sync"],
              **({"cold_reshard_over_cp_sync": medians["reshard_cold"] / medians["cp_cold_sync"]} if settings.cold else {})}
    with open(os.path.join(out_dir, "select.json"), "w") as f:
        json.dump(report, f, indent=2)
    for name, values in times.items():
        print(f"  {name:<20} median {medians[name]:6.2f} s   rounds {' '.join(f'{v:.2f}' for v in values)}")
    print(f"  reshard: {kept:,} samples, {copied / 1e6:.0f} MB; {report['reshard_over_cp']:.2f}x cp, "
          f"{report['reshard_over_cp_sync']:.2f}x cp + sync"
          + (f"; from the disk: {report['cold_reshard_over_cp_sync']:.2f}x cp + sync" if settings.cold else ""), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return report


def _files(paths: list[str]) -> list[str]:
    found = []
    for path in paths:
        if os.path.isdir(path):
            found += [os.path.join(d, n) for d, _, names in os.walk(path) for n in names]
        else:
            found.append(path)
    return found


def _warm(paths: list[str]) -> None:
    """Read the files, so that they are in the page cache (the kernel here evicts idle pages on its own)."""
    for path in _files(paths):
        with open(path, "rb", buffering=0) as f:
            while f.read(8 << 20):
                pass


def _evict(paths: list[str]) -> None:
    """Drop the files' (clean) pages from the page cache."""
    for path in _files(paths):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _threshold(scores: str, fraction: float, samples: int) -> float:
    """The score above which `fraction` of all samples lie."""
    values = np.sort(pq.read_table(scores, columns=["score"]).column("score").drop_null().to_numpy())
    return float(values[len(values) - int(fraction * samples)])
