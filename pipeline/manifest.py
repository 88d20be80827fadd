"""Is the whole output complete? Used at the end of every rank, by `jobs.verify` and for `_SUCCESS`.

The quick check reads only Parquet footers (row counts); the full check also reads every key and
status and compares them with the shard index: every input sample exactly once.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from pipeline.shards import open_shard, read_index

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"
MANIFEST = "manifest.json"


@dataclass
class ShardReport:
    name: str
    expected: int | None
    state: str  # done | missing | incomplete | unreadable_input
    rows: int = 0
    reason: str = ""
    status_counts: dict[str, int] = field(default_factory=dict)
    missing_keys: list[str] = field(default_factory=list)
    duplicate_keys: list[str] = field(default_factory=list)


def check_output(paths: list[str], out_dir: str, cache_dir: str | None = None, read_keys: bool = False) -> list[ShardReport]:
    reports = []
    for path in paths:
        shard = open_shard(path, cache_dir)
        if shard.error:
            reports.append(ShardReport(shard.name, None, "unreadable_input", reason=shard.error))
            continue
        reports.append(_check_shard(shard, os.path.join(out_dir, f"{shard.name}.parquet"), read_keys))
    return reports


def _check_shard(shard, parquet: str, read_keys: bool) -> ShardReport:
    report = ShardReport(shard.name, shard.count, "missing")
    if not os.path.exists(parquet):
        report.reason = "no output"
        return report
    try:
        report.rows = pq.read_metadata(parquet).num_rows
        table = pq.read_table(parquet, columns=["key", "status"] if read_keys else ["status"])
    except Exception as e:
        report.state, report.reason = "incomplete", f"unreadable parquet: {type(e).__name__}"
        return report
    report.status_counts = dict(collections.Counter(table.column("status").to_pylist()))
    if read_keys:
        want = collections.Counter(e.key for e in read_index(shard.index_path))
        have = collections.Counter(table.column("key").to_pylist())
        report.missing_keys = sorted((want - have).keys())
        report.duplicate_keys = sorted((have - want).keys())
    if report.rows != shard.count or report.missing_keys or report.duplicate_keys:
        report.state, report.reason = "incomplete", f"{report.rows} rows for {shard.count} samples"
    else:
        report.state = "done"
    return report


def config_hash(config: dict) -> str:
    relevant = {k: v for k, v in config.items() if k not in ("dist", "progress", "hydra")}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def manifest(reports: list[ShardReport], metadata: dict, failed_by_ranks: dict[str, str] | None = None) -> dict:
    """The run's state; shards a rank reported as failed while reading count as failed, not remaining."""
    statuses = collections.Counter()
    for r in reports:
        statuses.update(r.status_counts)
    failed = {r.name: r.reason for r in reports if r.state == "unreadable_input"}
    for r in reports:
        if r.state == "missing" and r.name in (failed_by_ranks or {}):
            failed[r.name] = failed_by_ranks[r.name]
    return {
        "complete": all(r.state == "done" for r in reports),
        "shards": len(reports),
        "shards_done": sum(r.state == "done" for r in reports),
        "rows": sum(r.rows for r in reports if r.state == "done"),
        "errors": {k: v for k, v in statuses.items() if k != "ok"},
        "failed": failed,
        "remaining": [r.name for r in reports if r.state in ("missing", "incomplete") and r.name not in failed],
        "model": metadata.get("model"), "precision": metadata.get("precision"),
        "config_hash": config_hash(metadata.get("config") or {}),
    }


def write_manifest(out_dir: str, content: dict) -> str:
    """`manifest.json` always (a snapshot of the run's state); `_SUCCESS` too when the output is complete."""
    names = [MANIFEST] + ([SUCCESS] if content["complete"] else [])
    for name in names:
        path = os.path.join(out_dir, name)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(content, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    return path


def failed_by_ranks(out_dir: str) -> dict[str, str]:
    failed = {}
    for metrics in rank_metrics(out_dir):
        failed.update(metrics.get("shards_failed") or {})
    return failed


def update_manifest(paths: list[str], out_dir: str, cache_dir: str | None, metadata: dict) -> dict:
    """Called by every rank at its end: whichever finds every shard done writes `_SUCCESS`."""
    reports = check_output(paths, out_dir, cache_dir)
    content = manifest(reports, metadata, failed_by_ranks(out_dir))
    path = write_manifest(out_dir, content)
    if content["complete"]:
        log.info("all %d shards done; wrote %s", content["shards"], path)
    else:
        log.info("output not complete: %d of %d shards done, %d failed", content["shards_done"],
                 content["shards"], len(content["failed"]))
    return content


def rank_metrics(out_dir: str) -> list[dict]:
    folder = os.path.join(out_dir, "metrics")
    if not os.path.isdir(folder):
        return []
    found = []
    for name in sorted(os.listdir(folder)):
        if name.startswith("rank-") and name.endswith(".json"):
            with open(os.path.join(folder, name)) as f:
                found.append(json.load(f))
    return found


def verify(paths: list[str], out_dir: str, cache_dir: str | None = None) -> tuple[bool, str, dict]:
    """Every key of every input shard exactly once? Returns (complete, printable table, manifest)."""
    reports = check_output(paths, out_dir, cache_dir, read_keys=True)
    ranks = rank_metrics(out_dir)
    metadata = {}
    done = [r for r in reports if r.state == "done"]
    if done:
        from pipeline.writer import read_run_metadata

        metadata = read_run_metadata(os.path.join(out_dir, f"{done[0].name}.parquet"))
    content = manifest(reports, metadata, failed_by_ranks(out_dir))
    by_state = collections.Counter(r.state for r in reports)
    statuses = collections.Counter()
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
    lines += rank_summary(ranks)
    lines.append("complete" if content["complete"] else "NOT complete")
    return content["complete"], "\n".join(lines), content


def rank_summary(ranks: list[dict]) -> list[str]:
    """The ranks' last runs: how many of the world reported, which are silent, which stopped or failed."""
    if not ranks:
        return ["ranks    none reported yet (a rank writes its metrics when its run ends)"]
    world = max(ranks, key=lambda m: m.get("finished_at", 0)).get("world_size", 1)
    current = [m for m in ranks if m.get("world_size") == world]
    images = sum(m.get("images", 0) for m in current)
    rate = sum(m.get("sustained_images_per_sec", 0) for m in current)
    lines = [f"ranks    {len(current)} of {world} reported: {images} images scored in their last runs, "
             f"{rate:.1f} images/s summed over ranks"]
    silent = sorted(set(range(world)) - {m.get("rank") for m in current})
    if silent:
        lines.append(f"  not reported      rank {', '.join(map(str, silent[:20]))}" + (" …" if len(silent) > 20 else ""))
    for m in sorted(current, key=lambda m: m.get("rank", 0)):
        if m.get("exit_code"):
            why = f"stopped by {m['stopped_by']}" if m.get("stopped_by") else "failed"
            lines.append(f"  exit code {m['exit_code']:<7} rank {m['rank']}: {why}, "
                         f"{len(m.get('shards_remaining') or [])} shard(s) left, "
                         f"{len(m.get('shards_failed') or {})} failed")
    if len(current) < len(ranks):
        lines.append(f"  ignored           {len(ranks) - len(current)} metrics file(s) of an earlier run "
                     "with another world size")
    return lines
