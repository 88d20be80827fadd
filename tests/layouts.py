"""Shards in the layouts public datasets use, built from generated images: img2dataset (jpg + txt + json,
no label), image-only, ImageNet-style keys with folders and an upper-case extension, one shard mixing
every image format and mode, and JPEGs with every EXIF orientation."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tarfile

import numpy as np
from PIL import Image

from pipeline.pack import add_file, encode_jpeg, synthetic_image
from pipeline.shard_index import create_index


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def write_tar(path: str, samples: list[tuple[str, dict[str, bytes]]]) -> str:
    with tarfile.open(path, "w") as tar:
        for key, components in samples:
            for ext, data in components.items():
                add_file(tar, f"{key}.{ext}", data)
    create_index(path, path[: -len(".tar")] + ".idx")
    return path


def gzipped(path: str) -> str:
    """The same tar as a webdataset `.tgz` shard (with its own index)."""
    target = path[: -len(".tar")] + "-gz.tgz"
    with open(path, "rb") as src, gzip.open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return target


def photos(count: int, seed: int, low: int = 60, high: int = 140) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [synthetic_image(rng, low, high) for _ in range(count)]


def img2dataset(folder: str) -> str:
    samples = []
    for i, image in enumerate(photos(10, seed=21)):
        key = f"{i:09d}"
        caption = f"a synthetic photo number {i}".encode()
        meta = json.dumps({"url": f"https://example.com/{key}.jpg", "key": key, "caption": caption.decode(),
                           "width": image.width, "height": image.height, "status": "success"}).encode()
        samples.append((key, {"jpg": encode_jpeg(image), "txt": caption, "json": meta}))
    return write_tar(os.path.join(folder, "00000.tar"), samples)


def image_only(folder: str) -> str:
    return write_tar(os.path.join(folder, "images.tar"),
                     [(f"img{i:03d}", {"jpg": encode_jpeg(image)}) for i, image in enumerate(photos(9, seed=22))])


def imagenet_style(folder: str) -> str:
    samples = []
    for i, image in enumerate(photos(8, seed=23)):
        synset = ("n01440764", "n01443537")[i % 2]
        samples.append((f"train/{synset}/{synset}_{10026 + i}", {"JPEG": encode_jpeg(image), "cls": str(i % 2).encode()}))
    return write_tar(os.path.join(folder, "imagenet-train-000000.tar"), samples)


def mixed_formats(folder: str) -> str:
    photo, other = photos(2, seed=24, low=70, high=130)
    rgba = photo.convert("RGBA")
    alpha = np.asarray(rgba).copy()
    alpha[: alpha.shape[0] // 2, :, 3] = 0  # half transparent, so the file really carries alpha
    rgba = Image.fromarray(alpha, "RGBA")
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    samples = [
        ("jpeg", {"jpg": encode_jpeg(photo)}),
        ("png_rgb", {"png": encode(other, "PNG")}),
        ("png_rgba", {"png": encode(rgba, "PNG")}),
        ("png_palette", {"png": encode(palette, "PNG")}),
        ("png_gray", {"png": encode(photo.convert("L"), "PNG")}),
        ("webp_lossy", {"webp": encode(photo, "WEBP", quality=90)}),
        ("webp_lossless", {"webp": encode(other, "WEBP", lossless=True)}),
        ("webp_alpha", {"webp": encode(rgba, "WEBP", quality=90)}),
        ("jpeg_gray", {"jpeg": encode(photo.convert("L"), "JPEG", quality=90)}),
        ("jpeg_cmyk", {"jpg": encode(other.convert("CMYK"), "JPEG", quality=90)}),
    ]
    return write_tar(os.path.join(folder, "mixed.tar"), samples)


# EXIF orientation → the PIL transpose that shows the image as the camera meant it.
ORIENTATIONS = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def exif_rotated(folder: str) -> tuple[str, str, str]:
    """(a shard of JPEGs tagged with each EXIF orientation, the same photos turned upright and untagged,
    the same photos as stored, not turned): scoring the first two must give the same rows."""
    tagged, upright, unturned = [], [], []
    for (orientation, transpose), image in zip(ORIENTATIONS.items(), photos(8, seed=25, low=80, high=150)):
        image = image.crop((0, 0, image.width, image.height * 2 // 3))  # not square: a rotation shows
        exif = Image.Exif()
        exif[0x0112] = orientation
        key = f"orientation{orientation}"
        jpeg = encode(image, "JPEG", quality=95, exif=exif.tobytes())
        tagged.append((key, {"jpg": jpeg}))
        # What the camera meant: the stored pixels, turned; kept losslessly.
        stored = _decoded(jpeg)
        upright.append((key, {"png": encode(stored.transpose(transpose) if transpose is not None else stored, "PNG")}))
        unturned.append((key, {"png": encode(stored, "PNG")}))
    return (write_tar(os.path.join(folder, "exif.tar"), tagged),
            write_tar(os.path.join(folder, "upright.tar"), upright),
            write_tar(os.path.join(folder, "unturned.tar"), unturned))


def _decoded(jpeg: bytes) -> Image.Image:
    """The stored pixels of a JPEG, without applying its orientation."""
    with Image.open(io.BytesIO(jpeg)) as image:
        return image.convert("RGB")
