"""Pack images into WebDataset shards (with their DALI index files): from a folder, or synthetic.

Synthetic images look like photos to a JPEG codec (smooth gradients, shapes, grain) and vary in size
and aspect ratio, so decoding and resizing cost what they cost on real data.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pipeline.errors import UserError
from pipeline.shard_index import create_index

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def synthetic_image(rng: np.random.Generator, min_side: int = 160, max_side: int = 640) -> Image.Image:
    w, h = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 255, size=(2, 3))
    angle = rng.uniform(0, np.pi)
    t = ((x * np.cos(angle) + y * np.sin(angle)) / (w + h))[..., None]
    pixels = base[0] * (1 - t) + base[1] * t
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 8))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(8, w // 2 + 9)), y0 + int(rng.integers(8, h // 2 + 9))
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=color)
    image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 2.0))))
    grain = rng.normal(0, 6, size=(h, w, 3))
    return Image.fromarray((np.asarray(image, dtype=np.float32) + grain).clip(0, 255).astype(np.uint8))


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def damage_scan(jpeg: bytes) -> bytes:
    """A JPEG whose scan uses a Huffman table it never defines: it passes every check made on the bytes
    before decoding, and every decoder refuses it (for tests and benchmarks of decode failures)."""
    data = bytearray(jpeg)
    data[data.find(b"\xff\xda") + 6] = 0x33  # the first scan component's DC/AC tables: 3, not defined
    return bytes(data)


def write_shards(samples, output_dir: str, shard_size: int, prefix: str, index: bool = True) -> list[str]:
    """`samples` yields (key, {ext: bytes}); writes <prefix>-NNNNNN.tar (+ .idx unless `index` is
    false); returns the tar paths."""
    os.makedirs(output_dir, exist_ok=True)
    paths: list[str] = []
    tar = None
    for i, (key, components) in enumerate(samples):
        if i % shard_size == 0:
            if tar is not None:
                _close(tar, paths[-1], index)
            paths.append(os.path.join(output_dir, f"{prefix}-{len(paths):06d}.tar"))
            tar = tarfile.open(paths[-1], "w")
        for ext, data in components.items():
            add_file(tar, f"{key}.{ext}", data)
    if tar is not None:
        _close(tar, paths[-1], index)
    return paths


def _close(tar: tarfile.TarFile, path: str, index: bool) -> None:
    tar.close()
    if index:
        create_index(path, path[: -len(".tar")] + ".idx")


def synthetic_samples(count: int, seed: int, classes: int = 1000):
    rng = np.random.default_rng(seed)
    for i in range(count):
        yield f"{i:08d}", {"jpg": encode_jpeg(synthetic_image(rng)), "cls": str(int(rng.integers(classes))).encode()}


def folder_samples(input_dir: str):
    """Every image under `input_dir` (sorted), keyed by its relative path without suffix; a label from
    the first folder level when the images sit in class folders."""
    if not os.path.isdir(input_dir):
        raise UserError(f"input_dir {input_dir} is not a folder")
    files = sorted(
        os.path.join(root, f) for root, _, names in os.walk(input_dir) for f in names
        if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise UserError(f"input_dir {input_dir} holds no {'/'.join(IMAGE_SUFFIXES)} images")
    classes = sorted({os.path.relpath(f, input_dir).split(os.sep)[0] for f in files if os.sep in os.path.relpath(f, input_dir)})
    for i, f in enumerate(files):
        rel = os.path.relpath(f, input_dir)
        ext = os.path.splitext(f)[1][1:].lower()
        with open(f, "rb") as fh:
            components = {ext: fh.read()}
        if os.sep in rel:
            components["cls"] = str(classes.index(rel.split(os.sep)[0])).encode()
        yield f"{i:08d}", components
