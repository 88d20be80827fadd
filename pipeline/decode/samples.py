"""What both decoders do alike before decoding: pick a sample's image, check it, give it a status.

Checks only read the image header (`headers.image_header`, a few bytes for JPEG, PNG and WebP; PIL
for anything else, to name what it is), so a bad or hostile file becomes an error row without ever
being decoded, and both back-ends give the same status for the same bytes.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image

from pipeline.batch import OK
from pipeline.decode.headers import BadHeader, image_header, jpeg_truncated

# Formats both back-ends decode (MPO is the multi-picture JPEG many cameras write).
DECODABLE_FORMATS = {"JPEG", "MPO", "PNG", "WEBP"}


@dataclass(frozen=True)
class SampleRules:
    """How to read a sample, from the data config."""

    image_extensions: tuple[str, ...]
    label_extension: str | None
    max_pixels: int
    keep: tuple[str, ...] = ()  # components copied into string columns of the same name (output.keep_components)

    def is_image(self, ext: str) -> bool:
        return ext.lower() in self.image_extensions

    def is_label(self, ext: str) -> bool:
        return self.label_extension is not None and ext.lower() == self.label_extension.lower()

    def image_of(self, extensions) -> str | None:
        """The image component of a sample with these extensions (in tar order): the first that is one."""
        return next((ext for ext in extensions if ext.lower() in self.image_extensions), None)

    def label_of(self, extensions) -> str | None:
        return next((ext for ext in extensions if self.is_label(ext)), None)

    def kept_of(self, name: str, extensions) -> str | None:
        """The sample's component kept as column `name` (its extension, in any case)."""
        return next((ext for ext in extensions if ext.lower() == name), None)


def add_kept(rows, name: str, data) -> None:
    """Append the last row's kept component as text: None when the sample has none; when it is not valid
    UTF-8, the invalid bytes replaced and a note in the row's error (the row is kept, and scored)."""
    value = None
    if data is not None:
        raw = bytes(data)
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            value = raw.decode("utf-8", errors="replace")
            note = f"{name} is not valid UTF-8 (byte {e.start}); invalid bytes replaced by U+FFFD"
            rows.errors[-1] = note if rows.errors[-1] is None else f"{rows.errors[-1]}; {note}"
    rows.components.setdefault(name, []).append(value)


def sample_status(key: str, image, rules: SampleRules, seen_keys: set[str]) -> tuple[str, str | None]:
    """(status, error) of one sample; ok means `image` should be decoded. `image` is None when the
    sample has no image component, else its bytes (any bytes-like object)."""
    if key in seen_keys:
        return "duplicate_key", f"key {key!r} occurs more than once in the shard"
    seen_keys.add(key)
    if image is None:
        return "missing_image", f"sample has no image component ({'|'.join(rules.image_extensions)})"
    return check_image(image, rules.max_pixels)


def check_image(data, max_pixels: int) -> tuple[str, str | None]:
    """Status from the header alone: empty, broken, not a supported image, or too many pixels."""
    if len(data) == 0:
        return "empty_image", "zero-byte image"
    try:
        header = image_header(data)
    except BadHeader as e:
        return "decode_error", f"corrupt image header: {e}"
    if header is None:
        return _check_other_format(data, max_pixels)
    fmt, width, height = header
    if width * height > max_pixels:
        return "too_large", f"{width}x{height} = {width * height} pixels > data.max_pixels={max_pixels}"
    if fmt == "JPEG" and jpeg_truncated(data):
        return "decode_error", "truncated JPEG: its data ends before the end-of-image marker"
    return OK, None


def _check_other_format(data, max_pixels: int) -> tuple[str, str | None]:
    """Not a JPEG, PNG or WebP: ask PIL what it is, to say so."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(bytes(data))) as im:
                fmt = im.format
    except Image.DecompressionBombError as e:
        return "too_large", one_line(e)
    except Exception:  # PIL raises many kinds for garbage; all mean the same here
        return "decode_error", "not a JPEG, PNG or WebP image (unrecognised bytes)"
    if fmt in DECODABLE_FORMATS:  # PIL reads a header image_header rejects: not safe to decode
        return "decode_error", f"{fmt} image with a header shardscore cannot read"
    return "unsupported_format", f"{fmt} image; supported: JPEG, PNG, WEBP"


def parse_label(data) -> int | None:
    if not data:
        return None
    try:
        return int(bytes(data))
    except ValueError:
        return None


def one_line(error: BaseException | str) -> str:
    text = " ".join(str(error).split())
    return text[:300] or type(error).__name__
