"""Shard specs, index files, sample counts and the split across ranks."""

from __future__ import annotations

import io
import os
import pickle
import random
import shutil
import subprocess
import sys
import tarfile

import pytest

from pipeline.errors import UserError
from pipeline.shard_index import _HeaderReads, _list_ustar, create_index, read_index
from pipeline.shards import assign_to_rank, expand_shards, index_path_for, open_shard


def test_every_spec_form_expands_to_the_same_sorted_paths(shards, tmp_path):
    folder = os.path.dirname(shards[0])
    listing = tmp_path / "shards.txt"
    listing.write_text("# my shards\n" + "\n".join(reversed(shards)) + "\n\n")
    forms = [
        f"{folder}/part-{{000000..000002}}.tar",
        f"{folder}/part-*.tar",
        [shards[2], shards[0], f"{folder}/part-000001.tar"],
        str(listing),
    ]
    for spec in forms:
        assert expand_shards(spec) == shards, spec
    assert expand_shards(shards[1]) == [shards[1]]


def test_missing_shards_are_kept_so_they_are_reported(shards):
    paths = expand_shards([shards[0], "/nonexistent/x.tar"])
    assert "/nonexistent/x.tar" in paths
    assert open_shard("/nonexistent/x.tar").error == "no such file"


def test_nothing_matching_is_a_user_error():
    with pytest.raises(UserError, match="matches no file"):
        expand_shards("/nonexistent/{0..3}.tar")


def test_same_name_in_two_folders_is_a_user_error(shards, tmp_path):
    other = tmp_path / "part-000000.tar"
    other.write_bytes(open(shards[0], "rb").read())
    with pytest.raises(UserError, match="share the name"):
        expand_shards([shards[0], str(other)])


def test_index_counts_samples_and_keys(shards):
    shard = open_shard(shards[0])
    assert shard.count == 9 and shard.error is None
    index = read_index(shard.index_path, spans=True)
    assert index.keys == [f"{i:06d}" for i in range(9)]
    assert index.extensions[0] == ["jpg", "cls"] and shard.extensions == {"jpg", "cls"}
    with open(shards[0], "rb") as f:  # the spans point at each component's bytes
        offset, size = index.spans[3][1]
        f.seek(offset)
        assert f.read(size) == b"3"


def test_index_is_created_when_missing_and_cached_elsewhere_for_read_only_folders(shards, tmp_path, monkeypatch):
    copy = tmp_path / "ro" / "part.tar"
    copy.parent.mkdir()
    copy.write_bytes(open(shards[1], "rb").read())
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if (str(p) == str(copy.parent) and mode == os.W_OK)
                        else real_access(p, mode))
    shard = open_shard(str(copy), cache_dir=str(tmp_path / "cache"))
    assert shard.count == 9
    assert shard.index_path.startswith(str(tmp_path / "cache")) and os.path.exists(shard.index_path)
    assert not (copy.parent / "part.idx").exists()
    assert index_path_for(str(copy), str(tmp_path / "cache")) == shard.index_path


def test_stale_index_is_rebuilt(shards, tmp_path):
    tar = tmp_path / "s.tar"
    tar.write_bytes(open(shards[2], "rb").read())
    (tmp_path / "s.idx").write_text("v1.2 1\njpg 512 10 x.jpg\n")
    os.utime(tmp_path / "s.idx", (0, 0))  # older than the tar
    assert open_shard(str(tar)).count == 5


def test_truncated_tar_is_a_failed_shard(shards, tmp_path):
    tar = tmp_path / "t.tar"
    data = open(shards[0], "rb").read()
    tar.write_bytes(data[: len(data) // 3])
    shard = open_shard(str(tar))
    assert shard.count is None and "truncated" in shard.error


def test_ranks_split_shards_disjointly_and_completely():
    paths = [f"/d/{i:03d}.tar" for i in range(10)]
    parts = [assign_to_rank(list(reversed(paths)), r, 3) for r in range(3)]
    assert sorted(p for part in parts for p in part) == paths
    assert all(set(a).isdisjoint(b) for i, a in enumerate(parts) for b in parts[i + 1:])
    assert parts[1] == assign_to_rank(paths, 1, 3)  # deterministic: any rank can be rerun alone




def test_many_unindexed_shards_are_opened_side_by_side(tmp_path):
    """A first run over many shards indexes and opens them in forked processes while the model loads; the
    indexes and Shards are the ones opening each shard alone gives, a damaged shard's error included."""
    from conftest import ROOT, small_jpegs
    from pipeline.pack import write_shards

    paths = write_shards(small_jpegs(40, seed=81), str(tmp_path), 2, "many")
    expected = {p: open(p[:-4] + ".idx").read() for p in paths}
    for p in paths:
        os.remove(p[:-4] + ".idx")
    with open(paths[3], "r+b") as f:  # cut inside its last member: that shard fails, the others open
        f.truncate(os.path.getsize(paths[3]) - 1500)
    # In a fresh process, as a job's: one thread running, so it may fork (20 shards ≥ MIN_SHARDS).
    script = ("import pickle, sys; from pipeline.shards import BackgroundOpening; "
              "o = BackgroundOpening(sys.argv[1:], None, workers=2); assert o._pool is not None; "
              "sys.stdout.buffer.write(pickle.dumps(o.wait()))")
    run = subprocess.run([sys.executable, "-c", script, *paths], cwd=ROOT, check=True, capture_output=True)
    opened = pickle.loads(run.stdout)
    assert list(opened) == paths
    assert {p: open(p[:-4] + ".idx").read() for p in paths if p != paths[3]} == {
        p: v for p, v in expected.items() if p != paths[3]}
    assert opened == {p: open_shard(p) for p in paths}
    assert opened[paths[3]].error and [s.count for s in opened.values() if s.error is None] == [2] * 19


def _tar(members, fmt) -> bytes:
    """A tar in `fmt` of (name, data) files, (name, None) folders and (name, "->target") symlinks."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif isinstance(data, str):
                info.type, info.linkname = tarfile.SYMTYPE, data[2:]
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _tarfile_listing(data: bytes):
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return [(m.offset_data, m.name, m.size) for m in tar if m.isreg()]


MEMBERS = [("train", None), ("train/n01440764", None), ("train/n01440764/n01_1.JPEG", b"\xff\xd8" + bytes(700)),
           ("train/n01440764/n01_1.cls", b"7"), ("empty.txt", b""), ("link.jpg", "->train/n01440764/n01_1.JPEG"),
           ("exact.bin", bytes(1024)), ("naïve/ключ.jpg", b"x" * 5), ("d" * 90 + "/" + "f" * 90 + ".jpg", b"long")]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_header_walk_lists_what_tarfile_lists(fmt, tmp_path):
    data = _tar(MEMBERS, fmt)
    listed = _list_ustar(data)
    (tmp_path / "s.tar").write_bytes(data)
    with open(tmp_path / "s.tar", "rb") as f:  # large tars are read header by header: the same listing
        assert _list_ustar(_HeaderReads(f.fileno(), len(data))) == listed
    if fmt == tarfile.USTAR_FORMAT:  # the layout shards are written in: read without tarfile
        assert listed == _tarfile_listing(data)
        assert [n for _, n, _ in listed][-1] == "d" * 90 + "/" + "f" * 90 + ".jpg"  # name in the ustar prefix
    else:  # GNU long names and pax headers are tarfile's to read
        assert listed is None


def test_header_walk_gives_up_rather_than_differ_from_tarfile_on_damaged_tars():
    """Random bytes changed (with and without a matching checksum) and random cuts: the walk either
    lists exactly what tarfile lists or hands the tar to tarfile."""
    rng = random.Random(5)
    base = _tar(MEMBERS[:-1] + [(f"k{i}.jpg", bytes(rng.randrange(1500))) for i in range(6)], tarfile.USTAR_FORMAT)
    starts = [0] + [off - 512 for off, _, _ in _tarfile_listing(base)]
    fast = 0
    for trial in range(3000):
        data = bytearray(base)
        if trial % 3 == 0:
            data = data[: rng.randrange(len(data))]
        else:
            header = rng.choice(starts)
            for _ in range(rng.randrange(1, 4)):
                data[header + rng.choice([rng.randrange(512), 124 + rng.randrange(12), 156])] = rng.randrange(256)
            if trial % 3 == 2:  # a matching checksum, so the damage reaches the fields themselves
                data[header + 148:header + 156] = b" " * 8
                data[header + 148:header + 156] = b"%06o\0 " % sum(data[header:header + 512])
        data = bytes(data)
        listed = _list_ustar(data)
        if listed is None:
            continue
        fast += 1
        assert listed == _tarfile_listing(data), trial
    assert fast > 200  # the comparison did happen on many damaged tars (240 with this seed)


def test_index_spans_hold_each_members_bytes_in_every_tar_format(tmp_path):
    """Python's ustar, GNU and pax formats, and GNU tar's own archive of a path over 100 bytes (listed by
    GNU tar, as wds2idx does, its data offset would point at the long-name record instead)."""
    tars = []
    for i, fmt in enumerate([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]):
        tars.append(tmp_path / f"s{i}.tar")
        tars[-1].write_bytes(_tar(MEMBERS, fmt))
    if shutil.which("tar"):
        folder = tmp_path / "src" / ("d" * 60) / ("e" * 50)
        folder.mkdir(parents=True)
        (folder / "x.jpg").write_bytes(bytes(range(256)) * 5000)
        (folder / "x.cls").write_bytes(b"3")
        tars.append(tmp_path / "gnu.tar")
        subprocess.run(["tar", "cf", str(tars[-1]), "-C", str(tmp_path / "src"), "."], check=True)
    for path in tars:
        with tarfile.open(path) as tar:
            truth = {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}
        create_index(str(path), str(path) + ".idx")
        index = read_index(str(path) + ".idx", spans=True)
        data = path.read_bytes()
        found = {}
        for key, exts, spans in zip(index.keys, index.extensions, index.spans):
            for ext, (offset, size) in zip(exts, spans):
                found[f"{key}.{ext}"] = data[offset:offset + size]
        assert found == truth, path.name
