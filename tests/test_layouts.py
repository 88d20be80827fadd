"""The shard layouts public datasets come in score on both decoders, with the same rows and scores.

Scores are compared as in test_parity: logits within 1% of their largest magnitude (the two back-ends'
resamplers differ by a few uint8 levels at some edge pixels) and the same top class.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torchvision

import layouts
from pipeline.runner import score
from pipeline.settings import DataSettings, ModelSettings, OutputSettings, ScoreSettings

MAX_REL = 0.01
ROW_FIELDS = ("key", "shard", "label", "status", "error")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("model") / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=1000).eval().state_dict(), path)
    return str(path)


def run(shard: str, out, decoder: str, checkpoint: str) -> list[dict]:
    settings = ScoreSettings(
        data=DataSettings(shards=shard), output=OutputSettings(dir=str(out)), outputs=("topk", "scores"),
        model=ModelSettings(name="resnet18", checkpoint=checkpoint, resize_size=72, crop_size=64),
        batch_size=4, precision="fp32", decoder=decoder, progress=False)
    assert score(settings) == 0
    (path,) = [p for p in out.glob("*.parquet")]
    return pq.read_table(path).to_pylist()


def assert_same_rows(a: list[dict], b: list[dict], same_shard: bool = True) -> None:
    fields = ROW_FIELDS if same_shard else tuple(f for f in ROW_FIELDS if f != "shard")
    assert [[r[f] for f in fields] for r in a] == [[r[f] for f in fields] for r in b]
    ok = [i for i, r in enumerate(a) if r["status"] == "ok"]
    la = np.array([a[i]["scores"] for i in ok], dtype=np.float32)
    lb = np.array([b[i]["scores"] for i in ok], dtype=np.float32)
    assert np.abs(la - lb).max() <= MAX_REL * np.abs(lb).max(), np.abs(la - lb).max()
    assert (la.argmax(1) == lb.argmax(1)).all()


LAYOUTS = {
    "img2dataset": layouts.img2dataset,
    "image_only": layouts.image_only,
    "imagenet_style": layouts.imagenet_style,
    "mixed_formats": layouts.mixed_formats,
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_both_decoders_give_the_same_rows(layout, tmp_path, checkpoint):
    shard = LAYOUTS[layout](str(tmp_path))
    dali = run(shard, tmp_path / "dali", "dali", checkpoint)
    torch_ = run(shard, tmp_path / "torch", "torch", checkpoint)
    assert all(r["status"] == "ok" for r in dali), [(r["key"], r["error"]) for r in dali if r["status"] != "ok"]
    assert_same_rows(dali, torch_)
    if layout == "imagenet_style":
        assert dali[0]["key"] == "train/n01440764/n01440764_10026" and [r["label"] for r in dali[:2]] == [0, 1]
    else:
        assert all(r["label"] is None for r in dali)  # no cls component: no label, and no crash


def test_default_decoder_scores_img2dataset_shards(tmp_path, checkpoint):
    """decoder=auto picks DALI for plain tars; the layout without labels must not trip it."""
    shard = layouts.img2dataset(str(tmp_path))
    rows = run(shard, tmp_path / "auto", "auto", checkpoint)
    assert [r["key"] for r in rows] == [f"{i:09d}" for i in range(10)]


def test_gzip_shards_go_through_auto_and_match_dali_on_the_plain_tar(tmp_path, checkpoint):
    plain = layouts.mixed_formats(str(tmp_path))
    tgz = layouts.gzipped(plain)
    auto = run(tgz, tmp_path / "auto", "auto", checkpoint)  # DALI cannot read gzip: torch, said in the log
    dali = run(plain, tmp_path / "dali", "dali", checkpoint)
    assert_same_rows(auto, dali, same_shard=False)


@pytest.mark.parametrize("decoder", ["dali", "torch"])
def test_exif_orientation_is_applied_as_the_camera_meant(tmp_path, decoder, checkpoint):
    """A JPEG tagged "rotate 90°" scores like the same photo stored upright, in both decoders."""
    tagged, upright, unturned = layouts.exif_rotated(str(tmp_path))
    rows = run(tagged, tmp_path / "tagged", decoder, checkpoint)
    assert_same_rows(rows, run(upright, tmp_path / "upright", decoder, checkpoint), same_shard=False)
    # The comparison can tell: the stored pixels, not turned, score otherwise (orientation 1 aside).
    logits = np.array([r["scores"] for r in rows], dtype=np.float32)
    other = np.array([r["scores"] for r in run(unturned, tmp_path / "unturned", decoder, checkpoint)], dtype=np.float32)
    moved = np.abs(logits - other).max(axis=1)
    assert moved[0] <= MAX_REL * np.abs(logits).max() and (moved[1:] > MAX_REL * np.abs(logits).max()).all()


def test_exif_rotated_photos_score_alike_in_both_decoders(tmp_path, checkpoint):
    tagged, _, _ = layouts.exif_rotated(str(tmp_path))
    assert_same_rows(run(tagged, tmp_path / "dali", "dali", checkpoint),
                     run(tagged, tmp_path / "torch", "torch", checkpoint))
