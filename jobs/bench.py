"""python -m jobs.bench mode=sweep|e2e [key=value …]: time the model alone at every batch size and
precision (sweep), or the whole job against baselines and its ceilings (e2e). See conf/bench.yaml."""

from __future__ import annotations

from hydra.utils import instantiate

from jobs._entry import run_job, to_plain
from pipeline.bench import BenchSettings, run_bench
from pipeline.settings import ScoreSettings, from_mapping


def main(cfg) -> int:
    config = to_plain(cfg)
    mode, bench = config.pop("mode"), from_mapping(BenchSettings, config.pop("bench"), "bench.")
    return run_bench(mode, from_mapping(ScoreSettings, config), bench, build=instantiate)


if __name__ == "__main__":
    run_job(main, config_name="bench")
