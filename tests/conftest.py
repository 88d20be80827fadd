"""Shared fixtures: small generated shards and a helper to run the real CLI."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pipeline.pack import encode_jpeg, synthetic_image, write_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["debug=tiny"]  # resnet18, random weights, 72→64 px, fp32, no progress bar


def small_jpegs(count: int, seed: int, start: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(start, start + count):
        image = synthetic_image(rng, min_side=48, max_side=140)
        yield f"{i:06d}", {"jpg": encode_jpeg(image), "cls": str(i % 10).encode()}


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """Three shards of 9, 9 and 5 JPEG samples (23 in all) with labels and index files."""
    out = tmp_path_factory.mktemp("shards")
    paths = write_shards(small_jpegs(23, seed=1), str(out), shard_size=9, prefix="part")
    return paths


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run where CUDA is available and are skipped, saying so, everywhere else; tests of the
    DALI decoder (marked `dali`, or given decoder "dali" as a parameter) where DALI imports."""
    import torch

    from pipeline.decode.dali import dali_available

    no_gpu = pytest.mark.skip(reason="no CUDA device: the first-GPU checklist runs on a GPU node")
    no_dali = pytest.mark.skip(reason="nvidia-dali does not import here")
    has_dali = dali_available()
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        params = getattr(item, "callspec", None)
        uses_dali = "dali" in item.keywords or (params is not None and "dali" in params.params.values())
        if uses_dali and not has_dali:
            item.add_marker(no_dali)
    # Longest first (the Slurm tests are one group of ~4 minutes, the benchmark's tests ~1-2 minutes each),
    # so that the two workers of `make test` are not left with one long test at the end.
    items.sort(key=lambda item: LONGEST_FIRST.get(item.module.__name__, len(LONGEST_FIRST)))


LONGEST_FIRST = {name: i for i, name in enumerate(
    ("test_slurm", "test_bench", "test_s3", "test_cluster", "test_reliability", "test_scorer"))}


def tiny_settings(shards, out, **kw):
    """`debug=tiny` as ScoreSettings (resnet18, random weights, 72→64 px, fp32, batch 16), for calling the
    library in-process; keyword arguments replace any field, `data`/`model` ones by name (max_pixels=…)."""
    from dataclasses import fields, replace

    from pipeline.settings import DataSettings, ModelSettings, OutputSettings, ScoreSettings

    data_keys = {f.name for f in fields(DataSettings)}
    model_keys = {f.name for f in fields(ModelSettings)} - {f.name for f in fields(ScoreSettings)}  # batch_size: the run's
    data = DataSettings(shards=shards, **{k: kw.pop(k) for k in list(kw) if k in data_keys})
    model = ModelSettings(name="resnet18", weights=None, resize_size=72, crop_size=64)
    model = replace(model, **{k: kw.pop(k) for k in list(kw) if k in model_keys})
    output = OutputSettings(dir=str(out), **{k: kw.pop(k) for k in ("overwrite", "keep_components") if k in kw})
    return ScoreSettings(data=data, output=output, model=model, **{"batch_size": 16, "precision": "fp32",
                                                                    "progress": False, **kw})


def verify_output(spec, out) -> tuple[bool, str]:
    """jobs.verify in-process: (complete, its printed table)."""
    from pipeline.layout import OutputLayout
    from pipeline.verify import verify
    from pipeline.shards import expand_shards

    complete, table, _ = verify(expand_shards(spec), OutputLayout(str(out)))
    return complete, table


def png_bytes(array: np.ndarray, **kw) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array, **kw).save(out, format="PNG")
    return out.getvalue()


def run_cli_cases(module: str, cases: list[list[str]], timeout: int = 600, env: dict | None = None) -> list[dict]:
    """`python -m <module> args…` for each argument list, one after another in one process (tests/cli_cases.py):
    [{"code": exit code, "stderr": …}, …]. For the many cases that differ only in their arguments."""
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "cli_cases.py"), module, json.dumps(cases)],
                         cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=True,
                         env={**os.environ, **(env or {})})
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith('{"code"')]
    assert len(results) == len(cases), run.stdout + run.stderr
    return results


def run_cli(module: str, *args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m <module> args…` from the repo root, the way a user does."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


UNGROUPED = pytest.StashKey[str]()


def pytest_collection_finish(session):
    """Under `--dist loadgroup` a test marked `xdist_group(name)` must carry `@name` in its id: that is how
    xdist keeps the group on one worker (two Slurm clusters would collide on munged's socket). pytest 9.2
    silently broke it (pytest-dev/pytest-xdist#1386): such a test fails, saying so, rather than run apart."""
    if not getattr(session.config.option, "loadgroup", False):  # what xdist's workers are told of --dist loadgroup
        return
    for item in session.items:
        mark = item.get_closest_marker("xdist_group")
        name = mark and mark.kwargs.get("name", mark.args[0] if mark.args else "default")
        if name and not item.nodeid.endswith(f"@{name}"):
            item.stash[UNGROUPED] = name


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if UNGROUPED in item.stash:
        pytest.fail(f"--dist loadgroup did not keep the group {item.stash[UNGROUPED]!r} on one worker "
                    "(pytest >= 9.2: pytest-dev/pytest-xdist#1386)", pytrace=False)
