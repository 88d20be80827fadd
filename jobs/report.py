"""python -m jobs.report output.dir=…: a self-contained `<output.dir>/_report/index.html` about a run's
output (finished or still running) and a short summary on stdout. See conf/report.yaml."""

from __future__ import annotations

from jobs._entry import run_job, to_plain
from pipeline.errors import UserError
from pipeline.report import ReportSettings, write_report
from pipeline.settings import from_mapping


def main(cfg) -> int:
    config = to_plain(cfg)
    output = dict(config["output"])
    out_dir = output.pop("dir")
    if output:
        raise UserError(f"unknown config key 'output.{sorted(output)[0]}'; jobs.report reads output.dir only")
    write_report(from_mapping(ReportSettings, {"output_dir": str(out_dir), **config["report"]}, "report."))
    return 0


if __name__ == "__main__":
    run_job(main, config_name="report", quick_exit=True)
