"""jobs.bench: the sweep's tables, files and recommendation; injected OOM; the e2e variants over the same images."""

from __future__ import annotations

import csv
import json
import os
import statistics

import pytest
import torch

from conftest import TINY, run_cli
from pipeline import device as dev
from pipeline.bench import BenchSettings, E2ESettings
from pipeline.bench.sweep import resolve_precisions
from pipeline.bench.e2e import select_shards, throughput_bound
from pipeline.errors import UserError
from pipeline.settings import DataSettings

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_sweep(out):
    with open(out / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return rows, json.loads((out / "sweep.json").read_text())


def smallest_within(points, tolerance):
    ok = [p for p in points if not p["oom"]]
    best = max(p["images_per_sec"] for p in ok)
    return min(p["batch"] for p in ok if p["images_per_sec"] >= (1 - tolerance) * best)


class Ran:
    def __init__(self, returncode: int, stdout: str):
        self.returncode, self.stdout = returncode, stdout


def bench(tmp_path, capsys, *overrides: str) -> Ran:
    """jobs.bench in this process: the config composed as the CLI composes it, then the library call."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from jobs._entry import CONF_DIR, to_plain
    from pipeline.bench import run_bench
    from pipeline.settings import ScoreSettings, from_mapping

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("bench", overrides=[*overrides, f"paths.root={tmp_path}"])
    config = to_plain(cfg)
    mode, settings = config.pop("mode"), from_mapping(BenchSettings, config.pop("bench"), "bench.")
    capsys.readouterr()
    code = run_bench(mode, from_mapping(ScoreSettings, config), settings, build=instantiate)
    return Ran(code, capsys.readouterr().out)


def test_sweep_writes_table_files_and_a_consistent_recommendation(tmp_path, capsys):
    r = bench(tmp_path, capsys, "mode=sweep", *TINY, "bench.max_batch_size=8", "bench.precisions=[fp32,bf16]",
              "bench.repeats=2", f"bench.out_dir={tmp_path}")
    assert r.returncode == 0
    assert "batch |  ms/batch |  images/s |  peak MB" in r.stdout
    rows, report = read_sweep(tmp_path)
    assert [(e["backend"], e["precision"]) for e in report["series"]] == [("eager", "fp32"), ("eager", "bf16")]
    for entry in report["series"]:
        points = entry["points"]
        assert [p["batch"] for p in points] == [1, 2, 4, 8]
        assert all(not p["oom"] and p["images_per_sec"] > 0 and p["ms_per_batch"] > 0 and p["peak_mb"] > 0
                   for p in points)
        for p in points:  # the median of one run per pass; images/s is the batch over that time
            assert len(p["ms_per_pass"]) == 2
            assert p["ms_per_batch"] == pytest.approx(statistics.median(p["ms_per_pass"]), abs=1e-3)
            assert p["images_per_sec"] == pytest.approx(p["batch"] * 1000 / p["ms_per_batch"], rel=0.01)
        assert entry["recommended"] == smallest_within(points, report["tolerance"])
        assert entry["best_batch"] == max(points, key=lambda p: p["images_per_sec"])["batch"]
        flagged = [int(row["batch"]) for row in rows if row["precision"] == entry["precision"]
                   and row["recommended"] == "True"]
        assert flagged == [entry["recommended"]]
        chosen_line = next(ln for ln in r.stdout.splitlines() if ln.strip().startswith(f"{entry['recommended']} |")
                           and "<- chosen" in ln)
        assert chosen_line
    assert len(rows) == 8
    assert (tmp_path / "sweep.png").read_bytes()[:8] == PNG_MAGIC


def test_sweep_profiles_each_backend_and_precision_with_its_build_time(tmp_path, capsys):
    """bench.backends=[eager,onnxruntime] × [fp32,int8]: three series (int8 is for engines only); each engine
    point carries the seconds its engine took to build; the peak per back-end is printed; a second sweep
    loads every engine from the cache."""
    args = ["mode=sweep", *TINY, "bench.max_batch_size=4", "bench.precisions=[fp32,int8]", "bench.repeats=1",
            "bench.backends=[eager,onnxruntime]", f"engine.cache_dir={tmp_path / 'engines'}",
            "engine.calibration_images=8", f"bench.out_dir={tmp_path}"]
    r = bench(tmp_path, capsys, *args)
    assert r.returncode == 0
    rows, report = read_sweep(tmp_path)
    assert [(e["backend"], e["precision"]) for e in report["series"]] == [
        ("eager", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8")]
    for entry in report["series"]:
        assert [p["batch"] for p in entry["points"]] == [1, 2, 4]
        engine = entry["backend"] == "onnxruntime"
        assert all(("build_s" in p and p["cache"] == "built" and p["build_s"] > 0) == engine for p in entry["points"])
    assert {row["backend"] for row in rows} == {"eager", "onnxruntime"} and len(rows) == 9
    peaks = [ln.lstrip("* ").split() for ln in r.stdout[r.stdout.index("peak images/s"):].splitlines()[1:4]]
    assert [p[:2] for p in peaks] == [["eager", "fp32"], ["onnxruntime", "fp32"], ["onnxruntime", "int8"]]
    assert sum(ln.startswith("*") for ln in r.stdout.splitlines()) == 2  # the best series of each back-end
    bench(tmp_path, capsys, *args)
    _, again = read_sweep(tmp_path)
    assert all(p["cache"] == "hit" for e in again["series"][1:] for p in e["points"])


def test_sweep_marks_the_first_oom_and_finishes(tmp_path, capsys):
    r = bench(tmp_path, capsys, "mode=sweep", *TINY, "oom.inject_above=4", "bench.max_batch_size=16",
              "bench.precisions=[fp32]", "bench.repeats=1", f"bench.out_dir={tmp_path}")
    assert r.returncode == 0
    rows, report = read_sweep(tmp_path)
    (entry,) = report["series"]
    # 8 rows run out of memory; 16 is never tried.
    assert [(p["batch"], p["oom"]) for p in entry["points"]] == [(1, False), (2, False), (4, False), (8, True)]
    assert entry["recommended"] in (1, 2, 4)
    assert [(row["batch"], row["oom"], row["images_per_sec"]) for row in rows][-1] == ("8", "True", "")
    assert any(ln.split("|")[0].strip() == "8" and "OOM" in ln for ln in r.stdout.splitlines())
    assert (tmp_path / "sweep.png").read_bytes()[:8] == PNG_MAGIC


def test_e2e_runs_every_variant_over_the_same_images(shards, tmp_path, capsys):
    r = bench(tmp_path, capsys, "mode=e2e", *TINY, f"data.shards=[{','.join(shards)}]", "batch_size=4",
              "bench.e2e.images=10", "bench.e2e.rounds=2", "bench.e2e.workers=1", f"bench.out_dir={tmp_path}")
    assert r.returncode == 0
    report = json.loads((tmp_path / "e2e.json").read_text())
    # 10 images asked: the leading whole shards that hold them, 9 + 9.
    assert report["images"] == 18 and report["shards"] == [os.path.abspath(p) for p in shards[:2]]
    assert report["batch_size"] == 4 and report["precision"] == "fp32"
    variants = report["variants"]
    assert list(variants) == ["naive", "dataloader", "score_dali", "score_torch", "decode_only", "model_only"]
    for name, v in variants.items():
        assert v["images"] == 18 and all(r["images"] == 18 for r in v["rounds"]), name
        assert v["images_per_sec"] > 0 and v["whole_run_images_per_sec"] > 0, name
        assert len(v["rounds"]) == 2, name
        assert v["ratio_to_score"] == pytest.approx(v["images_per_sec"] / variants["score_dali"]["images_per_sec"],
                                                    abs=1e-3)
    decode, model = variants["decode_only"]["images_per_sec"], variants["model_only"]["images_per_sec"]
    bound = report["bound"]
    assert bound["rule"] == "1/(1/decode + 1/model)"
    assert bound["images_per_sec"] == pytest.approx(1 / (1 / decode + 1 / model), abs=0.01)
    assert report["score_to_bound"] == pytest.approx(variants["score_dali"]["images_per_sec"]
                                                     / bound["images_per_sec"], abs=1e-3)
    for name in variants:
        assert any(ln.startswith(name) for ln in r.stdout.splitlines()), name
    assert "of the decode+model bound" in r.stdout
    assert (tmp_path / "e2e.png").read_bytes()[:8] == PNG_MAGIC
    assert os.listdir(tmp_path / "runs") == []  # every jobs.score run's output folder is removed


def test_bad_mode_is_a_user_error(tmp_path):
    r = run_cli("jobs.bench", "mode=train", *TINY, f"bench.out_dir={tmp_path}")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: mode must be one of sweep|e2e")
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("values, expected", [
    ({"precisions": ("fp8",)}, "bench.precisions"),
    ({"precisions": ()}, "bench.precisions"),
    ({"repeats": 0}, "bench.repeats"),
    ({"tolerance": 1.0}, "bench.tolerance"),
])
def test_bad_bench_settings(values, expected):
    with pytest.raises(UserError, match=expected):
        BenchSettings(out_dir="/tmp/x", **values)


def test_e2e_settings_reject_unknown_variant():
    with pytest.raises(UserError, match="bench.e2e.variants"):
        E2ESettings(variants=("naive", "pillow"))


@pytest.mark.parametrize("has_bf16, expected", [
    (False, {"fp32": ["fp32", "auto"]}),
    (True, {"fp32": ["fp32"], "bf16": ["auto"]}),
])
def test_auto_precision_is_measured_once(monkeypatch, has_bf16, expected):
    monkeypatch.setattr(dev, "cpu_has_bf16", lambda: has_bf16)
    assert resolve_precisions(["fp32", "auto"], torch.device("cpu")) == expected


def test_bound_shares_the_cpu_and_overlaps_on_cuda():
    assert throughput_bound(100.0, 100.0, torch.device("cpu")) == pytest.approx(50.0)
    assert throughput_bound(300.0, 150.0, torch.device("cpu")) == pytest.approx(100.0)
    assert throughput_bound(300.0, 150.0, torch.device("cuda")) == 150.0


@pytest.mark.parametrize("images, count", [(None, 3), (1, 1), (9, 1), (10, 2), (18, 2), (19, 3), (1000, 3)])
def test_e2e_takes_leading_whole_shards(shards, images, count):
    chosen = select_shards(DataSettings(shards=list(shards)), images)
    assert [s.path for s in chosen] == [os.path.abspath(p) for p in shards[:count]]


def test_overhead_mode_measures_rows_per_second_the_cost_per_shard_and_of_storage(tmp_path, capsys):
    """One run of mode=overhead with its storage measurement (a local S3 server) as well: every jobs.score
    is a process of its own there, so they are shared."""
    pytest.importorskip("moto")
    r = bench(tmp_path, capsys, "mode=overhead", f"bench.out_dir={tmp_path}", "bench.overhead.shards=2",
              "bench.overhead.samples_per_shard=96", "bench.overhead.batch_size=32", "bench.overhead.rounds=1",
              "bench.overhead.variants=[bare_loop,score_dali,score_dali_embedding]", "bench.overhead.corrupt_cost=false",
              "bench.overhead.shard_cost_rows=8", "bench.overhead.shard_cost_layouts=[1,4]",
              "bench.overhead.shard_cost_nofile=256", "bench.overhead.storage_cost=true",
              "bench.overhead.storage_decoders=[dali]")
    assert r.returncode == 0
    report = json.loads((tmp_path / "overhead.json").read_text())
    assert set(report["variants"]) == {"bare_loop", "score_dali", "score_dali_embedding"}
    topk, embedding = report["variants"]["score_dali"]["rounds"][0], report["variants"]["score_dali_embedding"]["rounds"][0]
    assert report["embedding_to_topk"] == round(embedding["rows_per_sec"] / topk["rows_per_sec"], 3)
    for name, v in report["variants"].items():
        (one,) = v["rounds"]
        assert one["rows"] == 192 and v["rows_per_sec"] == round(one["rows_per_sec"]) > 0
    for decoder in ("dali", "torch"):
        cost = report["shard_cost"][decoder]
        (few,), (many,) = cost["rounds"]["few"], cost["rounds"]["many"]
        assert cost["ms_per_extra_shard"] == round((many["wall_seconds"] - few["wall_seconds"]) * 1000 / 3, 2)
        assert cost["job_ms_per_extra_shard"] == round((many["job_seconds"] - few["job_seconds"]) * 1000 / 3, 2)
        assert few["peak_rss_mb"] > 0 and many["peak_rss_mb"] > 0
    assert "score_dali" in r.stdout and "ms per extra shard" in r.stdout

    storage = report["storage_cost"]
    assert storage["shards"] == 1 and storage["rows"] == 8 and "torch" not in storage
    c = storage["dali"]
    (local,), (remote,), (cached,), (staged,) = (c["rounds"][p] for p in ("local", "s3", "s3_cached", "s3_staged"))
    assert local["rows"] == remote["rows"] == cached["rows"] == staged["rows"] == 8
    assert c["s3"]["job_seconds_ratio"] == round(remote["job_seconds"] / local["job_seconds"], 3)
    assert c["s3_cached"]["wall_seconds_ratio"] == round(cached["wall_seconds"] / local["wall_seconds"], 3)
    assert c["s3_staged"]["wall_seconds_ratio"] == round(staged["wall_seconds"] / local["wall_seconds"], 3)
    assert "from a local S3 server" in r.stdout and "staged" in r.stdout


def test_memory_mode_reads_the_process_trees_memory(tmp_path, capsys):
    r = bench(tmp_path, capsys, "mode=memory", f"bench.out_dir={tmp_path}", "bench.memory.shard_counts=[1,3]",
              "bench.memory.rows_per_shard=50", "bench.memory.batch_size=32", "bench.memory.decoders=[torch]",
              "bench.memory.interval_s=0.02")  # often enough to see the short-lived decoder workers
    assert r.returncode == 0
    report = json.loads((tmp_path / "memory.json").read_text())
    few, many = report["runs"]["torch-1"], report["runs"]["torch-3"]
    assert few["rows"] == 50 and many["rows"] == 150
    for run in (few, many):
        assert run["peak_rss_sum_mb"] >= run["peak_main_rss_mb"] > 100 and run["peak_pss_mb"] > run["peak_anon_mb"] > 0
    assert many["peak_rss_sum_mb"] > many["peak_main_rss_mb"]  # the job's decoder workers were seen too
    assert report["summary"]["torch"]["anon_growth"] == round(many["peak_anon_mb"] / few["peak_anon_mb"] - 1, 3)
    assert "anonymous memory" in r.stdout


def test_models_mode_times_one_pass_against_three_runs(tmp_path, capsys):
    """mode=models, one small round: every variant runs (three processes for three_runs), each run wrote
    its rows, and the ratios are those of the rounds' figures."""
    r = bench(tmp_path, capsys, "mode=models", f"bench.out_dir={tmp_path}", "bench.models.images=24",
              "bench.models.shard_size=12", "bench.models.batch_size=8", "bench.models.rounds=1")
    assert r.returncode == 0
    report = json.loads((tmp_path / "models.json").read_text())
    v = report["variants"]
    assert set(v) == {"three_runs", "one_pass", "one_model", "embedder", "embedder_head"}
    (three,), (one,) = v["three_runs"]["rounds"], v["one_pass"]["rounds"]
    assert report["three_runs_over_one_pass"]["wall_seconds"] == round(three["wall_seconds"] / one["wall_seconds"], 3)
    (embedder,), (head,) = v["embedder"]["rounds"], v["embedder_head"]["rounds"]
    assert report["head_cost"]["job"] == round(head["job_seconds"] / embedder["job_seconds"], 3)
    assert all(x["rounds"][0]["rows_per_sec"] > 0 for x in v.values())
    assert "three runs / one pass" in r.stdout and report["preprocessings"][1] == [288, 256, "bicubic"]


def test_select_mode_times_verify_select_join_and_reshard_against_cp(tmp_path, capsys):
    ran = bench(tmp_path, capsys, "mode=select", "bench.select.samples=400", "bench.select.shard_size=100",
                "bench.select.rounds=1", f"bench.select.folder={tmp_path / 'data'}", f"bench.out_dir={tmp_path}")
    assert ran.returncode == 0
    report = json.loads((tmp_path / "select.json").read_text())
    assert set(report["medians"]) == {"verify", "select_two_columns", "join_metadata", "reshard", "cp", "cp_sync",
                                      "reshard_cold", "cp_cold", "cp_cold_sync"}
    assert report["cold_reshard_over_cp_sync"] == report["medians"]["reshard_cold"] / report["medians"]["cp_cold_sync"]
    assert 0.25 * 400 <= report["reshard_kept"] <= 0.35 * 400 and report["reshard_bytes"] > 100 * 1500
    assert all(len(v) == 1 and v[0] > 0 for v in report["seconds"].values())
    assert "cp + sync" in ran.stdout and "from the disk" in ran.stdout and not (tmp_path / "select-work").exists()
