"""A shard holding every kind of bad sample, built from generated images, and the statuses each must get."""

from __future__ import annotations

import io
import tarfile

import numpy as np
from PIL import Image

from pipeline.pack import add_file, damage_scan, encode_jpeg, synthetic_image
from pipeline.shard_index import create_index


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kw)
    return out.getvalue()


def good_images(seed: int = 7) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    return {f"good{i}": encode_jpeg(synthetic_image(rng, 60, 120)) for i in range(5)}


def corrupt_samples(max_pixels_image_side: int = 400) -> list[tuple[str, dict[str, bytes], str]]:
    """(key, components, expected status) in tar order; good images are interleaved."""
    rng = np.random.default_rng(11)
    photo = synthetic_image(rng, 80, 120)
    good = good_images()
    rgb = np.asarray(photo)
    sixteen = (rgb[..., 0].astype(np.uint16) * 257)
    samples = [
        ("good0", {"jpg": good["good0"], "cls": b"1"}, "ok"),
        ("truncated", {"jpg": encode_jpeg(photo)[: len(encode_jpeg(photo)) // 2]}, "decode_error"),
        ("bad_scan", {"jpg": damage_scan(encode_jpeg(photo))}, "decode_error"),
        ("zero_bytes", {"jpg": b""}, "empty_image"),
        ("random_bytes", {"jpg": rng.integers(0, 256, 3000, dtype=np.uint8).tobytes()}, "decode_error"),
        ("text_file", {"jpg": b"this is not an image\n" * 20}, "decode_error"),
        ("good1", {"jpg": good["good1"], "cls": b"2"}, "ok"),
        ("png_as_jpg", {"jpg": _encode(photo, "PNG")}, "ok"),
        ("cmyk", {"jpg": _encode(photo.convert("CMYK"), "JPEG")}, "ok"),
        ("gray_jpeg", {"jpg": _encode(photo.convert("L"), "JPEG")}, "ok"),
        ("png16", {"png": _encode(Image.fromarray(sixteen), "PNG")}, "ok"),
        ("palette", {"png": _encode(photo.convert("P"), "PNG")}, "ok"),
        ("rgba", {"png": _encode(photo.convert("RGBA"), "PNG")}, "ok"),
        ("good2", {"jpg": good["good2"], "cls": b"3"}, "ok"),
        ("huge", {"jpg": encode_jpeg(Image.new("RGB", (max_pixels_image_side, max_pixels_image_side)))}, "too_large"),
        ("label_only", {"cls": b"4"}, "missing_image"),
        ("good3", {"jpg": good["good3"]}, "ok"),
        ("good0", {"jpg": good["good4"]}, "duplicate_key"),
        ("upper_case", {"JPG": good["good4"]}, "ok"),
    ]
    return samples


def write_corrupt_shard(path: str) -> list[tuple[str, str]]:
    """Writes the shard and its index; returns [(key, expected status)] in order."""
    samples = corrupt_samples()
    with tarfile.open(path, "w") as tar:
        for key, components, _ in samples:
            for ext, data in components.items():
                add_file(tar, f"{key}.{ext}", data)
    create_index(path, path[:-4] + ".idx")
    return [(key, status) for key, _, status in samples]


def write_good_only_shard(path: str) -> None:
    """Only the samples that must score ok with real pixels, under the same keys."""
    with tarfile.open(path, "w") as tar:
        for key, components, status in corrupt_samples():
            if status == "ok":
                for ext, data in components.items():
                    add_file(tar, f"{key}.{ext}", data)
    create_index(path, path[:-4] + ".idx")
