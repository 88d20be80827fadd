"""Is the whole output complete? Per-rank completion records at the end of every rank, `_SUCCESS` from
them, and the full cross-check of `jobs.verify`.

A rank's end-of-run work is proportional to its own shards: it writes a small record of its own
(`_metrics/done-NNNNN.json`: its shards done, failed and remaining, rows, status counts, under which
run), reads the other ranks' records, and whichever rank finds every rank of the same run complete
writes `_manifest.json` and `_SUCCESS`. Only `jobs.verify` opens every shard and every Parquet file.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field

from pipeline.layout import OutputLayout
from pipeline.shard_index import read_index
from pipeline.shards import open_shard
from pipeline.writer import run_identity, shard_complete, stored_metadata

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"
MANIFEST = "_manifest.json"
METRICS_DIR = "_metrics"
RECORD_PREFIX = "done-"


def run_key(identity: dict, shard_names: list[str], world_size: int) -> str:
    """Which run a record belongs to: the same identity, the same shards, the same split into ranks."""
    text = json.dumps({"identity": identity, "shards": sorted(shard_names), "world": world_size}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def remove_success(layout: OutputLayout) -> None:
    """The output is about to change: a `_SUCCESS` from before no longer holds."""
    for name in (SUCCESS, MANIFEST):
        layout.remove(name)


def finish_rank(layout: OutputLayout, record: dict, metadata: dict) -> dict:
    """Write this rank's completion record; from all ranks' records of the same run, write `_manifest.json`
    (a snapshot) and, when every rank is complete, `_SUCCESS`. Returns the manifest."""
    layout.write_json(f"{METRICS_DIR}/{RECORD_PREFIX}{record['rank']:05d}.json", record)
    records = [r for r in read_records(layout) if r.get("run") == record["run"]]
    content = merge_records(records, record["world_size"], metadata)
    path = layout.write_json(MANIFEST, content)
    if content["complete"]:
        # Once: of ranks finishing together, one writes it; a rerun over a complete output keeps the first.
        if layout.write_new(SUCCESS, json.dumps(content, indent=2, sort_keys=True, default=str).encode()):
            log.info("all %d ranks complete (%d shards); wrote %s and %s", content["ranks"], content["shards"], path,
                     SUCCESS)
    else:
        log.info("output not complete yet: %d of %d ranks complete, %d failed shard(s)", content["ranks_complete"],
                 content["ranks"], len(content["failed"]))
    return content


def read_records(layout: OutputLayout) -> list[dict]:
    return _read_all(layout, RECORD_PREFIX)


def rank_metrics(layout: OutputLayout) -> list[dict]:
    return _read_all(layout, "rank-")


def _read_all(layout: OutputLayout, prefix: str) -> list[dict]:
    found = []
    for name in layout.listdir(METRICS_DIR):
        if name.startswith(prefix) and name.endswith(".json"):
            try:
                found.append(layout.read_json(f"{METRICS_DIR}/{name}"))
            except (OSError, ValueError):  # being replaced right now, or damaged: that rank is not counted
                continue
    return found


def merge_records(records: list[dict], world_size: int, metadata: dict) -> dict:
    by_rank = {r["rank"]: r for r in records}
    statuses: collections.Counter = collections.Counter()
    failed, remaining = {}, []
    for r in by_rank.values():
        statuses.update(r.get("status_counts") or {})
        failed.update(r.get("failed") or {})
        remaining += r.get("remaining") or []
    complete = [rank for rank, r in by_rank.items() if r.get("complete")]
    return {
        "complete": len(complete) == world_size and not failed,
        "ranks": world_size,
        "ranks_reported": len(by_rank),
        "ranks_complete": len(complete),
        "ranks_missing": sorted(set(range(world_size)) - set(by_rank)),
        "shards": sum(r["shards"] for r in by_rank.values()),
        "shards_done": sum(r["done"] for r in by_rank.values()),
        "rows": sum(r["rows"] for r in by_rank.values()),
        "errors": {k: v for k, v in sorted(statuses.items()) if k != "ok"},
        "failed": dict(sorted(failed.items())),
        "remaining": sorted(remaining),
        **run_identity(metadata),
        "written_at": time.time(),
    }


# --- jobs.verify: the full cross-check ---------------------------------------------------------------

@dataclass
class ShardReport:
    name: str
    expected: int | None
    state: str  # done | missing | incomplete | unreadable_input
    rows: int = 0
    reason: str = ""
    identity: dict | None = None
    status_counts: dict[str, int] = field(default_factory=dict)
    missing_keys: list[str] = field(default_factory=list)
    duplicate_keys: list[str] = field(default_factory=list)


def check_output(paths: list[str], layout: OutputLayout, cache_dir: str | None = None) -> list[ShardReport]:
    """Every shard's output against its index: every key exactly once; files under one run identity."""
    reports = []
    for path in paths:
        shard = open_shard(path, cache_dir)
        if shard.error:
            reports.append(ShardReport(shard.name, None, "unreadable_input", reason=shard.error))
            continue
        reports.append(_check_shard(shard, layout, f"{shard.name}.parquet"))
    identities = collections.Counter(json.dumps(r.identity, sort_keys=True) for r in reports if r.identity)
    if len(identities) > 1:
        expected = _expected_identity(layout, identities)
        for r in reports:
            if r.identity and r.state == "done":
                done, why = shard_complete(r.rows, r.identity, r.rows, expected)
                if not done:
                    r.state, r.reason = "incomplete", f"written by another run: {why}"
    return reports


def _expected_identity(layout: OutputLayout, identities: collections.Counter) -> dict:
    """The run the output should belong to: the newest completion record's, else the most common."""
    records = sorted(read_records(layout), key=lambda r: r.get("finished_at", 0))
    if records and records[-1].get("identity"):
        return records[-1]["identity"]
    return json.loads(identities.most_common(1)[0][0])


def _check_shard(shard, layout: OutputLayout, parquet: str) -> ShardReport:
    report = ShardReport(shard.name, shard.count, "missing")
    meta, why = layout.read_footer(parquet)
    if meta is None:
        report.reason = "no output" if why == "no output yet" else why
        report.state = "missing" if why == "no output yet" else "incomplete"
        return report
    try:
        table = layout.read_table(parquet, columns=["key", "status"])
    except Exception as e:
        report.state, report.reason = "incomplete", f"unreadable parquet: {type(e).__name__}"
        return report
    report.rows = meta.num_rows
    report.identity = run_identity(stored_metadata(meta))
    report.status_counts = dict(collections.Counter(table.column("status").to_pylist()))
    want = collections.Counter(read_index(shard.index_path).keys)
    have = collections.Counter(table.column("key").to_pylist())
    report.missing_keys = sorted((want - have).keys())
    report.duplicate_keys = sorted((have - want).keys())
    if report.rows != shard.count or report.missing_keys or report.duplicate_keys:
        report.state, report.reason = "incomplete", f"{report.rows} rows for {shard.count} samples"
    else:
        report.state = "done"
    return report


def manifest_from_reports(reports: list[ShardReport], metadata: dict, failed: dict[str, str]) -> dict:
    statuses: collections.Counter = collections.Counter()
    for r in reports:
        statuses.update(r.status_counts)
    failed = {**{r.name: r.reason for r in reports if r.state == "unreadable_input"},
              **{name: why for name, why in failed.items() if any(r.name == name and r.state == "missing" for r in reports)}}
    return {
        "complete": all(r.state == "done" for r in reports),
        "shards": len(reports),
        "shards_done": sum(r.state == "done" for r in reports),
        "rows": sum(r.rows for r in reports if r.state == "done"),
        "errors": {k: v for k, v in sorted(statuses.items()) if k != "ok"},
        "failed": failed,
        "remaining": [r.name for r in reports if r.state in ("missing", "incomplete") and r.name not in failed],
        **run_identity(metadata),
        "written_at": time.time(),
        "verified": True,
    }


def verify(paths: list[str], layout: OutputLayout, cache_dir: str | None = None) -> tuple[bool, str, dict]:
    """Every key of every input shard exactly once, all under one run? (complete, printable table, manifest)."""
    reports = check_output(paths, layout, cache_dir)
    metadata = {}
    done = [r for r in reports if r.state == "done"]
    if done:
        meta, _ = layout.read_footer(f"{done[0].name}.parquet")
        metadata = stored_metadata(meta) if meta is not None else {}
    failed = {}
    for record in read_records(layout):
        failed.update(record.get("failed") or {})
    content = manifest_from_reports(reports, metadata, failed)
    by_state = collections.Counter(r.state for r in reports)
    statuses: collections.Counter = collections.Counter()
    for r in reports:
        statuses.update(r.status_counts)
    lines = [
        f"shards   {len(reports)}: done {by_state['done']}, incomplete {by_state['incomplete']}, "
        f"missing {by_state['missing']}, failed (unreadable input) {by_state['unreadable_input']}",
        f"rows     {sum(r.rows for r in reports)} for {sum(r.expected or 0 for r in reports)} input samples",
        "status   " + (", ".join(f"{k}={v}" for k, v in sorted(statuses.items())) or "-"),
    ]
    for r in reports:
        if r.state != "done":
            lines.append(f"  {r.state:<17} {r.name}: {r.reason}")
        if r.missing_keys:
            lines.append(f"  missing keys      {r.name}: {', '.join(r.missing_keys[:10])}"
                         + (" …" if len(r.missing_keys) > 10 else ""))
        if r.duplicate_keys:
            lines.append(f"  duplicate keys    {r.name}: {', '.join(r.duplicate_keys[:10])}"
                         + (" …" if len(r.duplicate_keys) > 10 else ""))
    lines += rank_summary(rank_metrics(layout))
    lines.append("complete" if content["complete"] else "NOT complete")
    return content["complete"], "\n".join(lines), content


def format_eta(remaining: int, rate: float) -> str:
    """H:MM:SS until `remaining` images are done at `rate` images/s."""
    if remaining <= 0:
        return "0:00:00"
    if rate <= 0:
        return "unknown"
    seconds = int(remaining / rate)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"



def rank_summary(ranks: list[dict], now: float | None = None) -> list[str]:
    """The ranks of the latest run: running, finished, silent (no metrics, or none refreshed for three
    intervals); images done of the total, the aggregate rate and the ETA while any runs."""
    if not ranks:
        return ["ranks    none reported yet (a rank writes its metrics within log_every_s of starting)"]
    now = time.time() if now is None else now
    latest = max(ranks, key=lambda m: m.get("updated_at") or m.get("finished_at") or 0)
    world = latest.get("world_size", 1)
    current = {m.get("rank"): m for m in ranks if m.get("world_size") == world}
    running = [m for m in current.values() if m.get("running")
               and now - m.get("updated_at", 0) <= 3 * m.get("log_every_s", 60) + 30]
    stale = [m for m in current.values() if m.get("running") and m not in running]
    finished = [m for m in current.values() if not m.get("running")]
    silent = sorted((set(range(world)) - set(current)) | {m["rank"] for m in stale})
    done = sum(m.get("images", 0) for m in current.values())
    total = sum(m.get("total_images", m.get("images", 0)) for m in current.values())
    lines = [f"ranks    {len(running)} running, {len(finished)} finished, {len(silent)} silent of {world}; "
             f"{done} of {total} images of their current runs done"]
    if running:
        rate = sum(m.get("interval_images_per_sec", m.get("sustained_images_per_sec", 0)) for m in running)
        left = sum(m.get("total_images", 0) - m.get("images", 0) for m in running)
        eta = format_eta(left, rate) if rate > 0 else "unknown"
        lines.append(f"  running           {rate:.1f} images/s summed over running ranks, ETA {eta}")
    elif finished:
        rate = sum(m.get("sustained_images_per_sec", 0) for m in finished)
        lines.append(f"  finished          {rate:.1f} images/s summed over ranks (sustained, their last runs)")
    if silent:
        lines.append(f"  silent            rank {', '.join(map(str, silent[:20]))}" + (" …" if len(silent) > 20 else ""))
    for m in sorted(finished, key=lambda m: m.get("rank", 0)):
        if m.get("exit_code"):
            why = f"stopped by {m['stopped_by']}" if m.get("stopped_by") else "failed"
            lines.append(f"  exit code {m['exit_code']:<7} rank {m['rank']}: {why}, "
                         f"{len(m.get('shards_remaining') or [])} shard(s) left, "
                         f"{len(m.get('shards_failed') or {})} failed")
    if len(current) < len(ranks):
        lines.append(f"  ignored           {len(ranks) - len(current)} metrics file(s) of an earlier run "
                     "with another world size")
    return lines
