"""`jobs.verify`: is every sample of every input shard in the output exactly once, all under one run?

Per shard it reads only what it must: the Parquet footer (rows, the run identity, status counts) and the
key column, against the keys of the shard's index file. Shards are checked by `workers` processes (local
files: parsing is CPU work) or threads (object storage: waiting on requests), and can be split over
ranks (a Slurm array): each rank checks its share and leaves a record, and the rank that finds every
rank's record merges them and says whether the whole output is complete.
"""

from __future__ import annotations

import collections
import gc
import hashlib
import json
import multiprocessing
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from pipeline.completeness import run_identity, shard_complete, stored_metadata
from pipeline.layout import MANIFEST, SUCCESS, OutputLayout, is_url, shard_file, verify_record_file
from pipeline.manifest import rank_metrics, rank_summary, read_records
from pipeline.shard_index import check_not_truncated, index_keys
from pipeline.shards import assign_to_rank, index_for, shard_name

CHUNK = 8  # shards per task of a worker
KEYS_LISTED = 10


@dataclass
class ShardReport:
    name: str
    expected: int | None
    state: str  # done | missing | incomplete | unreadable_input
    rows: int = 0
    reason: str = ""
    identity: str | None = None  # the file's run identity, as JSON text
    status_counts: dict[str, int] = field(default_factory=dict)
    missing_keys: list[str] = field(default_factory=list)
    duplicate_keys: list[str] = field(default_factory=list)


def check_shard(path: str, layout: OutputLayout, cache_dir: str | None = None) -> ShardReport:
    """One shard's output against its index: its footer, then its keys."""
    name = shard_name(path)
    keys, why = _index_keys(path, cache_dir)
    if keys is None:
        return ShardReport(name, None, "unreadable_input", reason=why)
    report = ShardReport(name, len(keys), "missing")
    meta, why = layout.read_footer(shard_file(name))
    if meta is None:
        report.state, report.reason = ("missing", "no output") if why == "no output yet" else ("incomplete", why)
        return report
    stored = stored_metadata(meta)
    report.rows, report.identity = meta.num_rows, json.dumps(run_identity(stored), sort_keys=True)
    try:
        columns = ["key"] if "status_counts" in stored else ["key", "status"]
        table = layout.read_table(shard_file(name), columns=columns)
    except Exception as e:  # noqa: BLE001 (any damage to the file makes the shard incomplete)
        report.state, report.reason = "incomplete", f"unreadable parquet: {type(e).__name__}"
        return report
    report.status_counts = stored.get("status_counts") or dict(collections.Counter(table.column("status").to_pylist()))
    have = table.column("key").combine_chunks()
    if not have.equals(keys):  # rows in another order, or keys missing or repeated: count them
        want, got = collections.Counter(keys.to_pylist()), collections.Counter(have.to_pylist())
        report.missing_keys, report.duplicate_keys = sorted((want - got).keys()), sorted((got - want).keys())
    if report.rows != len(keys) or report.missing_keys or report.duplicate_keys:
        report.state, report.reason = "incomplete", f"{report.rows} rows for {len(keys)} samples"
    else:
        report.state = "done"
    return report


def _index_keys(path: str, cache_dir: str | None) -> tuple[pa.Array | None, str]:
    """A shard's keys from its index file (a fresh one read directly, checked against the tar's end)."""
    idx, why = index_for(path, cache_dir)
    if idx is None:
        return None, why
    try:
        keys, end = index_keys(idx)
        if not is_url(path) and path.endswith(".tar"):
            check_not_truncated(path, end)
    except (OSError, ValueError) as e:
        return None, f"cannot index: {e}"
    return keys, ""


def check_shards(paths: list[str], out_dir: str, cache_dir: str | None, workers: int) -> list[ShardReport]:
    """Every shard's report, in the order of `paths`."""
    chunks = [paths[i:i + CHUNK] for i in range(0, len(paths), CHUNK)]
    if workers < 2 or len(chunks) < 2:
        return _check_chunk(paths, out_dir, cache_dir)
    # fork only with no other thread running; object storage is waiting, not parsing: threads
    if is_url(out_dir) or any(is_url(p) for p in paths) or threading.active_count() > 1:
        pool = ThreadPoolExecutor(workers)
    else:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=gc.disable)
    with pool:
        return [r for chunk in pool.map(_check_chunk, chunks, [out_dir] * len(chunks), [cache_dir] * len(chunks))
                for r in chunk]


def _check_chunk(paths: list[str], out_dir: str, cache_dir: str | None) -> list[ShardReport]:
    layout = OutputLayout(out_dir)
    return [check_shard(p, layout, cache_dir) for p in paths]


# --- records: one per rank, merged by whichever rank sees them all -------------------------------------

def share_record(reports: list[ShardReport], rank: int, world: int, run: str) -> dict:
    """What a rank found, small whatever its share: counts, each identity's shards (with their rows), and
    the reports of the shards that are not done."""
    identities: dict[str, dict[str, int]] = collections.defaultdict(dict)
    statuses: collections.Counter = collections.Counter()
    for r in reports:
        statuses.update(r.status_counts)
        if r.identity and r.state == "done":
            identities[r.identity][r.name] = r.rows
    return {"run": run, "rank": rank, "world_size": world, "shards": len(reports),
            "expected": sum(r.expected or 0 for r in reports), "rows": sum(r.rows for r in reports),
            "status_counts": dict(statuses), "identities": dict(identities),
            "problems": [asdict(r) for r in reports if r.state != "done"], "finished_at": time.time()}


def merge(records: list[dict], expected_identity: dict | None) -> dict:
    """The whole output from the ranks' records. When the done files are of several runs, those of
    another run than the expected one (the newest completion record's, else the most common) are
    incomplete by the one rule."""
    identities: dict[str, dict[str, int]] = collections.defaultdict(dict)
    statuses: collections.Counter = collections.Counter()
    problems: dict[str, ShardReport] = {}
    for rec in records:
        statuses.update(rec["status_counts"])
        problems.update((p["name"], ShardReport(**p)) for p in rec["problems"])
        for ident, shards in rec["identities"].items():
            identities[ident].update(shards)
    done = {name: rows for shards in identities.values() for name, rows in shards.items()}
    expected = expected_identity or (json.loads(max(identities, key=lambda i: len(identities[i])))
                                     if identities else None)
    for ident, shards in identities.items():
        same, why = shard_complete(0, json.loads(ident), 0, expected or {})
        for name, rows in shards.items() if not same else ():
            problems[name] = ShardReport(name, rows, "incomplete", rows=rows, reason=f"written by another run: {why}")
            del done[name]
    return {"shards": sum(rec["shards"] for rec in records), "expected": sum(rec["expected"] for rec in records),
            "rows": sum(rec["rows"] for rec in records), "shards_done": len(done), "rows_done": sum(done.values()),
            "status_counts": dict(statuses), "identity": expected,
            "problems": sorted(problems.values(), key=lambda p: p.name)}


def _expected_identity(layout: OutputLayout) -> dict | None:
    """The run the output should belong to: the newest completion record's (None: no record)."""
    records = sorted(read_records(layout), key=lambda r: r.get("finished_at", 0))
    return records[-1].get("identity") if records else None


def verify(paths: list[str], layout: OutputLayout, cache_dir: str | None = None, workers: int = 1,
           rank: int = 0, world: int = 1, verification: str = "") -> tuple[bool | None, str, dict]:
    """(complete, printable table, manifest). With `world` > 1 this rank checks its share and leaves a
    record; the rank that finds every rank's record of the same `verification` merges them. A rank that
    does not merge returns (its share is complete, a line saying so, {})."""
    share = assign_to_rank(paths, rank, world) if world > 1 else paths
    reports = check_shards(share, layout.root, cache_dir, workers)
    run = hashlib.sha256(json.dumps([sorted(shard_name(p) for p in paths), world, verification]).encode()).hexdigest()[:16]
    record = share_record(reports, rank, world, run)
    records = [record]
    if world > 1:
        layout.write_json(verify_record_file(rank), record)
        records = {r["rank"]: r for r in layout.read_rank_files(verify_record_file) if r.get("run") == run}
        if len(records) < world:
            missing = sorted(set(range(world)) - set(records))
            return not record["problems"], (
                f"rank {rank} of {world}: {len(share)} shards, {len(record['problems'])} not done; ranks "
                f"{', '.join(map(str, missing[:20]))}{' …' if len(missing) > 20 else ''} still to report (the last "
                "one to finish merges)"), {}
        records = list(records.values())
    merged = merge(records, _expected_identity(layout))
    failed = {}
    for rec in read_records(layout):
        failed.update(rec.get("failed") or {})
    content = manifest(merged, failed)
    return content["complete"], "\n".join(table(merged) + rank_summary(rank_metrics(layout))
                                          + ["complete" if content["complete"] else "NOT complete"]), content


def manifest(merged: dict, failed: dict[str, str]) -> dict:
    """`_manifest.json` as verification writes it (scoring ranks write it from their records)."""
    problems = merged["problems"]
    unreadable = {p.name: p.reason for p in problems if p.state == "unreadable_input"}
    failed = {**unreadable, **{p.name: failed[p.name] for p in problems if p.state == "missing" and p.name in failed}}
    return {
        "complete": not problems,
        "shards": merged["shards"],
        "shards_done": merged["shards_done"],
        "rows": merged["rows_done"],
        "errors": {k: v for k, v in sorted(merged["status_counts"].items()) if k != "ok"},
        "failed": failed,
        "remaining": [p.name for p in problems if p.name not in failed],
        **(merged["identity"] or {}),
        "written_at": time.time(),
        "verified": True,
    }


def table(merged: dict) -> list[str]:
    states = collections.Counter(p.state for p in merged["problems"])
    lines = [
        f"shards   {merged['shards']}: done {merged['shards_done']}, incomplete {states['incomplete']}, "
        f"missing {states['missing']}, failed (unreadable input) {states['unreadable_input']}",
        f"rows     {merged['rows']} for {merged['expected']} input samples",
        "status   " + (", ".join(f"{k}={v}" for k, v in sorted(merged["status_counts"].items())) or "-"),
    ]
    for p in merged["problems"]:
        lines.append(f"  {p.state:<17} {p.name}: {p.reason}")
        for what, keys in (("missing keys", p.missing_keys), ("duplicate keys", p.duplicate_keys)):
            if keys:
                lines.append(f"  {what:<17} {p.name}: {', '.join(keys[:KEYS_LISTED])}"
                             + (" …" if len(keys) > KEYS_LISTED else ""))
    return lines


def write_success(layout: OutputLayout, content: dict) -> None:
    """A complete output that no rank marked (the last one killed after its last commit, say)."""
    if content.get("complete") and not layout.exists(SUCCESS):
        layout.write_json(MANIFEST, content)
        layout.write_new(SUCCESS, json.dumps(content, indent=2, sort_keys=True, default=str).encode())
