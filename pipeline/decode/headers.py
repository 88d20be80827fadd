"""Image format and size from the first bytes of a JPEG, PNG or WebP file, without a decoder.

The per-sample check runs on the host for every row, so it reads a few header fields with `struct`
instead of opening the image with PIL, which costs ten to twenty times more. The size comes from the
field PIL takes it from, so the two always agree; a header is refused when it is broken or truncated
(PIL could not open it), or when PIL would open it but its decoder (libjpeg, libpng, libwebp) could
never decode it.
"""

from __future__ import annotations

from struct import Struct
from struct import error as StructError
from struct import unpack_from
from zlib import crc32

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# JPEG markers as 0xFFxx. PIL reads the frame size from every SOFn and from DHP, and keeps the last.
_FRAMES = frozenset({0xFFC0, 0xFFC1, 0xFFC2, 0xFFC3, 0xFFC5, 0xFFC6, 0xFFC7, 0xFFC9, 0xFFCA,
                     0xFFCB, 0xFFCD, 0xFFCE, 0xFFCF, 0xFFDE})
_SKIPPED = frozenset({0xFFC4, 0xFFCC, 0xFFDB, 0xFFDC, 0xFFDD, 0xFFDF, 0xFFFE, *range(0xFFE0, 0xFFF0)})
# Markers without a length: JPG, RSTn, SOI, JPGn (as PIL reads them), TEM (as libjpeg does), and
# FF00, a stuffed zero.
_STANDALONE = frozenset({0xFF00, 0xFF01, 0xFFC8, *range(0xFFD0, 0xFFD9), *range(0xFFF0, 0xFFFE)})
_SOS = 0xFFDA
_EOI = 0xFFD9
_MARKER_LENGTH = Struct(">HH").unpack_from
# Real files have tens of segments before their first scan; a hostile one could make the walk long.
_MAX_JPEG_STEPS = 10_000

# (bit depth, colour type) pairs the PNG specification, libpng and PIL allow.
_PNG_DEPTHS = frozenset({(1, 0), (2, 0), (4, 0), (8, 0), (16, 0), (8, 2), (16, 2), (1, 3), (2, 3),
                         (4, 3), (8, 3), (8, 4), (16, 4), (8, 6), (16, 6)})
_PNG_MAX_SIDE = 2**31 - 1

_WEBP_MAX_AREA = 2**32


class BadHeader(ValueError):
    """The bytes start like a JPEG, PNG or WebP but their header is broken or truncated."""


def image_header(data) -> tuple[str, int, int] | None:
    """(format, width, height) with format "JPEG" | "PNG" | "WEBP"; None when `data` starts like none of the three.

    `data` is any bytes-like object of unsigned bytes (bytes, bytearray, a memoryview of uint8); only
    the header is read, and the buffer is never copied whole. Raises BadHeader, and nothing else, when
    the magic matches but the header is broken, truncated or describes an empty image.
    """
    try:
        if data[:3] == b"\xff\xd8\xff":
            width, height = _jpeg_size(data)
            return "JPEG", width, height
        if data[:8] == _PNG_MAGIC:
            width, height = _png_size(data)
            return "PNG", width, height
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            width, height = _webp_size(data)
            return "WEBP", width, height
    except (IndexError, StructError):
        raise BadHeader("header truncated") from None
    return None


def jpeg_truncated(data) -> bool:
    """Whether a JPEG's data stops before its end-of-image marker, as a transfer cut short leaves it.

    Decoders disagree on such files (libjpeg-turbo refuses them, nvJPEG can decode them into a grey
    bottom), so this check decides for all of them. The marker usually ends the file; when it does not
    (padding, or data appended after the image, as in motion photos), it is looked for after the start of
    scan, where entropy-coded data cannot contain it (a 0xFF there is followed by 0x00 or a restart marker)."""
    if data[-2:] == b"\xff\xd9":
        return False
    return bytes(data[_jpeg_walk(data)[1]:]).find(b"\xff\xd9") < 0


def _jpeg_size(data) -> tuple[int, int]:
    return _jpeg_walk(data)[0]


def _jpeg_walk(data) -> tuple[tuple[int, int], int]:
    """Walks the marker segments after SOI the way PIL does, up to the start of scan: ((width, height),
    where the scan header starts)."""
    size = None
    pos = 2
    for _ in range(_MAX_JPEG_STEPS):
        marker, length = _MARKER_LENGTH(data, pos)
        if marker in _SKIPPED:
            # PIL and libjpeg read a length below 2 as an empty segment, not as an error.
            pos += 2 + length if length > 2 else 4
        elif marker in _FRAMES:
            size = _jpeg_frame(data, pos, length)
            pos += 2 + length
        elif marker == _SOS:
            # Segments follow one another, so the scan header fitting means every segment did.
            if length < 2 or pos + 2 + length > len(data):
                raise BadHeader("JPEG scan header truncated")
            break
        elif marker < 0xFF00:
            pos = _next_ff(data, pos + 1)  # junk between segments: PIL and libjpeg skip it
        elif marker == 0xFFFF:
            pos += 1  # a fill byte before a marker
        elif marker in _STANDALONE:
            pos += 2
        elif marker == _EOI:
            # The end of a tables-only datastream, which PIL's libjpeg decoder reads past when it
            # has no frame header and an image datastream follows at once.
            if size is not None or data[pos + 2:pos + 4] != b"\xff\xd8":
                raise BadHeader("JPEG ends (EOI) before its first scan")
            pos += 2
        else:
            raise BadHeader(f"reserved JPEG marker FF{marker & 0xFF:02X}")
    else:
        raise BadHeader(f"JPEG has more than {_MAX_JPEG_STEPS} segments or junk runs before its first scan")
    if size is None:
        raise BadHeader("JPEG has no frame header (SOF) before its first scan")
    return size, pos


def _next_ff(data, pos: int) -> int:
    """Index of the first 0xFF byte at or after `pos` (len(data) if none), without copying `data` whole."""
    if isinstance(data, (bytes, bytearray)):
        found = data.find(b"\xff", pos)
        return len(data) if found < 0 else found
    while pos < len(data):
        found = bytes(data[pos:pos + 4096]).find(b"\xff")
        if found >= 0:
            return pos + found
        pos += 4096
    return len(data)


def _jpeg_frame(data, pos: int, length: int) -> tuple[int, int]:
    """(width, height) from a frame header, which must be one PIL and libjpeg both accept."""
    bits, height, width, components = unpack_from(">BHHB", data, pos + 4)
    if bits != 8:
        raise BadHeader(f"JPEG with {bits}-bit samples; only 8-bit is supported")
    if components not in (1, 3, 4):
        raise BadHeader(f"JPEG with {components} components; only 1, 3 or 4 are supported")
    if length != 8 + 3 * components:
        raise BadHeader(f"JPEG frame header length {length} does not match {components} components")
    if width == 0 or height == 0:
        raise BadHeader(f"JPEG frame is {width}x{height}")
    return width, height


def _png_size(data) -> tuple[int, int]:
    """Reads the IHDR chunk, which must come first, checksum included."""
    length, kind, width, height, depth, colour, compression, filtering, interlace, crc = \
        unpack_from(">I4sIIBBBBBI", data, 8)
    if length != 13 or kind != b"IHDR":
        raise BadHeader("PNG does not start with a 13-byte IHDR chunk")
    if crc32(data[12:29]) != crc:
        raise BadHeader("PNG IHDR checksum mismatch")
    if not (0 < width <= _PNG_MAX_SIDE and 0 < height <= _PNG_MAX_SIDE):
        raise BadHeader(f"PNG is {width}x{height}")
    if (depth, colour) not in _PNG_DEPTHS:
        raise BadHeader(f"PNG bit depth {depth} with colour type {colour}")
    if compression or filtering or interlace > 1:
        raise BadHeader("PNG with an unknown compression, filter or interlace method")
    return width, height


def _webp_size(data) -> tuple[int, int]:
    """Reads the first chunk after RIFF....WEBP: a lossy or lossless frame, or the extended header."""
    riff_size, chunk, chunk_size = unpack_from("<I4x4sI", data, 4)
    if riff_size < 12:
        raise BadHeader(f"WebP RIFF size {riff_size} cannot hold a chunk")
    if chunk == b"VP8 ":
        return _vp8_size(data, chunk_size)
    if chunk == b"VP8L":
        if chunk_size < 5 or data[20] != 0x2F:
            raise BadHeader("WebP lossless header without its signature")
        bits = unpack_from("<I", data, 21)[0]
        if bits >> 29:
            raise BadHeader(f"WebP lossless version {bits >> 29}")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        if chunk_size < 10:
            raise BadHeader(f"WebP extended header of {chunk_size} bytes")
        w_lo, w_hi, h_lo, h_hi = unpack_from("<HBHB", data, 24)
        width, height = (w_lo | w_hi << 16) + 1, (h_lo | h_hi << 16) + 1
        if width * height >= _WEBP_MAX_AREA:
            raise BadHeader(f"WebP canvas {width}x{height} is larger than libwebp allows")
        return width, height
    raise BadHeader(f"WebP whose first chunk is {chunk!r}, not VP8, VP8L or VP8X")


def _vp8_size(data, chunk_size: int) -> tuple[int, int]:
    """A lossy key frame: frame tag, start code, then 14-bit width and height, as libwebp checks them."""
    tag_lo, tag_hi, start, width, height = unpack_from("<HB3sHH", data, 20)
    tag = tag_lo | tag_hi << 16
    if chunk_size < 10 or start != b"\x9d\x01\x2a":
        raise BadHeader("WebP lossy frame without its start code")
    if tag & 1 or (tag >> 1) & 7 > 3 or not (tag >> 4) & 1 or tag >> 5 >= chunk_size:
        raise BadHeader("WebP lossy frame tag is not a shown key frame that fits its chunk")
    width &= 0x3FFF
    height &= 0x3FFF
    if width == 0 or height == 0:
        raise BadHeader(f"WebP is {width}x{height}")
    return width, height
