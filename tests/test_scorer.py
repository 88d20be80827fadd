"""OOM halving: the pure size policy, the Scorer with honest fault injection, and whole runs whose
output must not change because a batch did not fit."""

from __future__ import annotations

import gc
import json
import os
import re
import weakref

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from conftest import TINY, run_cli, tiny_settings
from pipeline.batch import Batch, Rows
from pipeline.errors import OutOfMemoryAtOneRow
from pipeline.runner import score
from pipeline.outputs import Scores, TopK, compute_all
from pipeline.scorer import MicroBatchPolicy, Scorer
from pipeline.device import is_out_of_memory as is_oom
from pipeline.settings import AutoBatchSettings, DataSettings, ModelSettings, OomSettings, OutputSettings, ScoreSettings


class OomAbove(nn.Module):
    """Raises a real torch.OutOfMemoryError when given more than `limit` rows; records what it was given."""

    def __init__(self, limit: int, failures: int | None = None):
        super().__init__()
        self.limit, self.failures = limit, failures
        self.calls: list[int] = []
        self.failed_inputs: list[weakref.ref] = []
        self.alive_at_retry: list[bool] = []
        self.weight = nn.Parameter(torch.randn(3, 10, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        self.alive_at_retry += [ref() is not None for ref in self.failed_inputs]
        self.failed_inputs.clear()
        self.calls.append(x.shape[0])
        if x.shape[0] > self.limit and (self.failures is None or self.failures > 0):
            if self.failures is not None:
                self.failures -= 1
            self.failed_inputs.append(weakref.ref(x))
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate for {x.shape[0]} rows")
        return x.mean(dim=(2, 3)) @ self.weight


def make_batch(n_rows: int, batch_size: int, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn((batch_size, 3, 4, 4), generator=g).contiguous(memory_format=torch.channels_last)
    keys = [str(i) for i in range(n_rows)]
    return Batch(views=(images,), rows=Rows(keys, ["s"] * n_rows, [None] * n_rows, ["ok"] * n_rows, [None] * n_rows))


def scorer_for(model, batch_size, regrow_after=50):
    scorer = Scorer(model, batch_size, device=torch.device("cpu"), oom=OomSettings(regrow_after=regrow_after))
    outputs = [TopK(3, None), Scores(10, "none")]

    def score(batch):
        return compute_all(outputs, scorer.forward(batch.images, batch.n_valid))

    score.scorer = scorer
    return score


# --- the size policy alone -------------------------------------------------------------------------

def test_policy_halves_down_to_one_then_gives_up():
    policy = MicroBatchPolicy(batch_size=7, regrow_after=50)
    assert [policy.on_oom(7), policy.on_oom(4), policy.on_oom(2)] == [4, 2, 1]
    with pytest.raises(OutOfMemoryAtOneRow):
        policy.on_oom(1)
    assert policy.min_size == 1 and policy.events == 4


def test_policy_regrows_after_good_batches_and_stops_after_a_second_oom():
    policy = MicroBatchPolicy(batch_size=8, regrow_after=2)
    policy.on_oom(8)  # → 4
    for _ in range(2):
        assert policy.next_size() == 4
        policy.on_batch_done()
    assert policy.next_size() == 8  # the regrowth attempt
    policy.on_oom(8)  # fails again at 8: growth stops for the run
    assert policy.size == 4 and policy.growth_stopped
    for _ in range(10):
        assert policy.next_size() == 4
        policy.on_batch_done()


def test_policy_never_grows_above_batch_size():
    policy = MicroBatchPolicy(batch_size=6, regrow_after=1)
    policy.on_oom(6)  # → 3
    policy.on_batch_done()
    assert policy.next_size() == 6
    policy.on_batch_done()
    assert policy.size == 6 and policy.next_size() == 6


# --- the scorer ----------------------------------------------------------------------------------

def test_oom_classification():
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    assert is_oom(RuntimeError("HIP out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED"))
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x10)"))
    assert not is_oom(ValueError("out of memory"))


@pytest.mark.parametrize("limit", [1, 3, 5, 15])
@pytest.mark.parametrize("n_rows", [16, 11])
def test_halving_gives_the_same_predictions(limit, n_rows):
    clean = scorer_for(OomAbove(limit=10**6), 16)
    expected = clean(make_batch(n_rows, 16))
    model = OomAbove(limit)
    score = scorer_for(model, 16)
    got = score(make_batch(n_rows, 16))
    assert torch.equal(got["topk_index"], expected["topk_index"])
    assert torch.allclose(got["topk_prob"], expected["topk_prob"], atol=1e-6)
    assert torch.allclose(got["scores"].float(), expected["scores"].float(), atol=1e-3)
    assert score.scorer.micro_batch <= limit and score.scorer.policy.events >= 1
    ok_sizes = {c for c in model.calls if c <= limit}
    assert len(ok_sizes) == 1  # after halving, one static shape: the tail chunk is padded


def test_failed_input_is_freed_before_the_retry():
    """The retry runs after the except block: the failed input tensor is already gone."""
    model = OomAbove(limit=4)
    scorer_for(model, 16)(make_batch(16, 16))
    gc.collect()
    assert model.alive_at_retry and not any(model.alive_at_retry)


def test_oom_releases_torchs_cache_and_dalis_pool(monkeypatch):
    """On a GPU both torch's caching allocator and DALI's pool hold memory the retry needs."""
    from pipeline import device as dev

    released = []
    monkeypatch.setattr(dev, "release_memory", lambda device: released.append(device))
    scorer_for(OomAbove(limit=4), 16)(make_batch(16, 16))
    assert released == [torch.device("cpu")] * 2  # 16 → 8 → 4: two retries, each after a release


def test_batch_size_auto_releases_the_sweeps_memory(monkeypatch):
    from pipeline import autobatch, device as dev

    released = []
    monkeypatch.setattr(dev, "release_memory", lambda device: released.append(device))
    settings = ScoreSettings(data=DataSettings(shards="x"), output=OutputSettings(dir="y"),
                             auto=AutoBatchSettings(max_batch_size=4, repeats=1))
    chosen, table = autobatch.choose_batch_size(OomAbove(limit=100), 4, torch.float32, torch.device("cpu"), settings)
    assert chosen in (1, 2, 4) and len(table) == 3 and released == [torch.device("cpu")]


def test_micro_batch_regrows_when_memory_is_back():
    model = OomAbove(limit=4, failures=2)  # 16 → 8 → 4, then memory is "back"
    score = scorer_for(model, 16, regrow_after=3)
    for i in range(12):
        score(make_batch(16, 16, seed=i))
    scorer = score.scorer
    assert scorer.micro_batch == 16 and scorer.policy.min_size == 4 and scorer.policy.events == 2


def test_oom_at_one_row_gives_up_with_context():
    scorer = Scorer(OomAbove(limit=0), 4, torch.device("cpu"), OomSettings(), context="model=m image_size=9")
    with pytest.raises(OutOfMemoryAtOneRow, match="micro-batch 1.*model=m image_size=9"):
        scorer.forward(make_batch(4, 4).images)


def test_padded_tail_chunk_keeps_the_shape_and_memory_format():
    """After halving, the tail chunk is padded to the micro-batch and stays channels_last, so the model
    (and cuDNN's autotuner, or a compiled graph) only ever sees one layout."""
    seen = []

    class Records(OomAbove):
        def forward(self, x):
            seen.append((x.shape[0], x.is_contiguous(memory_format=torch.channels_last)))
            return super().forward(x)

    score_batch = scorer_for(Records(limit=4), 16)
    score_batch(make_batch(11, 16))  # 16 rows → OOM → 8 → OOM → chunks of 4: 4, 4, 4, then 4 (3 + 1 padding)
    assert seen[-4:] == [(4, True)] * 4
    assert all(memory_format_kept for _, memory_format_kept in seen)


def test_a_batch_of_another_size_is_refused():
    """The decoder and the scorer get the batch size from one place; if they ever disagree, say so."""
    scorer = Scorer(OomAbove(limit=100), 8, torch.device("cpu"), OomSettings())
    with pytest.raises(RuntimeError, match="a batch of 4 rows reached a scorer of batch size 8"):
        scorer.forward(make_batch(4, 4).images)


def test_other_errors_are_not_retried():
    class Broken(nn.Module):
        calls = 0

        def forward(self, x):
            Broken.calls += 1
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        scorer_for(Broken(), 8)(make_batch(8, 8))
    assert Broken.calls == 1


# --- whole runs ----------------------------------------------------------------------------------

def run_library(shards, out, batch_size, decoder="torch", inject_above=None, precision="fp32"):
    settings = ScoreSettings(
        data=DataSettings(shards=list(shards)), output=OutputSettings(dir=str(out)), outputs=("topk", "scores"),
        model=ModelSettings(name="resnet18", weights=None, resize_size=40, crop_size=32),
        batch_size=batch_size, precision=precision, decoder=decoder, progress=False,
        oom=OomSettings(inject_above=inject_above))
    code = score(settings)
    tables = [pq.read_table(out / f"{os.path.basename(p)[:-4]}.parquet") for p in shards]
    return code, [row for t in tables for row in t.to_pylist()]


@pytest.fixture(scope="module")
def clean_runs(shards, tmp_path_factory):
    """The OOM-free run at each batch size, once."""
    found = {}

    def of(batch_size):
        if batch_size not in found:
            found[batch_size] = run_library(shards, tmp_path_factory.mktemp(f"clean{batch_size}"), batch_size)
        return found[batch_size]

    return of


@pytest.mark.parametrize("batch_size,inject_above", [(8, 1), (8, 3), (7, 3), (7, 100), (5, 4)])
def test_run_output_unchanged_by_oom(shards, clean_runs, tmp_path, batch_size, inject_above):
    """23 samples; batch sizes that do (none here divide 23 but 1) and don't divide the data. CPU conv
    kernels for a batch of 1 take another algorithm, so fp32 logits may differ in the 6th digit."""
    code, clean = clean_runs(batch_size)
    code_oom, rows = run_library(shards, tmp_path / "oom", batch_size, inject_above=inject_above)
    assert code == code_oom == 0
    assert [(r["shard"], r["key"]) for r in rows] == [(r["shard"], r["key"]) for r in clean]
    assert len({(r["shard"], r["key"]) for r in rows}) == 23
    assert [r["topk_index"] for r in rows] == [r["topk_index"] for r in clean]
    np.testing.assert_allclose([r["topk_prob"] for r in rows], [r["topk_prob"] for r in clean], atol=1e-5)
    np.testing.assert_allclose([r["scores"] for r in rows], [r["scores"] for r in clean], atol=2e-2)


def test_oom_recovery_is_visible(shards, tmp_path, caplog):
    assert score(tiny_settings(shards[0], tmp_path, batch_size=8, oom=OomSettings(inject_above=3), decoder="dali")) == 0
    assert "OOM at micro-batch 8 on cpu; retrying at 4" in caplog.text
    metrics = json.loads((tmp_path / "_metrics" / "rank-00000.json").read_text())
    assert metrics["oom_events"] == 2 and metrics["micro_batch"] == 2 and metrics["min_micro_batch"] == 2


def test_cli_oom_at_one_row_fails_cleanly(shards, tmp_path):
    base = [*TINY, f"output.dir={tmp_path}", "batch_size=4"]
    assert score(tiny_settings(shards[0], tmp_path, batch_size=4)) == 0
    done = (tmp_path / "part-000000.parquet").read_bytes()
    r = run_cli("jobs.score", *base, f"data.shards=[{shards[0]},{shards[1]}]", "oom.inject_above=0")
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: out of memory at micro-batch 1") and "model=resnet18" in last
    assert "precision=fp32" in last and "image_size=64" in last and "Traceback" not in r.stderr
    assert (tmp_path / "part-000000.parquet").read_bytes() == done
    assert not (tmp_path / "part-000001.parquet").exists()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_batch_size_auto_respects_memory(shards, tmp_path, capsys):
    settings = tiny_settings(shards[2], tmp_path, batch_size="auto", auto=AutoBatchSettings(max_batch_size=128, repeats=1),
                             oom=OomSettings(inject_above=48))
    assert score(settings) == 0
    r = capsys.readouterr()
    assert re.search(r"batch \|\s+ms/batch \|\s+images/s \|\s+peak MB", r.out)
    assert re.search(r"^\s*64 \|\s+OOM", r.out, re.MULTILINE)
    metrics = json.loads((tmp_path / "_metrics" / "rank-00000.json").read_text())
    assert metrics["batch_size"] <= 32
    assert [p["batch"] for p in metrics["auto_batch_table"]] == [1, 2, 4, 8, 16, 32, 64]
    assert f"chose batch_size={metrics['batch_size']}" in r.out


def test_compile_happens_once_after_the_batch_size_is_chosen(shards, tmp_path):
    """model.compile=true with batch_size=auto: the sweep runs the plain module, then the module is
    compiled once for the chosen shape, and scoring never recompiles (the tail chunk is padded)."""
    from torch._dynamo.utils import counters

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 10)

        def forward(self, x):
            return self.fc(x.mean(dim=(2, 3)))

    path = tmp_path / "tiny.pt2"
    example = torch.randn(2, 3, 32, 32)
    torch.export.save(torch.export.export(Tiny(), (example,), dynamic_shapes=({0: torch.export.Dim("batch")},)), path)
    torch._dynamo.reset()
    counters.clear()
    settings = ScoreSettings(
        data=DataSettings(shards=shards[0]), output=OutputSettings(dir=str(tmp_path / "out")),
        model=ModelSettings(path=str(path), resize_size=36, crop_size=32, mean=(0.5,) * 3, std=(0.5,) * 3,
                            interpolation="bilinear", topk=3, compile=True),
        batch_size="auto", precision="fp32", decoder="torch", progress=False,
        auto=AutoBatchSettings(max_batch_size=4, repeats=1, tolerance=0.5))
    assert score(settings) == 0
    metrics = json.loads((tmp_path / "out" / "_metrics" / "rank-00000.json").read_text())
    assert [p["batch"] for p in metrics["auto_batch_table"]] == [1, 2, 4]
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert sum(counters["recompiles"].values()) == 0, dict(counters["recompiles"])
    assert pq.read_metadata(tmp_path / "out" / "part-000000.parquet").num_rows == 9
