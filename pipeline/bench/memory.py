"""mode=memory: does a rank's memory stay flat over a night? One rank scores img2dataset-style shards
(`rows_per_shard` samples of jpg + txt + json each) with the free model, once over few shards and once over
many, with each decoder; a sampler reads the whole process tree's memory (the job and its decoder
workers) from /proc every `interval_s`: resident set, and its anonymous and file-backed parts (Slurm's
accounting and a cgroup's limit count both). Flat means: the many-shard run peaks where the few-shard run
does; the report gives each peak and the growth of anonymous memory from few to many shards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

from pipeline.bench.overhead import cpu_flags, free_model, read_rank_metrics
from pipeline.pack import encode_jpeg, synthetic_image, write_shards


def run_memory(settings, bench) -> dict:
    m = bench.memory
    root = os.path.join(bench.out_dir, "memory")
    os.makedirs(os.path.join(root, "logs"), exist_ok=True)
    model = free_model(os.path.join(root, "free-model.pt"), 1000)
    folder = caption_shards(os.path.join(root, f"shards-{max(m.shard_counts)}x{m.rows_per_shard}"),
                            max(m.shard_counts), m.rows_per_shard, m.image_size)
    print(f"mode=memory: {m.shard_counts} shards x {m.rows_per_shard} rows (jpg+txt+json, {m.image_size}px), "
          f"decoders {list(m.decoders)}; cpu={cpu_flags()}", flush=True)
    results = {}
    for decoder in m.decoders:
        for count in m.shard_counts:
            name = f"{decoder}-{count}"
            results[name] = one_run(root, folder, count, decoder, model, m, settings)
            r = results[name]
            print(f"decoder={decoder} shards={count} rows={r['rows']} peak_pss={r['peak_pss_mb']:.0f}MB "
                  f"peak_anon={r['peak_anon_mb']:.0f}MB peak_file={r['peak_file_mb']:.0f}MB "
                  f"peak_rss_sum={r['peak_rss_sum_mb']:.0f}MB main_rss={r['peak_main_rss_mb']:.0f}MB "
                  f"rows_per_sec={r['rows_per_sec']:.0f}", flush=True)
    few, many = min(m.shard_counts), max(m.shard_counts)
    summary = {}
    for decoder in m.decoders:
        a, b = results[f"{decoder}-{few}"], results[f"{decoder}-{many}"]
        summary[decoder] = {"peak_pss_mb_few": a["peak_pss_mb"], "peak_pss_mb_many": b["peak_pss_mb"],
                            "anon_growth": round(b["peak_anon_mb"] / a["peak_anon_mb"] - 1, 3),
                            "bytes_per_row_growth": round((b["peak_pss_mb"] - a["peak_pss_mb"]) * 2**20
                                                          / max(b["rows"] - a["rows"], 1), 1)}
        print(f"{decoder}: peak memory {a['peak_pss_mb']:.0f} MB ({few} shards) → {b['peak_pss_mb']:.0f} MB ({many}); "
              f"anonymous memory {summary[decoder]['anon_growth']:+.1%}", flush=True)
    report = {"mode": "memory", "cpu_flags": cpu_flags(), "rows_per_shard": m.rows_per_shard,
              "image_size": m.image_size, "runs": results, "summary": summary}
    path = os.path.join(bench.out_dir, "memory.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {path}", flush=True)
    return report


def one_run(root, folder, count, decoder, model, m, settings) -> dict:
    out = os.path.join(root, f"out-{decoder}-{count}")
    shutil.rmtree(out, ignore_errors=True)
    listing = os.path.join(root, f"first-{count}.txt")
    with open(listing, "w") as f:
        f.write("\n".join(os.path.join(folder, f"cap-{i:06d}.tar") for i in range(count)) + "\n")
    threads = "null" if settings.loader.threads is None else settings.loader.threads
    args = [f"data.shards={listing}", f"output.dir={out}", f"model.path={model}",
            f"model.resize_size={m.image_size}", f"model.crop_size={m.image_size}", "model.mean=[0.5,0.5,0.5]",
            "model.std=[0.5,0.5,0.5]", "model.interpolation=bilinear", f"batch_size={m.batch_size}", "precision=fp32",
            "device=cpu", f"decoder={decoder}", "progress=false", f"loader.threads={threads}", *m.extra]
    with open(os.path.join(root, "logs", f"{decoder}-{count}.log"), "w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "jobs.score", *args], stdout=log, stderr=subprocess.STDOUT,
                                cwd=root)
        sampler = TreeMemory(proc.pid, m.interval_s)
        code = proc.wait()
        sampler.stop()
        wall = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"jobs.score over {count} shards ({decoder}) ended with exit code {code}")
    metrics = read_rank_metrics(out)
    shutil.rmtree(out, ignore_errors=True)
    return {"rows": metrics["images"], "rows_per_sec": metrics["sustained_images_per_sec"],
            "wall_seconds": round(wall, 2), **sampler.peaks(), "series": sampler.series}


class TreeMemory:
    """Samples a process and its descendants from /proc/<pid>/smaps_rollup: the peaks (MB) of their summed
    proportional set size (a page shared by the job and its forked decoder workers counts once, as a
    cgroup counts it), its anonymous and file-backed parts, the summed RSS (shared pages counted in every
    process), and the main process's RSS alone."""

    def __init__(self, pid: int, interval_s: float):
        self.pid, self.interval_s = pid, interval_s
        self._peaks = {"peak_pss_mb": 0.0, "peak_anon_mb": 0.0, "peak_file_mb": 0.0, "peak_rss_sum_mb": 0.0,
                       "peak_main_rss_mb": 0.0}
        self.series: list[list[float]] = []  # [seconds, PSS MB, anonymous MB], about once a second
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def peaks(self) -> dict:
        return {k: round(v, 1) for k, v in self._peaks.items()}

    def _run(self) -> None:
        start = time.perf_counter()
        while not self._stop.is_set():
            total = {"pss": 0.0, "anon": 0.0, "file": 0.0, "rss_sum": 0.0}
            for i, pid in enumerate(self._tree()):
                rollup = _rollup(pid)
                if i == 0:
                    self._peaks["peak_main_rss_mb"] = max(self._peaks["peak_main_rss_mb"], rollup.get("Rss", 0))
                total["pss"] += rollup.get("Pss", 0)
                total["anon"] += rollup.get("Pss_Anon", 0)
                total["file"] += rollup.get("Pss_File", 0) + rollup.get("Pss_Shmem", 0)
                total["rss_sum"] += rollup.get("Rss", 0)
            for key, value in total.items():
                self._peaks[f"peak_{key}_mb"] = max(self._peaks[f"peak_{key}_mb"], value)
            now = time.perf_counter() - start
            if not self.series or now - self.series[-1][0] >= 1:
                self.series.append([round(now, 1), round(total["pss"]), round(total["anon"])])
            self._stop.wait(self.interval_s)

    def _tree(self) -> list[int]:
        found, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            try:
                for task in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{task}/children") as f:
                        todo += [int(c) for c in f.read().split()]
            except OSError:
                continue
        return found


def _rollup(pid: int) -> dict[str, float]:
    """The fields of /proc/<pid>/smaps_rollup, in MB (empty once the process is gone)."""
    values = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            next(f)
            for line in f:
                key, _, rest = line.partition(":")
                values[key] = int(rest.split()[0]) / 1024
    except OSError:
        pass
    return values


def caption_shards(folder: str, shards: int, per_shard: int, size: int) -> str:
    """img2dataset's layout: per sample a JPEG, its caption (txt) and its metadata (json); made once."""
    done = os.path.join(folder, ".complete")
    if os.path.exists(done):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(0)
    pool = [encode_jpeg(synthetic_image(rng, size, size)) for _ in range(64)]

    def samples():
        for i in range(shards * per_shard):
            key = f"{i // per_shard:05d}{i % per_shard:04d}"
            meta = {"url": f"https://example.com/images/{i}.jpg", "key": key, "caption": f"a photo of thing {i}",
                    "width": size, "height": size, "original_width": 640, "original_height": 480,
                    "status": "success", "error_message": None, "sha256": f"{i:064x}"}
            yield key, {"jpg": pool[i % len(pool)], "txt": meta["caption"].encode(), "json": json.dumps(meta).encode()}

    write_shards(samples(), folder, per_shard, "cap")
    open(done, "w").close()
    return folder
