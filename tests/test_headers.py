"""image_header against PIL, on real JPEG, PNG and WebP files and on tens of thousands of corrupt variants.

Every file is generated here from seeded RNGs. The properties checked on each case:
(a) never-reject-good: when PIL opens the bytes as JPEG, MPO, PNG or WEBP and decodes them,
    image_header gives the same size;
(b) never-misreport: when image_header gives a size and PIL can open the bytes, PIL gives the same;
(c) image_header returns or raises BadHeader, nothing else;
(d) it returns None exactly when the bytes start with none of the three magics.
(a) is narrowed for PNG headers PIL decodes but libpng refuses; see `libpng_refuses`.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile
from PIL.PngImagePlugin import PngInfo

from pipeline.decode.headers import BadHeader, image_header

DECODABLE = {"JPEG", "MPO", "PNG", "WEBP"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def has_magic(data: bytes) -> bool:
    return (data[:3] == b"\xff\xd8\xff" or data[:8] == PNG_MAGIC
            or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"))


# Files by hand, for what PIL cannot write and for the header rules.

def jpeg(*segments: bytes) -> bytes:
    """SOI, the segments, then a scan header and a few bytes of scan."""
    return b"\xff\xd8" + b"".join(segments) + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" + bytes(16)


def sof(marker: int, width: int, height: int, bits: int = 8, components: int = 1, extra: int = 0) -> bytes:
    """A frame header with `extra` component entries beyond those it declares."""
    body = struct.pack(">BHHB", bits, height, width, components) + b"\x01\x11\x00" * (components + extra)
    return struct.pack(">BBH", 0xFF, marker, len(body) + 2) + body


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def ihdr(width: int, height: int, depth: int = 8, colour: int = 2, compression: int = 0,
         filtering: int = 0, interlace: int = 0) -> bytes:
    fields = struct.pack(">IIBBBBB", width, height, depth, colour, compression, filtering, interlace)
    return png_chunk(b"IHDR", fields)


def png(width: int, height: int, depth: int = 8, colour: int = 2, **fields) -> bytes:
    """A whole PNG of zero pixels with any IHDR values (the pixel data is capped at 64x64)."""
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour, 1)
    rows = (b"\0" + bytes((min(width, 64) * channels * depth + 7) // 8)) * min(height, 64)
    return (PNG_MAGIC + ihdr(width, height, depth, colour, **fields)
            + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b""))


def interlaced_png(pixels: np.ndarray, colour: int) -> bytes:
    """An Adam7 PNG of uint8 or uint16 pixels: PIL reads these but cannot write them."""
    height, width = pixels.shape[:2]
    raw = []
    for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4),
                           (1, 0, 2, 2), (0, 1, 1, 2)):
        sub = pixels[y0::dy, x0::dx].astype(pixels.dtype.newbyteorder(">"))
        if sub.size:
            raw += [b"\0" + row.tobytes() for row in sub]
    depth = 16 if pixels.dtype == np.uint16 else 8
    return (PNG_MAGIC + ihdr(width, height, depth, colour, interlace=1)
            + png_chunk(b"IDAT", zlib.compress(b"".join(raw))) + png_chunk(b"IEND", b""))


def webp(chunk: bytes, payload: bytes) -> bytes:
    body = b"WEBP" + chunk + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


# Files PIL writes.

def photo(rng: np.random.Generator, width: int, height: int, mode: str = "RGB") -> Image.Image:
    """A smooth gradient with grain: compresses like a photo, unlike pure noise."""
    x = np.arange(width, dtype=np.int32)[None, :, None]
    y = np.arange(height, dtype=np.int32)[:, None, None]
    base = (x * 200 // width + y * 200 // height + np.array([0, 60, 120])) % 256
    grain = rng.integers(0, 16, size=(height, width, 3), dtype=np.int32)
    return Image.fromarray((base + grain).clip(0, 255).astype(np.uint8)).convert(mode)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def exif(orientation: int, description_bytes: int = 0) -> Image.Exif:
    tags = Image.Exif()
    tags[0x0112] = orientation
    tags[0x010F] = "shardscore test camera"
    if description_bytes:
        tags[0x010E] = "d" * description_bytes
    return tags


def jpeg_files(rng: np.random.Generator) -> list[tuple[str, bytes]]:
    sizes = [(1, 1), (1, 9), (9, 1), (8, 8), (15, 33), (24, 24), (64, 48), (200, 100), (333, 777),
             (640, 480), (1023, 769), (3000, 40), (40, 3000), (2048, 1536)]
    files = [(f"jpeg {w}x{h}", encode(photo(rng, w, h), "JPEG")) for w, h in sizes]
    fake_icc = bytes(rng.integers(0, 256, 100_000, dtype=np.uint8))  # split over two APP2 segments
    variants = {
        "q1": dict(quality=1), "q50": dict(quality=50), "q100": dict(quality=100),
        "444": dict(subsampling=0), "422": dict(subsampling=1), "420": dict(subsampling=2),
        "progressive": dict(progressive=True), "optimized": dict(optimize=True),
        "progressive optimized": dict(progressive=True, optimize=True, quality=90),
        "exif": dict(exif=exif(6)), "exif 60 KB": dict(exif=exif(8, 60_000)),
        "icc 100 KB": dict(icc_profile=fake_icc), "comment": dict(comment=b"hello \xff\xd9 world"),
        "dpi": dict(dpi=(300, 300)), "restart blocks": dict(restart_marker_blocks=3),
        "restart rows": dict(restart_marker_rows=1),
        "everything": dict(exif=exif(3, 2000), icc_profile=fake_icc[:3000], progressive=True,
                           restart_marker_rows=2, comment=b"c"),
    }
    image = photo(rng, 157, 93)
    files += [(f"jpeg 157x93 {name}", encode(image, "JPEG", **options)) for name, options in variants.items()]
    return files + [
        ("jpeg grayscale", encode(photo(rng, 120, 80, "L"), "JPEG")),
        ("jpeg grayscale progressive", encode(photo(rng, 81, 301, "L"), "JPEG", progressive=True)),
        ("jpeg cmyk", encode(photo(rng, 90, 70, "CMYK"), "JPEG")),
        ("jpeg cmyk progressive", encode(photo(rng, 71, 17, "CMYK"), "JPEG", progressive=True)),
        ("mpo", encode(photo(rng, 100, 60), "MPO", save_all=True, append_images=[photo(rng, 100, 60)])),
        ("mpo frames of other sizes", encode(photo(rng, 48, 40), "MPO", save_all=True,
                                             append_images=[photo(rng, 64, 64), photo(rng, 8, 200)])),
    ]


def png_files(rng: np.random.Generator) -> list[tuple[str, bytes]]:
    image = photo(rng, 97, 61)
    text = PngInfo()
    text.add_text("Comment", "x" * 300)
    files = [(f"png {mode}", encode(image.convert(mode), "PNG")) for mode in ("1", "L", "LA", "P", "RGB", "RGBA")]
    return files + [
        ("png I;16", encode(Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257), "PNG")),
        ("png P 4-bit", encode(image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG", bits=4)),
        ("png 1x1", encode(photo(rng, 1, 1), "PNG")),
        ("png 3000x7", encode(photo(rng, 3000, 7), "PNG")),
        ("png 5x2000 optimized", encode(photo(rng, 5, 2000), "PNG", optimize=True)),
        ("png with text", encode(image, "PNG", pnginfo=text)),
        ("png animated", encode(image, "PNG", save_all=True, append_images=[photo(rng, 97, 61)])),
        ("png interlaced RGB", interlaced_png(np.asarray(image), colour=2)),
        ("png interlaced RGBA", interlaced_png(np.asarray(image.convert("RGBA"))[:13, :11], colour=6)),
        ("png interlaced 16-bit RGB",
         interlaced_png(np.asarray(image, dtype=np.uint16)[:40, :33] * 257, colour=2)),
        ("png interlaced gray 3x1", interlaced_png(np.asarray(image.convert("L"))[:1, :3], colour=0)),
    ]


def webp_files(rng: np.random.Generator) -> list[tuple[str, bytes]]:
    image = photo(rng, 123, 45)
    alpha = image.convert("RGBA")
    alpha.putalpha(Image.fromarray(rng.integers(0, 256, (45, 123), dtype=np.uint8)))
    return [
        ("webp lossy", encode(image, "WEBP", quality=80)),
        ("webp lossy 1x1", encode(photo(rng, 1, 1), "WEBP")),
        ("webp lossy 3000x21", encode(photo(rng, 3000, 21), "WEBP")),
        ("webp lossless", encode(image, "WEBP", lossless=True)),
        ("webp lossless 16383x2", encode(photo(rng, 16383, 2), "WEBP", lossless=True)),
        ("webp lossless alpha", encode(alpha, "WEBP", lossless=True)),
        ("webp lossy alpha", encode(alpha, "WEBP", quality=70)),  # VP8X + ALPH + VP8
        ("webp exif", encode(image, "WEBP", exif=exif(6))),
        ("webp animated", encode(image, "WEBP", save_all=True, duration=40,
                                 append_images=[photo(rng, 123, 45), photo(rng, 123, 45)])),
        ("webp animated lossless", encode(photo(rng, 30, 20), "WEBP", save_all=True, lossless=True,
                                          append_images=[photo(rng, 30, 20)])),
    ]


@pytest.fixture(scope="module")
def real_files() -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(20240601)
    return jpeg_files(rng) + png_files(rng) + webp_files(rng)


# Corruptions.

def header_end(data: bytes) -> int:
    """Roughly where the header ends: the first scan, image data or WebP frame header."""
    for tag, extra in ((b"\xff\xda", 14), (b"IDAT", 8), (b"VP8 ", 30), (b"VP8L", 30)):
        found = data.find(tag)
        if found >= 0:
            return min(len(data), found + extra)
    return min(len(data), 64)


def corruptions(rng: np.random.Generator, data: bytes):
    """Truncations, changed bytes, insertions and repeated segments, aimed mostly at the header."""
    n, end = len(data), header_end(data)
    cuts = set(range(min(n, 200))) | set(rng.integers(0, n, 40).tolist())
    cuts |= set(rng.integers(max(0, end - 40), end + 1, 20).tolist())
    yield from (data[:cut] for cut in sorted(cuts))
    ff = np.flatnonzero(np.frombuffer(data, np.uint8)[:end] == 0xFF)  # JPEG markers start at 0xFF
    for i in range(150):
        changed = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            if len(ff) and i % 2:
                pos = min(n - 1, int(rng.choice(ff)) + int(rng.integers(0, 5)))  # a marker or its length
            else:
                pos = int(rng.integers(0, end if i % 3 else min(n, 40)))
            changed[pos] = int(rng.choice([0, 1, 2, 0xFF, 0xD8, 0xD9, 0xC0, int(rng.integers(256))]))
        yield bytes(changed)
    for _ in range(60):
        pos = int(rng.choice(ff)) if len(ff) and rng.random() < 0.5 else int(rng.integers(2, max(3, end)))
        yield data[:pos] + junk(rng) + data[pos:]
    for _ in range(20 if len(ff) > 1 else 0):
        a, b = sorted(int(v) for v in rng.choice(ff, 2, replace=False))
        yield data[:b] + data[a:b] + data[b:]  # segments twice, so a second frame header at times
    if data.startswith(PNG_MAGIC):
        for _ in range(30):
            changed = bytearray(data)
            changed[int(rng.integers(16, 29))] = int(rng.choice([0, 1, 2, 3, 4, 6, 8, 16, int(rng.integers(256))]))
            changed[29:33] = struct.pack(">I", zlib.crc32(bytes(changed[12:29])))  # IHDR checksum still right
            yield bytes(changed)


def junk(rng: np.random.Generator) -> bytes:
    """Bytes to insert: random bytes, a marker, fill bytes, a comment, EOI+SOI or a frame header."""
    kind = int(rng.integers(6))
    if kind == 0:
        return bytes(rng.integers(0, 256, int(rng.integers(1, 20)), dtype=np.uint8))
    if kind == 1:
        return bytes([0xFF, int(rng.choice([0x00, 0x01, 0x02, 0xC8, 0xD0, 0xD8, 0xD9, 0xF0, 0xFF]))])
    if kind == 2:
        return b"\xff" * int(rng.integers(1, 9))
    if kind == 3:
        return b"\xff\xfe" + struct.pack(">H", int(rng.choice([0, 1, 2, 3, 5]))) + b"com"
    if kind == 4:
        return b"\xff\xd9\xff\xd8"
    marker = int(rng.choice([0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC9, 0xCF, 0xDE]))
    width, height = (int(v) for v in rng.integers(1, 5000, 2))
    return sof(marker, width, height, components=int(rng.choice([1, 3, 4])))


def garbage(rng: np.random.Generator):
    """Empty input, text, and random bytes, bare and behind each magic."""
    yield from (b"", b"this is not an image\n" * 20, b"<html><body>404</body></html>")
    prefixes = [b"", b"\xff\xd8\xff", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xc0\x00\x11\x08", PNG_MAGIC,
                PNG_MAGIC + b"\x00\x00\x00\x0dIHDR", b"RIFF\xff\x00\x00\x00WEBP", b"RIFF\xff\x00\x00\x00WEBPVP8 ",
                b"RIFF\xff\x00\x00\x00WEBPVP8L", b"RIFF\xff\x00\x00\x00WEBPVP8X"]
    for prefix in prefixes:
        for _ in range(400):
            yield prefix + bytes(rng.integers(0, 256, int(rng.integers(0, 80)), dtype=np.uint8))


# The oracle.

def open_with_pil(data: bytes) -> Image.Image | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Image.open(io.BytesIO(data))
    except Exception:
        return None


def decodes_with_pil(image: Image.Image) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
        return True
    except Exception:
        return False


def violation(data: bytes) -> str | None:
    """The property `data` breaks, or None."""
    try:
        result = image_header(data)
    except BadHeader:
        result = "BadHeader"
    except Exception as e:  # noqa: BLE001  (c) is what is checked here
        return f"(c) raised {type(e).__name__}: {e}"
    if (result is None) == has_magic(data):
        return f"(d) returned {result!r} for bytes starting {data[:16]!r}"
    image = open_with_pil(data)
    if image is None:
        return None
    with image:
        pil = ("JPEG" if image.format == "MPO" else image.format, *image.size)
        if isinstance(result, tuple):
            return None if result == pil else f"(b) image_header says {result}, PIL opens a {pil}"
        if image.format in DECODABLE and decodes_with_pil(image):
            return f"(a) image_header gives {result}, PIL opens and decodes a {pil}"
    return None


def libpng_refuses(data: bytes) -> bool:
    """A PNG whose IHDR gives a compression method other than 0 or an interlace method above 1.

    PIL ignores the first byte and reads any nonzero second one as Adam7, so it decodes such a file
    when the rest fits; libpng, which torchvision and DALI decode PNG with, refuses both ("Unknown
    compression method in IHDR", "Unknown interlace method in IHDR"), and so does image_header.
    """
    return data.startswith(PNG_MAGIC) and len(data) > 28 and (data[26] != 0 or data[28] > 1)


def test_real_files_match_pil(real_files):
    for name, data in real_files:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            expected = ("JPEG" if image.format == "MPO" else image.format, *image.size)
        assert image_header(data) == expected, name


def test_properties_hold_on_real_and_corrupt_files(real_files):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    rng = np.random.default_rng(7)
    cases = [data for _, data in real_files]
    cases += [variant for _, data in real_files for variant in corruptions(rng, data)]
    cases += list(garbage(rng))
    failures, narrowed = [], 0
    for data in cases:
        problem = violation(data)
        if problem and problem.startswith("(a)") and libpng_refuses(data):
            narrowed += 1
        elif problem:
            failures.append(problem)
    assert not failures, f"{len(failures)} of {len(cases)} cases fail:\n" + "\n".join(failures[:15])
    assert len(cases) > 30_000 and narrowed < 100
    print(f"{len(cases)} cases; (a) narrowed on {narrowed} PNGs libpng refuses")


def test_hostile_jpeg_reports_its_claimed_size():
    """A few hundred bytes claiming 60000x60000: the caller's pixel limit must see the claim."""
    data = jpeg(b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00",
                sof(0xC0, 60000, 60000, components=3)) + bytes(200)
    assert image_header(data) == ("JPEG", 60000, 60000)


def test_reads_a_memoryview_slice_of_a_numpy_array(real_files):
    files = dict(real_files)
    parts = [files["jpeg 640x480"], files["png RGBA"], files["webp lossy alpha"]]
    a, b = len(parts[0]), len(parts[0]) + len(parts[1])
    view = memoryview(np.frombuffer(b"".join(parts), dtype=np.uint8).copy())
    assert image_header(view[:a]) == ("JPEG", 640, 480)
    assert image_header(view[a:b]) == ("PNG", 97, 61)
    assert image_header(view[b:]) == ("WEBP", 123, 45)
    assert image_header(bytearray(view[a:b])) == ("PNG", 97, 61)
    assert image_header(view[a + 1:b]) is None
    with pytest.raises(BadHeader):
        image_header(view[a:a + 20])
    junk_then_frame = jpeg(b"\xff\xfe\x00\x02" + bytes(10_000), sof(0xC0, 5, 6))  # junk searched a block at a time
    assert image_header(memoryview(np.frombuffer(junk_then_frame, np.uint8))) == ("JPEG", 5, 6)


TABLES_ONLY = b"\xff\xd8\xff\xdb\x00\x43\x00" + bytes(range(1, 65)) + b"\xff\xd9"

RULES = [
    (jpeg(sof(0xC0, 10, 20)), ("JPEG", 10, 20)),
    (jpeg(sof(0xC2, 10, 20), sof(0xC1, 30, 40)), ("JPEG", 30, 40)),  # PIL keeps the last frame header
    (jpeg(sof(0xC0, 10, 20), sof(0xDE, 30, 40)), ("JPEG", 30, 40)),  # and reads DHP as one
    (jpeg(b"\xff\xff\xff\xe0\x00\x02", b"junk", sof(0xC9, 5, 6)), ("JPEG", 5, 6)),
    (jpeg(b"\xff\xd0\xff\x01\xff\x00", sof(0xCF, 5, 6)), ("JPEG", 5, 6)),
    (jpeg(b"\xff\xe1\x00\x02", sof(0xC3, 7, 8, components=3)), ("JPEG", 7, 8)),
    (jpeg(b"\xff\xdb\x00\x01", sof(0xC0, 10, 20)), ("JPEG", 10, 20)),  # an empty segment to PIL and libjpeg
    (TABLES_ONLY + jpeg(sof(0xC0, 3, 4)), ("JPEG", 3, 4)),  # tables-only datastream, then the image
    (TABLES_ONLY + b"\x00" + jpeg(sof(0xC0, 3, 4)), BadHeader),  # libjpeg wants SOI right after EOI
    (jpeg(sof(0xC0, 10, 20), b"\xff\xd9\xff\xd8", sof(0xC0, 3, 4)), BadHeader),  # a frame with no scan
    (TABLES_ONLY, BadHeader),
    (jpeg(sof(0xC0, 10, 20, bits=12)), BadHeader),
    (jpeg(sof(0xC0, 10, 20, components=2)), BadHeader),
    (jpeg(sof(0xC0, 10, 20, extra=1)), BadHeader),  # libjpeg: the length must match the components
    (jpeg(sof(0xC0, 0, 20)), BadHeader),
    (jpeg(sof(0xC0, 10, 0)), BadHeader),  # height from a DNL segment, which PIL refuses too
    (jpeg(b"\xff\x02", sof(0xC0, 10, 20)), BadHeader),
    (jpeg(b"\xff\xe0\x00\x10JFIF"), BadHeader),
    (jpeg(), BadHeader),
    (png(3, 4, 16, 6), ("PNG", 3, 4)),
    (png(3, 4, 2, 0, interlace=1), ("PNG", 3, 4)),
    (png(3, 4, 16, 3), BadHeader),
    (png(3, 4, 3, 0), BadHeader),
    (png(3, 4, filtering=1), BadHeader),
    (png(3, 4, interlace=2), BadHeader),
    (png(0, 4), BadHeader),
    (png(2**31, 4), BadHeader),
    (png(3, 4).replace(ihdr(3, 4)[-4:], b"\0\0\0\0"), BadHeader),
    (webp(b"VP8 ", b"\x50\x01\x00\x9d\x01\x2a\x08\xc0\x04\x00" + bytes(8)), ("WEBP", 8, 4)),  # scale bits
    (webp(b"VP8 ", b"\x50\x01\x00\x9d\x01\x2a\x08\x00\x00\x00" + bytes(8)), BadHeader),  # zero height
    (webp(b"VP8 ", b"\x51\x01\x00\x9d\x01\x2a\x08\x00\x08\x00" + bytes(8)), BadHeader),  # not a key frame
    (webp(b"VP8 ", b"\x50\x01\x00\x9d\x01\x2b\x08\x00\x08\x00" + bytes(8)), BadHeader),  # start code
    (webp(b"VP8 ", b"\x50\x05\x00\x9d\x01\x2a\x08\x00\x08\x00" + bytes(8)), BadHeader),  # partition too long
    (webp(b"VP8L", b"\x2f\x06\xc0\x00\x00" + bytes(10)), ("WEBP", 7, 4)),
    (webp(b"VP8L", b"\x2f\0\0\0\x20" + bytes(10)), BadHeader),  # version 1
    (webp(b"VP8L", b"\x2e" + bytes(14)), BadHeader),
    (webp(b"VP8X", b"\x10\0\0\0\xff\xff\x00\x0f\x00\x00"), ("WEBP", 65536, 16)),
    (webp(b"VP8X", b"\x10\0\0\0" + b"\xff" * 6), BadHeader),  # canvas of 2^48 pixels
    (webp(b"VP8X", b"\x10\0\0\0\x00\x00"), BadHeader),
    (webp(b"ALPH", bytes(16)), BadHeader),
]


@pytest.mark.parametrize("data, expected", RULES)
def test_header_rules(data, expected):
    if expected is BadHeader:
        with pytest.raises(BadHeader):
            image_header(data)
    else:
        assert image_header(data) == expected


def test_header_rules_agree_with_pil():
    assert [violation(data) for data, _ in RULES] == [None] * len(RULES)
    # (a) narrowed as in libpng_refuses, and for a chunk before IHDR, which PIL reads and libpng
    # refuses ("Missing IHDR before tEXt").
    for data in [png(3, 4, compression=1), png(1, 1, interlace=7),
                 PNG_MAGIC + png_chunk(b"tEXt", b"a\0b") + png(3, 4)[8:]]:
        assert violation(data).startswith("(a)")
        with pytest.raises(BadHeader):
            image_header(data)
