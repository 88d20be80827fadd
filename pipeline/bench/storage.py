"""bench.overhead.storage_cost: the same shards read from local disk and from S3-compatible object
storage. A local S3 API server (moto's server mode on 127.0.0.1, started here: no network) holds a
copy of the 4 × 1,000-row shards of the per-shard measurement; every round runs `jobs.score` over both,
each from scratch (the local index files removed, a fresh index cache for the S3 run, so both read
every shard to index it), then S3 once more with the index cached (a rerun), and with DALI, S3 staged on
local disk (`data.stage_dir`, from scratch); the report gives the medians of the rounds' paired ratios
S3 ÷ local.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time

from pipeline.errors import UserError

BUCKET = "shardscore-bench"


class LocalS3:
    """moto's S3 server on a free port of 127.0.0.1, with one bucket; `env` points boto/s3fs at it."""

    def __init__(self, bucket: str = BUCKET):
        self.bucket = bucket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}", "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        self._server = None
        self.fs = None

    def __enter__(self) -> LocalS3:
        try:
            import moto.server  # noqa: F401
            import s3fs
        except ImportError as e:
            raise UserError(f"a local S3 server needs moto[server] and s3fs ({e.name} is missing): "
                            "pip install -e '.[dev]'") from None
        self._server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.fs = s3fs.S3FileSystem(endpoint_url=self.env["AWS_ENDPOINT_URL"], key="testing", secret="testing")
        for _ in range(200):
            try:
                self.fs.mkdir(self.bucket)
                return self
            except Exception:  # noqa: BLE001 (not listening yet)
                if self._server.poll() is not None:
                    break
                time.sleep(0.1)
        self.__exit__()
        raise RuntimeError(f"the local S3 server did not start on 127.0.0.1:{self.port}")

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.terminate()
            self._server.wait()
            self._server = None

    def upload(self, paths: list[str], prefix: str) -> str:
        """Copies the files under s3://<bucket>/<prefix>/; returns the folder's URL."""
        for path in paths:
            self.fs.put(path, f"{self.bucket}/{prefix}/{os.path.basename(path)}")
        return f"s3://{self.bucket}/{prefix}"


def storage_cost(job, folder: str, rounds: int, decoders: tuple[str, ...] = ("dali", "torch")) -> dict:
    """`job` is the overhead benchmark's JobRunner; `folder` holds the shards."""
    shards = sorted(glob.glob(os.path.join(folder, "*.tar")))
    results: dict[str, dict[str, list[dict]]] = {d: {"local": [], "s3": [], "s3_cached": []} for d in decoders}
    if "dali" in results:
        results["dali"]["s3_staged"] = []
    with LocalS3() as s3:
        url = s3.upload(shards, os.path.basename(folder))
        cache = os.path.join(job.root, "s3-index-cache")
        remote = {"shards": f"{url}/*.tar", "env": s3.env, "extra": (f"data.index_cache_dir={cache}",)}
        for r in range(rounds):

            def run(place: str, decoder: str, **kw) -> None:
                result = job.whole_process(folder, decoder, f"storage-{place}-{decoder}-{r}", **kw)
                results[decoder][place].append(result)
                print(f"round={r + 1}/{rounds} storage={place} decoder={decoder} wall={result['wall_seconds']:.2f}s "
                      f"job={result['job_seconds']:.2f}s", flush=True)

            # The order alternates, so drift over a round hits both places alike.
            for place in ("local", "s3")[:: 1 if r % 2 == 0 else -1]:
                for decoder in decoders:
                    if place == "local":
                        run("local", decoder)
                        continue
                    shutil.rmtree(cache, ignore_errors=True)
                    run("s3", decoder, **remote)
                    run("s3_cached", decoder, **remote)  # again, the index cached: as a rerun finds it
                    if decoder == "dali":  # staged on local disk ahead of DALI (data.stage_dir), from scratch
                        shutil.rmtree(cache, ignore_errors=True)
                        staged = {**remote, "extra": (*remote["extra"], f"data.stage_dir={job.root}/stage")}
                        run("s3_staged", decoder, **staged)
    report = {"shards": len(shards), "rows": results[decoders[0]]["local"][0]["rows"]}
    for decoder, places in results.items():
        local = places["local"]
        report[decoder] = {"rounds": places}
        for place in [p for p in ("s3", "s3_cached", "s3_staged") if p in places]:
            report[decoder][place] = {
                "job_seconds_ratio": _median_ratio(places[place], local, "job_seconds"),
                "wall_seconds_ratio": _median_ratio(places[place], local, "wall_seconds"),
                "rows_per_sec_ratio": _median_ratio(local, places[place], "rows_per_sec"),  # local ÷ S3: slower is > 1
            }
    return report


def _median_ratio(a: list[dict], b: list[dict], key: str) -> float:
    return round(statistics.median(x[key] / y[key] for x, y in zip(a, b)), 3)
