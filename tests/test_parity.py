"""The job's logits (`outputs=[topk,scores]`: the raw output, float32) equal a plain reference (PIL
decode → the same resize/crop/normalise in fp32 → the model in fp32), for both decoders and both
interpolations, and the two decoders agree with each other.

Tolerance, measured on these images: DALI's and torchvision's antialiased bilinear resamplers differ from PIL's by at most a few uint8 levels
at some edge pixels (mean ≈ 0.2 levels). Measured here, that moved the logits of this random-weight
resnet18 by at most 0.16% (DALI) and 0.04% (torch) of their largest magnitude, mean 0.02% and
0.003%; the bounds below leave ~6-9× headroom, and a one-pixel crop shift already breaks them
(last test), as would a wrong mean/std or BGR for RGB.
"""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.transforms import functional as TF

from conftest import small_jpegs
from pipeline.decode import Preprocess
from pipeline.pack import write_shards
from pipeline.runner import score
from pipeline.settings import DataSettings, ModelSettings, OutputSettings, ScoreSettings

MAX_REL, MEAN_REL = 0.01, 0.002
PRE = Preprocess(resize_size=72, crop_size=64, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                 interpolation="bilinear")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    paths = write_shards(small_jpegs(30, seed=3), str(root / "shards"), 30, "p")
    torch.manual_seed(123)
    model = torchvision.models.resnet18(num_classes=1000).eval()
    torch.save(model.state_dict(), root / "ckpt.pt")
    return root, paths[0], model


def job_logits(root, shard, decoder, interpolation="bilinear"):
    model = ModelSettings(name="resnet18", checkpoint=str(root / "ckpt.pt"), resize_size=PRE.resize_size,
                          crop_size=PRE.crop_size, interpolation=interpolation)
    out = root / f"out-{decoder}-{interpolation}"
    settings = ScoreSettings(data=DataSettings(shards=shard), output=OutputSettings(dir=str(out)), outputs=("topk", "scores"),
                             model=model, batch_size=8, precision="fp32", decoder=decoder, progress=False)
    assert score(settings) == 0
    table = pq.read_table(out / "p-000000.parquet")
    return table.column("key").to_pylist(), np.array(table.column("scores").to_pylist(), dtype=np.float32)


MODES = {"bilinear": TF.InterpolationMode.BILINEAR, "bicubic": TF.InterpolationMode.BICUBIC}


def reference_logits(shard, model, interpolation="bilinear"):
    images = {}
    with tarfile.open(shard) as tar:
        for member in tar:
            if member.name.endswith(".jpg"):
                images[member.name[:-4]] = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
    keys, rows = [], []
    for key, image in images.items():
        height, width = PRE.resized_shape(image.height, image.width)
        image = TF.resize(image, [height, width], interpolation=MODES[interpolation], antialias=True)
        top, left = PRE.crop_origin(height, width)
        x = TF.normalize(TF.to_tensor(TF.crop(image, top, left, PRE.crop_size, PRE.crop_size)), PRE.mean, PRE.std)
        with torch.no_grad():
            rows.append(model(x[None])[0].numpy())
        keys.append(key)
    return keys, np.stack(rows)


def assert_close(a, b):
    scale = np.abs(b).max()
    diff = np.abs(a - b)
    assert diff.max() <= MAX_REL * scale, (diff.max(), scale)
    assert diff.mean() <= MEAN_REL * scale, (diff.mean(), scale)
    assert (a.argmax(1) == b.argmax(1)).all()


@pytest.mark.parametrize("interpolation", sorted(MODES))
@pytest.mark.parametrize("decoder", ["dali", "torch"])
def test_job_matches_reference(setup, decoder, interpolation):
    root, shard, model = setup
    keys, logits = job_logits(root, shard, decoder, interpolation)
    ref_keys, ref = reference_logits(shard, model, interpolation)
    assert keys == ref_keys
    assert_close(logits, ref)


@pytest.mark.parametrize("interpolation", sorted(MODES))
def test_decoders_agree(setup, interpolation):
    root, shard, _ = setup
    keys_dali, dali = job_logits(root, shard, "dali", interpolation)
    keys_torch, torch_ = job_logits(root, shard, "torch", interpolation)
    assert keys_dali == keys_torch
    assert_close(dali, torch_)


def test_tolerance_catches_a_preprocessing_slip(setup):
    """The bounds above are tight enough to see a one-pixel crop shift."""
    root, shard, model = setup
    _, logits = job_logits(root, shard, "torch")
    original = Preprocess.crop_origin
    try:
        Preprocess.crop_origin = lambda self, h, w: tuple(v + 1 for v in original(self, h, w))
        _, ref = reference_logits(shard, model)
    finally:
        Preprocess.crop_origin = original
    with pytest.raises(AssertionError):
        assert_close(logits, ref)
