"""A shard's index file: the samples a tar holds, in tar order, and where each component's bytes lie.

The format is the one DALI's webdataset reader reads (`v1.2 <samples>`, then one line per sample with
`<ext> <offset> <size> <name>` for each of its components), written here rather than by DALI's `wds2idx`
so that the job runs where DALI is not installed. `split_key` is the one rule for which files form a
sample: the index uses it, so the DALI reader (which groups by the index) and the torch decoder agree.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.layout import is_remote, open_input

INDEX_VERSION = "v1.2"
PLAIN_TAR = (".tar",)


@dataclass(frozen=True)
class ShardIndex:
    """A shard's samples in tar order: each one's key and component extensions, and where its data ends."""

    keys: list[str]
    extensions: list[list[str]]
    end: int  # the byte after the last component's data
    spans: list[list[tuple[int, int]]] | None = None  # (offset, size) of each component, when asked for


def split_key(name: str) -> tuple[str, str]:
    """(key, extension) of a tar member: the key is the name up to the first dot after the last slash,
    as webdataset and DALI split it. A member whose key is empty or ends in "/" (a hidden file) is no
    sample's component."""
    dot = name.find(".", name.rfind("/") + 1)
    return name[:dot], name[dot + 1:]  # without a dot: (name minus its last character, name), as DALI's tool splits


def is_component(key: str) -> bool:
    return bool(key) and not key.endswith("/")


def group_by_key(members: Iterable[tuple[str, object]]) -> Iterator[tuple[str, list[tuple[str, object]]]]:
    """(key, [(extension, item), …]) for each run of consecutive members with the same key."""
    key, parts = None, []
    for name, item in members:
        base, ext = split_key(name)
        if not is_component(base):
            continue
        if base != key:
            if key is not None:
                yield key, parts
            key, parts = base, []
        parts.append((ext, item))
    if key is not None:
        yield key, parts


def create_index(path: str, idx: str) -> None:
    """Write `idx` for the tar at `path` (local, or a URL streamed once), atomically."""
    lines = []
    for key, parts in group_by_key((name, (offset, size, name)) for offset, name, size in list_members(path)):
        for _, (_, _, name) in parts:
            if len(name.split()) != 1:
                raise ValueError(f"member name {name!r} holds whitespace, which index files cannot hold")
        lines.append(" ".join(f"{ext} {offset} {size} {name}" for ext, (offset, size, name) in parts))
    if not lines:
        raise ValueError("the tar holds no samples")
    os.makedirs(os.path.dirname(idx) or ".", exist_ok=True)
    body = "\n".join(lines)
    data = f"{INDEX_VERSION} {len(lines)}\n{body}\n".encode()
    tmp = f"{idx}.tmp-{os.getpid()}"
    try:
        # One unbuffered write: a buffered text file costs several times as much, paid once per shard.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, idx)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_index(idx: str, spans: bool = False) -> ShardIndex:
    """The index file's samples; with `spans`, where each component's data lies in the tar too."""
    keys: list[str] = []
    extensions: list[list[str]] = []
    where: list[list[tuple[int, int]]] = []
    fields: list[str] = []
    with open(idx) as f:
        header = f.readline().split()
        if len(header) != 2 or not header[0].startswith("v1."):
            raise ValueError(f"{idx} is not an index file")
        for line in f:
            fields = line.split()
            if not fields or len(fields) % 4:
                raise ValueError(f"malformed line in {idx}: {line.strip()[:80]}")
            keys.append(split_key(fields[3])[0])
            extensions.append(fields[0::4])
            if spans:
                where.append([(int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields), 4)])
    if len(keys) != int(header[1]):
        raise ValueError(f"{idx} lists {len(keys)} samples, its header says {header[1]}")
    # Samples are listed in tar order, so the last one's components end last.
    end = max((int(fields[i + 1]) + int(fields[i + 2]) for i in range(0, len(fields), 4)), default=0)
    return ShardIndex(keys, extensions, end, where if spans else None)


def index_keys(idx: str) -> tuple[pa.Array, int]:
    """(the keys, in tar order, as one Arrow array; where the data ends): what `read_index` gives, for
    checks that need only those, at a fifth of its cost (the lines are split by Arrow, not one by one)."""
    keys, _, end = index_lines(idx)
    return keys, end


def index_lines(idx: str) -> tuple[pa.Array, pa.Array, int]:
    """(the keys as an Arrow array, each sample's line of the index, where the data ends); `spans` turns
    a line into its components."""
    with open(idx, "rb") as f:
        data = f.read()
    first = data.find(b"\n")
    header = data[:first].split()
    if len(header) != 2 or not header[0].startswith(b"v1."):
        raise ValueError(f"{idx} is not an index file")
    body = data[first + 1:].rstrip(b"\n")
    lines = pa.array(body.split(b"\n") if body else [], pa.binary()).cast(pa.string())
    if len(lines) != int(header[1]):
        raise ValueError(f"{idx} lists {len(lines)} samples, its header says {header[1].decode()}")
    if not len(lines):
        return pa.array([], pa.string()), lines, 0
    keys = keys_of_names(pc.list_element(pc.split_pattern(lines, " ", max_splits=4), 3))
    last = lines[-1].as_py().split()
    end = max(int(last[i + 1]) + int(last[i + 2]) for i in range(0, len(last) - 3, 4))
    return keys, lines, end


def keys_of_names(names: pa.Array) -> pa.Array:
    """The keys of member names (each sample's first), by `split_key`'s rule."""
    if names.null_count or pc.any(pc.match_substring(names, "/")).as_py() or \
            not pc.all(pc.match_substring(names, ".")).as_py():  # folders or no extension: split_key decides
        return pa.array([split_key(n)[0] for n in names.to_pylist()], pa.string())
    return pc.list_element(pc.split_pattern(names, ".", max_splits=1), 0)


def spans(line: str) -> list[tuple[str, int, int]]:
    """An index line's components: (extension, data offset, size) each."""
    fields = line.split()
    return [(fields[i], int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields) - 3, 4)]


def check_remote_size(end: int, size: int) -> None:
    """A remote tar holds all its indexed data (its end marker is not fetched: that would cost a request)."""
    if end > size:
        raise ValueError(f"truncated tar: data runs to byte {end}, the object has {size}")


def check_not_truncated(path: str, end: int) -> None:
    """A complete tar holds all its indexed data and ends with the two zero blocks of its end marker."""
    size = os.path.getsize(path)
    if end > size:
        raise ValueError(f"truncated tar: data runs to byte {end}, file has {size}")
    with open(path, "rb") as f:
        f.seek(max(0, size - 1024))
        if size < end + 1024 or f.read(1024).strip(b"\0"):
            raise ValueError("truncated tar: no end-of-archive marker")


# --- listing a tar --------------------------------------------------------------------------------

def list_members(path: str) -> list[tuple[int, str, int]] | Iterator[tuple[int, str, int]]:
    """(data offset, name, size) of every regular file, in tar order. Local plain tars by a walk over
    their ustar headers; anything else (pax, GNU long names, compressed or remote tars) by tarfile."""
    if is_remote(path):
        return _tarfile_members(path, "r|*")
    if path.endswith(PLAIN_TAR):
        listed = _list_plain_tar(path)
        if listed is not None:
            return listed
    return _tarfile_members(path, "r:" if path.endswith(PLAIN_TAR) else "r:*")


def _tarfile_members(path: str, mode: str) -> Iterator[tuple[int, str, int]]:
    with open_input(path) as stream, tarfile.open(fileobj=stream, mode=mode) as archive:
        for member in archive:
            if member.isreg():
                yield member.offset_data, member.name, member.size


def _list_plain_tar(path: str) -> list[tuple[int, str, int]] | None:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        return _list_ustar(f.read() if size <= WHOLE_READ_BYTES else _HeaderReads(f.fileno(), size))


WHOLE_READ_BYTES = 1 << 20  # smaller tars are read at once; larger ones header by header


class _HeaderReads:
    """`bytes`-like slices of an open file, each one `pread`: the headers of a large tar without reading
    the data between them (a memory map would crash the process if the file shrank meanwhile)."""

    def __init__(self, fd: int, size: int):
        self.fd, self.size = fd, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, span: slice) -> bytes:
        return os.pread(self.fd, span.stop - span.start, span.start)


_REGULAR = (b"0", b"\0", b"7")
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, folders: tarfile skips no data after them
_ZERO_BLOCK = bytes(512)
_OTHER_NUMBERS = ((100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345))  # mode … devminor


def _octal(field: bytes) -> int:
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _list_ustar(data) -> list[tuple[int, str, int]] | None:
    """(data offset, name, size) of each regular file in `data` (bytes or `_HeaderReads`), exactly as
    tarfile lists them, for the plain ustar headers shards are written with; None for anything else (pax
    or GNU long-name records, numbers in base 256, a bad checksum, no end marker), which tarfile then
    lists. tarfile spends ~50 µs of Python per member, most of a small shard's fixed cost."""
    members, pos, end = [], 0, len(data)
    while True:
        header = data[pos:pos + 512]
        if len(header) < 512:
            return None  # no end marker: tarfile decides
        if header == _ZERO_BLOCK:
            return members
        kind = header[156:157]
        if (kind not in _REGULAR and kind not in _NO_DATA) or header[124] & 0x80 or header[148] & 0x80:
            return None
        try:
            size, checksum = _octal(header[124:136]), _octal(header[148:156])
            for start, stop in _OTHER_NUMBERS:  # tarfile rejects a header with any of them unreadable
                if header[start] not in (0x80, 0xFF):
                    _octal(header[start:stop])
        except ValueError:
            return None
        if checksum != sum(header) - sum(header[148:156]) + 256:  # the field counts as eight spaces
            return None
        name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        if kind in _NO_DATA or (kind == b"\0" and name.endswith("/")):  # an old-style folder
            pos += 512
            continue
        if pos + 512 + size > end:
            return None
        members.append((pos + 512, name, size))
        pos += 512 + (size + 511) // 512 * 512
