"""Is the whole output complete? Per-rank completion records at the end of every rank, and `_SUCCESS` from
them.

A rank's end-of-run work is proportional to its own shards: it writes a small record of its own
(`_metrics/done-NNNNN.json`: its shards done, failed and remaining, rows, status counts, under which
run), reads the other ranks' records, and whichever rank finds every rank of the same run complete
writes `_manifest.json` and `_SUCCESS`. Only `jobs.verify` (pipeline.verify) opens every shard's index and Parquet file.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import time

from pipeline.completeness import run_identity
from pipeline.layout import MANIFEST, SUCCESS, OutputLayout, metrics_file, record_file

log = logging.getLogger(__name__)

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
    layout.write_json(record_file(record["rank"]), record)
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
    return layout.read_rank_files(record_file)


def rank_metrics(layout: OutputLayout) -> list[dict]:
    return layout.read_rank_files(metrics_file)


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
