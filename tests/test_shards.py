"""Shard specs, index files, sample counts and the split across ranks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline.errors import UserError
from pipeline.shards import assign_to_rank, expand_shards, index_path_for, open_shard, read_index


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




def test_many_unindexed_shards_are_indexed_side_by_side(tmp_path):
    """A first run over many shards lists them in forked processes while the model loads; the indexes
    are the ones indexing each shard alone gives."""
    from conftest import ROOT, small_jpegs
    from pipeline.pack import write_shards

    paths = write_shards(small_jpegs(40, seed=81), str(tmp_path), 2, "many")
    expected = {p: open(p[:-4] + ".idx").read() for p in paths}
    for p in paths:
        os.remove(p[:-4] + ".idx")
    # In a fresh process, as a job's: one thread running, so it may fork (20 shards ≥ MIN_SHARDS).
    script = ("import sys; from pipeline.shards import BackgroundIndexing; "
              "i = BackgroundIndexing(sys.argv[1:], None, workers=2); assert i._pool is not None; i.wait()")
    subprocess.run([sys.executable, "-c", script, *paths], cwd=ROOT, check=True)
    assert {p: open(p[:-4] + ".idx").read() for p in paths} == expected
    assert [open_shard(p).count for p in paths] == [2] * 20
