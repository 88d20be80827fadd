"""python -m jobs.verify data.shards=… output.dir=…: is every input sample in the output exactly once?

Takes the same overrides as jobs.score, plus verify.workers (processes; default the CPUs this process
may use) and verify.id. Exits 0 only when the output is complete (and then writes `_SUCCESS` if no rank
has yet). In a Slurm array (or with dist.rank/dist.world_size) each task checks its share of the shards;
the last to finish merges every task's record and prints the whole table (docs/SLURM.md).
"""

from __future__ import annotations

import os

from jobs._entry import run_job, to_plain
from pipeline.cluster import cpus_available, rank_and_world, verification_id
from pipeline.errors import UserError
from pipeline.layout import OutputLayout, is_url
from pipeline.settings import DistSettings, from_mapping
from pipeline.shards import expand_shards
from pipeline.verify import verify, write_success


def main(cfg) -> int:
    config = to_plain(cfg)
    out_dir = config["output"]["dir"]
    if not (is_url(out_dir) or os.path.isdir(out_dir)):
        raise UserError(f"output.dir {out_dir} does not exist")
    options = dict(config.get("verify") or {})
    workers, verification = options.pop("workers", None), options.pop("id", None)
    if options:
        raise UserError(f"unknown config key 'verify.{sorted(options)[0]}'; known keys: id, workers")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise UserError(f"verify.workers={workers!r}: give a number of processes >= 1")
    rank, world = rank_and_world(from_mapping(DistSettings, config.get("dist") or {}, "dist."))
    verification = verification_id(verification, world)
    layout = OutputLayout(out_dir)
    paths = expand_shards(config["data"]["shards"])
    complete, table, content = verify(paths, layout, config["data"].get("index_cache_dir"),
                                      workers or cpus_available(), rank, world, verification)
    print(table, flush=True)
    write_success(layout, content)
    return 0 if complete else 1


if __name__ == "__main__":
    run_job(main, config_name="verify", quick_exit=True)
