"""python -m jobs.select output.dir=<scores> where="<SQL predicate>" [keep_list=…] [reshard.dir=…]: the
selected samples as a keep-list and/or new shards. See conf/select.yaml."""

from __future__ import annotations

from jobs._entry import run_job, to_plain
from pipeline.errors import UserError
from pipeline.select import SelectSettings, select
from pipeline.settings import from_mapping


def main(cfg) -> int:
    config = to_plain(cfg)
    output, data, duck = (dict(config.pop(key) or {}) for key in ("output", "data", "duckdb"))
    out_dir = output.pop("dir")
    for where, left in (("output.", output), ("data.", set(data) - {"shards", "index_cache_dir"}),
                        ("duckdb.", set(duck) - {"memory_limit", "threads"})):
        if left:
            raise UserError(f"unknown config key '{where}{sorted(left)[0]}'")
    values = {**config, **duck, "output_dir": str(out_dir), "shards": data.get("shards"),
              "index_cache_dir": data.get("index_cache_dir")}
    select(from_mapping(SelectSettings, values))
    return 0


if __name__ == "__main__":
    run_job(main, config_name="select", verbatim=("where",), quick_exit=True)
