"""The first-GPU checklist (docs/BENCHMARKS.md), in order. Marked `gpu`: skipped where CUDA is not
available, run by `make test` where it is. None of these has run yet: there is no GPU here."""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import TINY, run_cli, small_jpegs
from pipeline.pack import encode_jpeg, synthetic_image, write_shards
from pipeline.runner import score
from pipeline.settings import AutoBatchSettings, DataSettings, ModelSettings, OomSettings, OutputSettings, ScoreSettings

pytestmark = pytest.mark.gpu


def settings(shard, out, device, **kw) -> ScoreSettings:
    model = kw.pop("model", ModelSettings(name="resnet18", weights=None, resize_size=72, crop_size=64))
    return ScoreSettings(data=DataSettings(shards=shard), output=OutputSettings(dir=str(out)), outputs=("topk", "scores"),
                         model=model, batch_size=kw.pop("batch_size", 8), precision="fp32", device=device,
                         decoder="dali", progress=False, **kw)


def metrics(out) -> dict:
    return json.loads((out / "_metrics" / "rank-00000.json").read_text())


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return write_shards(small_jpegs(40, seed=31), str(tmp_path_factory.mktemp("gpu")), 40, "gpu")[0]


def test_1_cuda_end_to_end_through_dali_mixed(shard, tmp_path):
    assert score(settings(shard, tmp_path, "cuda")) == 0
    m = metrics(tmp_path)
    assert m["device"].startswith("cuda") and m["decoder"] == "dali" and m["images"] == 40
    assert m["time_split_seconds"]["model"] > 0  # CUDA events, read once complete
    assert all(s == "ok" for s in pq.read_table(tmp_path / "gpu-000000.parquet").column("status").to_pylist())


@pytest.mark.parametrize("visible", ["all", "one per task"])
def test_2_each_process_on_exactly_one_gpu(shard, tmp_path, visible):
    if torch.cuda.device_count() < 2 and visible == "all":
        pytest.skip("needs two GPUs")
    devices = []
    for local in (0, 1):
        env = {"SLURM_LOCALID": str(local), "SLURM_PROCID": str(local), "SLURM_NTASKS": "2"}
        if visible == "one per task":
            env["CUDA_VISIBLE_DEVICES"] = str(local % max(torch.cuda.device_count(), 1))
        r = run_cli("jobs.score", *TINY, f"data.shards={shard}", f"output.dir={tmp_path / 'out'}", "device=cuda",
                    env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        devices.append(json.loads((tmp_path / "out" / "_metrics" / f"rank-{local:05d}.json").read_text())["device"])
    assert devices == (["cuda:0", "cuda:1"] if visible == "all" else ["cuda:0", "cuda:0"])


def test_3_parity_with_the_cpu_path(shard, tmp_path):
    torch.manual_seed(5)
    import torchvision

    ckpt = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18(num_classes=1000).eval().state_dict(), ckpt)
    model = ModelSettings(name="resnet18", checkpoint=str(ckpt), resize_size=72, crop_size=64)
    logits = {}
    for device in ("cpu", "cuda"):
        assert score(settings(shard, tmp_path / device, device, model=model)) == 0
        table = pq.read_table(tmp_path / device / "gpu-000000.parquet")
        logits[device] = np.array(table.column("scores").to_pylist(), dtype=np.float32)
    scale = np.abs(logits["cpu"]).max()
    # nvJPEG (with fancy upsampling) and libjpeg-turbo differ by a few levels at some pixels.
    assert np.abs(logits["cuda"] - logits["cpu"]).max() <= 0.02 * scale
    assert (logits["cuda"].argmax(1) == logits["cpu"].argmax(1)).mean() >= 0.95


def test_4_a_truncated_jpeg_costs_only_itself(tmp_path, capsys):
    rng = np.random.default_rng(3)
    samples = [(f"{i:04d}", {"jpg": encode_jpeg(synthetic_image(rng, 200, 400))}) for i in range(256)]
    data = samples[100][1]["jpg"]
    samples[100] = ("0100", {"jpg": data[: len(data) // 2]})
    shard = write_shards(iter(samples), str(tmp_path / "in"), 256, "cut")[0]
    start = time.perf_counter()
    assert score(settings(shard, tmp_path / "out", "cuda", batch_size=256)) == 0
    seconds = time.perf_counter() - start
    rows = pq.read_table(tmp_path / "out" / "cut-000000.parquet").to_pylist()
    assert [r["key"] for r in rows if r["status"] != "ok"] == ["0100"]
    assert metrics(tmp_path / "out")["dali_fallback_batches"] == 1
    with capsys.disabled():
        print(f"\nB=256 with one truncated JPEG: {seconds:.2f} s for the run (compare docs/BENCHMARKS.md)")


def test_5_decoder_out_of_memory_is_not_a_decode_error(shard, tmp_path):
    assert score(settings(shard, tmp_path, "cuda", oom=OomSettings(inject_decode_above=3))) == 0
    assert metrics(tmp_path)["decode_oom_events"] >= 1
    assert set(pq.read_table(tmp_path / "gpu-000000.parquet").column("status").to_pylist()) == {"ok"}


def test_6_no_recompiles(shard, tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = ModelSettings(name="resnet18", weights=None, resize_size=72, crop_size=64, compile=True)
    assert score(settings(shard, tmp_path, "cuda", model=model, batch_size="auto",
                          auto=AutoBatchSettings(max_batch_size=16, repeats=1))) == 0
    assert counters["stats"]["unique_graphs"] == 1 and sum(counters["recompiles"].values()) == 0
