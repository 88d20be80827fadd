"""python -m jobs.verify data.shards=… output.dir=…: is every input sample in the output exactly once?

Takes the same overrides as jobs.score; exits 0 only when the output is complete (and then writes
`_SUCCESS` if no rank has yet).
"""

from __future__ import annotations

import os

from jobs._entry import run_job, to_plain
from pipeline.errors import UserError
from pipeline.layout import OutputLayout, is_url
from pipeline.manifest import MANIFEST, SUCCESS, verify
from pipeline.shards import expand_shards


def main(cfg) -> int:
    config = to_plain(cfg)
    out_dir = config["output"]["dir"]
    if not (is_url(out_dir) or os.path.isdir(out_dir)):
        raise UserError(f"output.dir {out_dir} does not exist")
    layout = OutputLayout(out_dir)
    paths = expand_shards(config["data"]["shards"])
    complete, table, content = verify(paths, layout, config["data"].get("index_cache_dir"))
    print(table, flush=True)
    if complete and not layout.exists(SUCCESS):
        # No rank got to it (e.g. the last one was killed after its last commit).
        layout.write_json(MANIFEST, content)
        layout.write_json(SUCCESS, content)
    return 0 if complete else 1


if __name__ == "__main__":
    run_job(main)
