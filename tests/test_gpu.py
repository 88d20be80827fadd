"""The first-GPU checklist (docs/BENCHMARKS.md), in order. Marked `gpu`: skipped where CUDA is not
available, run by `make test` where it is. None of these has run yet: there is no GPU here. Each test
that scores runs in fp16 (the default on CUDA) and in fp32."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import ROOT, TINY, small_jpegs
from pipeline.pack import damage_scan, encode_jpeg, synthetic_image, write_shards
from pipeline.runner import score
from pipeline.settings import AutoBatchSettings, DataSettings, ModelSettings, OomSettings, OutputSettings, ScoreSettings

pytestmark = [pytest.mark.gpu, pytest.mark.dali]
PRECISIONS = ["fp16", "fp32"]


def settings(shard, out, device, precision="fp16", **kw) -> ScoreSettings:
    model = kw.pop("model", ModelSettings(name="resnet18", weights=None, resize_size=72, crop_size=64))
    return ScoreSettings(data=DataSettings(shards=shard), output=OutputSettings(dir=str(out)),
                         outputs=kw.pop("outputs", ("topk", "scores")), model=model, batch_size=kw.pop("batch_size", 8),
                         precision=precision, device=device, decoder="dali", progress=False, **kw)


def metrics(out) -> dict:
    return json.loads((out / "_metrics" / "rank-00000.json").read_text())


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return write_shards(small_jpegs(40, seed=31), str(tmp_path_factory.mktemp("gpu")), 40, "gpu")[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import torchvision

    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("ckpt") / "r18.pt"
    torch.save(torchvision.models.resnet18(num_classes=1000).eval().state_dict(), path)
    return ModelSettings(name="resnet18", checkpoint=str(path), resize_size=72, crop_size=64)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_1_cuda_end_to_end_through_dali_mixed(shard, tmp_path, precision):
    assert score(settings(shard, tmp_path, "cuda", precision)) == 0
    m = metrics(tmp_path)
    assert m["device"].startswith("cuda") and m["decoder"] == "dali" and m["images"] == 40
    assert m["precision"] == precision and m["time_split_seconds"]["model"] > 0  # CUDA events, read once complete
    assert all(s == "ok" for s in pq.read_table(tmp_path / "gpu-000000.parquet").column("status").to_pylist())


def test_2_two_ranks_at_once_each_on_its_own_gpu(tmp_path):
    """Two ranks at the same time (torchrun's variables), each with a shard of its own, each running DALI
    on its GPU: the physical GPUs (UUIDs) differ."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    shards = write_shards(small_jpegs(80, seed=32), str(tmp_path / "in"), 40, "two")
    out = tmp_path / "out"
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    procs = [subprocess.Popen([sys.executable, "-m", "jobs.score", *TINY, f"data.shards={tmp_path / 'in'}/two-*.tar",
                               f"output.dir={out}", "device=cuda", "decoder=dali", "precision=fp16"], cwd=ROOT,
                              env={**base, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2"})
             for r in (0, 1)]
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
    ranks = [json.loads((out / "_metrics" / f"rank-{r:05d}.json").read_text()) for r in (0, 1)]
    assert [m["images"] for m in ranks] == [40, 40] and len(shards) == 2
    assert ranks[0]["device_id"] != ranks[1]["device_id"]
    spans = sorted((m["finished_at"] - m["job_seconds"], m["finished_at"]) for m in ranks)
    assert spans[1][0] < spans[0][1]  # at the same time


@pytest.mark.parametrize("precision", PRECISIONS)
def test_3_parity_with_the_cpu_path(shard, tmp_path, checkpoint, precision):
    logits = {}
    for device in ("cpu", "cuda"):
        assert score(settings(shard, tmp_path / device, device, "fp32" if device == "cpu" else precision,
                              model=checkpoint)) == 0
        table = pq.read_table(tmp_path / device / "gpu-000000.parquet")
        logits[device] = np.array(table.column("scores").to_pylist(), dtype=np.float32)
    scale = np.abs(logits["cpu"]).max()
    # nvJPEG (with fancy upsampling) and libjpeg-turbo differ by a few levels at some pixels; fp16 adds its rounding.
    assert np.abs(logits["cuda"] - logits["cpu"]).max() <= (0.02 if precision == "fp32" else 0.04) * scale
    assert (logits["cuda"].argmax(1) == logits["cpu"].argmax(1)).mean() >= 0.95


def test_4_fp16_agrees_with_fp32(shard, tmp_path, checkpoint):
    """Top-1 agreement of the classifier and cosine of the embeddings, fp16 against fp32, both on CUDA."""
    out = {}
    for precision in PRECISIONS:
        assert score(settings(shard, tmp_path / precision, "cuda", precision, model=checkpoint,
                              outputs=("topk", "embedding"))) == 0
        out[precision] = pq.read_table(tmp_path / precision / "gpu-000000.parquet").to_pylist()
    top1 = [a["topk_index"][0] == b["topk_index"][0] for a, b in zip(out["fp16"], out["fp32"])]
    assert np.mean(top1) >= 0.99
    a = np.array([r["embedding"] for r in out["fp16"]], dtype=np.float32)
    b = np.array([r["embedding"] for r in out["fp32"]], dtype=np.float32)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() >= 0.999


@pytest.mark.parametrize("precision", PRECISIONS)
def test_5_a_corrupt_jpeg_is_judged_on_the_cpu_without_rebuilding_the_gpu_pipeline(tmp_path, capsys, precision):
    from pipeline.decode import dali_decode

    builds = []
    real = dali_decode._build_decode_pipeline
    dali_decode._build_decode_pipeline = lambda p, b, device, *a: builds.append(device.type) or real(p, b, device, *a)
    try:
        rng = np.random.default_rng(3)
        samples = [(f"{i:04d}", {"jpg": encode_jpeg(synthetic_image(rng, 200, 400))}) for i in range(512)]
        for bad in (100, 300, 301):
            samples[bad] = (samples[bad][0], {"jpg": damage_scan(samples[bad][1]["jpg"])})
        shard = write_shards(iter(samples), str(tmp_path / "in"), 512, "cut")[0]
        start = time.perf_counter()
        assert score(settings(shard, tmp_path / "out", "cuda", precision, batch_size=256)) == 0
        seconds = time.perf_counter() - start
    finally:
        dali_decode._build_decode_pipeline = real
    rows = pq.read_table(tmp_path / "out" / "cut-000000.parquet").to_pylist()
    assert [r["key"] for r in rows if r["status"] != "ok"] == ["0100", "0300", "0301"]
    assert metrics(tmp_path / "out")["dali_fallback_batches"] == 2
    assert builds == ["cuda", "cpu"]  # the GPU pipeline once, the CPU reference once: no rebuilds
    with capsys.disabled():
        print(f"\nB=256 with three corrupt JPEGs in 512: {seconds:.2f} s for the run (compare docs/BENCHMARKS.md)")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_6_decoder_out_of_memory_is_not_a_decode_error(shard, tmp_path, precision):
    assert score(settings(shard, tmp_path, "cuda", precision, oom=OomSettings(inject_decode_above=3))) == 0
    assert metrics(tmp_path)["decode_oom_events"] >= 1
    assert set(pq.read_table(tmp_path / "gpu-000000.parquet").column("status").to_pylist()) == {"ok"}


def test_7_a_real_gpu_out_of_memory_in_dali_is_retried(tmp_path):
    """Fill the GPU with a torch tensor, leaving less than a batch of 8 large images needs: DALI's own
    allocation fails (CUDABadAlloc, "Can't allocate …") and the images are decoded in smaller batches."""
    rng = np.random.default_rng(4)
    big = [(f"{i:02d}", {"jpg": encode_jpeg(synthetic_image(rng, 3000, 4000))}) for i in range(8)]
    shard = write_shards(iter(big), str(tmp_path / "in"), 8, "big")[0]
    free, _ = torch.cuda.mem_get_info()
    per_image = 3000 * 4000 * 3
    ballast = torch.empty(max(0, free - 5 * per_image), dtype=torch.uint8, device="cuda")
    try:
        code = score(settings(shard, tmp_path / "out", "cuda", batch_size=8))
    finally:
        del ballast
        torch.cuda.empty_cache()
    assert code == 0
    m = metrics(tmp_path / "out")
    assert m["decode_oom_events"] >= 1 and m["status_counts"] == {"ok": 8}


def test_8_no_recompiles_at_the_chosen_batch_size(shard, tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = ModelSettings(name="resnet18", weights=None, resize_size=72, crop_size=64, compile=True)
    assert score(settings(shard, tmp_path, "cuda", model=model, batch_size="auto",
                          auto=AutoBatchSettings(max_batch_size=16, repeats=1))) == 0
    assert counters["stats"]["unique_graphs"] == 1 and sum(counters["recompiles"].values()) == 0


@pytest.mark.parametrize("precision", PRECISIONS)
def test_9_several_models_from_one_mixed_decode(shard, checkpoint, tmp_path, precision):
    """Two backbones on two preprocessings (two resize branches of one nvJPEG decode, on the device) and a
    head on the first's embedding: each backbone's columns match its one-model run on CUDA (top-k
    identical), and the head's score is a real number for every row."""
    from dataclasses import replace

    a = replace(checkpoint, outputs=("topk", "embedding"))
    b = replace(checkpoint, resize_size=40, crop_size=32, interpolation="bicubic", outputs=("topk",))
    head = ModelSettings(source="head", input="a.embedding", normalize_input=True, layers=(16, 1))
    assert score(replace(settings(shard, tmp_path / "three", "cuda", precision), models={"a": a, "b": b, "h": head})) == 0
    three = pq.read_table(tmp_path / "three").sort_by("key")
    for name, model in (("a", a), ("b", b)):
        assert score(settings(shard, tmp_path / name, "cuda", precision, model=model)) == 0
        alone = pq.read_table(tmp_path / name).sort_by("key")
        assert three.column(f"{name}_topk_index").to_pylist() == alone.column("topk_index").to_pylist()
    assert three.column("h_score").null_count == 0 and np.isfinite(three.column("h_score").to_numpy()).all()
    assert sorted(metrics(tmp_path / "three")["models"]) == ["a", "b", "h"]


def _engine(tmp_path, **kw):
    from pipeline.settings import EngineSettings

    return EngineSettings(cache_dir=str(tmp_path / "engines"), **kw)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_10_tensorrt_engine_built_then_loaded_by_a_second_process_and_gated(shard, checkpoint, tmp_path, precision):
    """backend=tensorrt: the first process builds the engine (cache=built), a second process loads it
    (cache=hit); the gate passes against eager on CUDA and the rows agree with eager's (top-1 ≥ 99 %)."""
    base = ["debug=tiny", f"data.shards={shard}", "device=cuda", f"precision={precision}", "decoder=dali",
            f"model.checkpoint={checkpoint.checkpoint}", "model.backend=tensorrt", "batch_size=8",
            f"engine.cache_dir={tmp_path / 'engines'}"]
    for name, expected in (("first", "cache=built"), ("second", "cache=hit")):
        r = subprocess.run([sys.executable, "-m", "jobs.score", *base, f"output.dir={tmp_path / name}"], cwd=ROOT,
                           capture_output=True, text=True, timeout=1800)
        assert r.returncode == 0, r.stderr[-2000:]
        assert expected in r.stderr and "engine gate passed" in r.stderr
    assert score(settings(shard, tmp_path / "eager", "cuda", precision, model=checkpoint)) == 0
    eager = pq.read_table(tmp_path / "eager").sort_by("key").column("topk_index").to_pylist()
    trt = pq.read_table(tmp_path / "second").sort_by("key").column("topk_index").to_pylist()
    assert np.mean([a[0] == b[0] for a, b in zip(eager, trt)]) >= 0.99
    stats = metrics(tmp_path / "second")["engines"]["resnet18"]
    assert stats["scoring_with"] == "tensorrt" and stats["builds"]["8"]["cache"] == "hit"


def test_11_tensorrt_int8_calibrates_on_the_dataset_and_its_gate_decides(shard, checkpoint, tmp_path):
    """precision=int8 with TensorRT: calibrated on the run's first images (ONNX Runtime's QDQ graph, read
    by TensorRT), the calibration cache beside the engine; the gate's figures in the metrics decide."""
    from dataclasses import replace

    s = replace(settings(shard, tmp_path / "int8", "cuda", "int8", model=replace(checkpoint, backend="tensorrt")),
                engine=_engine(tmp_path, calibration_images=32))
    assert score(s) == 0
    assert list((tmp_path / "engines").glob("*.calibration.json"))
    stats = metrics(tmp_path / "int8")["engines"]["resnet18"]
    gate = stats["gates"]["8"]
    assert stats["scoring_with"] == ("tensorrt" if gate["passed"] else "eager")
    assert "top1_agreement" in gate and metrics(tmp_path / "int8")["images"] == 40


def test_12_tensorrt_rebuilds_at_the_halved_batch_after_an_out_of_memory_error(shard, checkpoint, tmp_path):
    from dataclasses import replace

    s = replace(settings(shard, tmp_path / "oom", "cuda", "fp16", model=replace(checkpoint, backend="tensorrt"),
                         batch_size=16, oom=OomSettings(inject_above=8, inject_limit=1)), engine=_engine(tmp_path))
    assert score(s) == 0
    stats = metrics(tmp_path / "oom")["engines"]["resnet18"]
    assert set(stats["builds"]) == {"16", "8"} and stats["scoring_with"] == "tensorrt"
    assert pq.read_table(tmp_path / "oom").num_rows == 40


@pytest.mark.parametrize("precision", PRECISIONS)
def test_13_onnxruntime_on_cuda_matches_eager(shard, checkpoint, tmp_path, precision):
    """backend=onnxruntime with ONNX Runtime's CUDA provider (onnxruntime-gpu): IO binding of CUDA tensors."""
    from dataclasses import replace

    s = replace(settings(shard, tmp_path / "ort", "cuda", precision, model=replace(checkpoint, backend="onnxruntime")),
                engine=_engine(tmp_path))
    assert score(s) == 0
    assert score(settings(shard, tmp_path / "eager", "cuda", precision, model=checkpoint)) == 0
    a = pq.read_table(tmp_path / "ort").sort_by("key").column("topk_index").to_pylist()
    b = pq.read_table(tmp_path / "eager").sort_by("key").column("topk_index").to_pylist()
    assert np.mean([x[0] == y[0] for x, y in zip(a, b)]) >= 0.99
    assert metrics(tmp_path / "ort")["engines"]["resnet18"]["scoring_with"] == "onnxruntime"
