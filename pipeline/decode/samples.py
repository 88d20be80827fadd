"""What both decoders do alike before decoding: pick a sample's image, check it, make its Row.

Checks only read the image header, so a bad or hostile file becomes an error row without ever being
decoded, and both back-ends give the same status for the same bytes.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image

from pipeline.batch import OK, Row

# Formats both back-ends decode (MPO is the multi-picture JPEG many cameras write).
DECODABLE_FORMATS = {"JPEG", "MPO", "PNG", "WEBP"}


@dataclass(frozen=True)
class SampleRules:
    """How to read a sample, from the data config."""

    image_extensions: tuple[str, ...]
    label_extension: str | None
    max_pixels: int

    def is_image(self, ext: str) -> bool:
        return ext.lower() in self.image_extensions

    def is_label(self, ext: str) -> bool:
        return self.label_extension is not None and ext.lower() == self.label_extension.lower()


def make_row(key: str, shard: str, image: bytes | None, label: bytes | None,
             rules: SampleRules, seen_keys: set[str]) -> Row:
    """The Row for one sample; status ok means `image` should be decoded."""
    label_value = parse_label(label)
    if key in seen_keys:
        return Row(key, shard, label_value, "duplicate_key", f"key {key!r} occurs more than once in the shard")
    seen_keys.add(key)
    if image is None:
        wanted = "|".join(rules.image_extensions)
        return Row(key, shard, label_value, "missing_image", f"sample has no image component ({wanted})")
    status, error = check_image(image, rules.max_pixels)
    return Row(key, shard, label_value, status, error)


def check_image(data, max_pixels: int) -> tuple[str, str | None]:
    """Status from the header alone: empty, not a supported image, or too many pixels."""
    if len(data) == 0:
        return "empty_image", "zero-byte image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                fmt = im.format
    except Image.DecompressionBombError as e:
        return "too_large", one_line(e)
    except Exception:  # PIL raises many kinds for garbage; all mean the same here
        return "decode_error", "not a JPEG, PNG or WebP image (unrecognised bytes)"
    if fmt not in DECODABLE_FORMATS:
        return "unsupported_format", f"{fmt} image; supported: JPEG, PNG, WEBP"
    if width * height > max_pixels:
        return "too_large", f"{width}x{height} = {width * height} pixels > data.max_pixels={max_pixels}"
    return OK, None


def parse_label(data: bytes | None) -> int | None:
    if not data:
        return None
    try:
        return int(bytes(data).decode().strip())
    except ValueError:
        return None


def one_line(error: BaseException | str) -> str:
    text = " ".join(str(error).split())
    return text[:300] or type(error).__name__
