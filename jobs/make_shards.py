"""python -m jobs.make_shards output_dir=… (input_dir=… | synthetic=N) [shard_size=1000]:
pack images into WebDataset shards with DALI index files."""

from __future__ import annotations

from jobs._entry import run_job
from pipeline.errors import UserError
from pipeline.pack import folder_samples, synthetic_samples, write_shards


def main(cfg) -> int:
    if bool(cfg.input_dir) == bool(cfg.synthetic):
        raise UserError("give exactly one of input_dir=<folder of images> and synthetic=<number of images>")
    if not cfg.output_dir:
        raise UserError("output_dir=<folder for the shards> is required")
    if int(cfg.shard_size) < 1:
        raise UserError("shard_size must be >= 1")
    samples = folder_samples(cfg.input_dir) if cfg.input_dir else synthetic_samples(int(cfg.synthetic), int(cfg.seed))
    paths = write_shards(samples, cfg.output_dir, int(cfg.shard_size), cfg.prefix)
    print(f"wrote {len(paths)} shard(s) to {cfg.output_dir}: {paths[0]} … (with .idx index files)")
    return 0


if __name__ == "__main__":
    run_job(main, config_name="make_shards")
