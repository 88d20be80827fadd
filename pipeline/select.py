"""`jobs.select`: from scores to a dataset. A SQL predicate over a score folder (optionally joined by key
with metadata Parquet, such as img2dataset's), run by DuckDB, gives the selected samples: written as a
keep-list, and/or copied into new shards by `pipeline.reshard`.

The scores must be complete (`_SUCCESS`, every shard of the run scored, one run identity) unless
`allow_incomplete`. DuckDB reads only the columns the query names, streams, and spills a sort larger
than its memory limit to disk, so memory stays flat whatever the row count. The selection comes out in
shard order and, within a shard, in the order of its rows (the shard's tar order).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.completeness import META_KEY, run_identity
from pipeline.errors import UserError
from pipeline.layout import SUCCESS, OutputLayout, is_url, shard_of

log = logging.getLogger(__name__)

SCORES_ALIAS, META_ALIAS = "scores", "meta"  # the names a predicate can qualify columns with
BATCH_ROWS = 1 << 16
SCORE_COMPONENTS = ("none", "json", "parquet")


@dataclass(frozen=True)
class ReshardSettings:
    """New shards of the selected samples (`pipeline.reshard`)."""

    dir: str | None = None  # where the new shards go; null: no resharding
    shard_size: int = 10_000  # samples per new shard (the last one may hold fewer)
    prefix: str = "shard"  # new shards are <prefix>-NNNNNN.tar, each with its .idx
    scores: str = "none"  # none | json (a `scores.json` component per sample) | parquet (<shard>.parquet beside)
    overwrite: bool = False  # start again when reshard.dir holds another selection's shards
    workers: int | None = None  # new shards written side by side; null: the CPUs this process may use
    debug_delay_s: float = 0.0  # debug: sleep after each new shard (lets a test stop a run midway)

    def __post_init__(self):
        if self.shard_size < 1:
            raise UserError(f"reshard.shard_size={self.shard_size}: give a number of samples >= 1")
        if self.scores not in SCORE_COMPONENTS:
            raise UserError(f"reshard.scores={self.scores!r}: one of {', '.join(SCORE_COMPONENTS)}")
        if self.workers is not None and self.workers < 1:
            raise UserError(f"reshard.workers={self.workers}: give a number of threads >= 1")
        if not self.prefix or "/" in self.prefix:
            raise UserError(f"reshard.prefix={self.prefix!r}: a file name prefix, without '/'")


@dataclass(frozen=True)
class SelectSettings:
    """What to select from which scores, and where the selection goes."""

    output_dir: str  # the scores: a jobs.score output.dir
    where: str  # a SQL predicate over the score columns (and the joined metadata's)
    join: str | None = None  # metadata Parquet (a path, glob or URL) joined by `join_on`
    join_on: str = "key"
    keep_list: str | None = None  # a Parquet of the selected keys and their shards
    shards: str | list | None = None  # the scored shards (data.shards); null: as the scores' run was given them
    index_cache_dir: str | None = None
    allow_incomplete: bool = False
    memory_limit: str = "2GB"  # DuckDB's; a larger sort spills to a temporary folder
    threads: int | None = None  # DuckDB's; null: the CPUs
    reshard: ReshardSettings = field(default_factory=ReshardSettings)

    def __post_init__(self):
        if not str(self.where or "").strip():
            raise UserError('where is required: a SQL predicate over the score columns, e.g. where="score > 5"')
        if not self.keep_list and not self.reshard.dir:
            raise UserError("nothing to write: give keep_list=<path.parquet>, reshard.dir=<folder>, or both")
        if self.keep_list and not self.keep_list.endswith(".parquet"):
            raise UserError(f"keep_list={self.keep_list}: a .parquet path")


@dataclass
class Scores:
    """A score folder's shard files, what they hold, and what is missing from them."""

    layout: OutputLayout
    files: list[str]
    rows: int
    identity: dict
    config: dict
    missing: list[str]  # shards of the run without a file
    problems: list[str]  # why the folder is not complete
    shard_paths: dict[str, str] | None  # the scored shards by name; None where they cannot be found from here


def open_scores(settings: SelectSettings) -> Scores:
    """The score folder, checked: complete (or refused with one line naming what is missing), unless
    allow_incomplete, which selects from the files there are."""
    out = settings.output_dir
    if not is_url(out) and not os.path.isdir(out):
        raise UserError(f"output.dir {out} does not exist")
    layout = OutputLayout(out, create=False)
    files = layout.shard_files()
    if not files:
        raise UserError(f"output.dir {out} holds no shard Parquet files (<shard>.parquet): nothing to select from")
    stored = _stored_metadata(layout, files)
    identities = collections.Counter(json.dumps(run_identity(m), sort_keys=True) for m in stored.values())
    config = stored[files[-1]].get("config") or {}
    shard_paths = _shard_paths(settings, config)
    missing = sorted(set(shard_paths or ()) - {shard_of(f) for f in files})
    problems = []
    if not layout.exists(SUCCESS):
        problems.append("no _SUCCESS")
    if len(identities) > 1:
        problems.append(f"files of {len(identities)} different runs (model, weights, precision or outputs differ)")
    if missing:
        problems.append(f"{len(missing)} shard(s) without scores: {', '.join(missing[:10])}" + (" …" if len(missing) > 10 else ""))
    if problems and not settings.allow_incomplete:
        raise UserError(f"the scores in {out} are incomplete: {'; '.join(problems)}; finish the run (jobs.verify "
                        "says what is left) or give allow_incomplete=true to select from the files there are")
    if problems:
        log.warning("selecting from incomplete scores: %s", "; ".join(problems))
    identity = json.loads(identities.most_common(1)[0][0])
    return Scores(layout, files, sum(m.get("rows", 0) for m in stored.values()), identity, config, missing, problems,
                  shard_paths)


def _stored_metadata(layout: OutputLayout, files: list[str]) -> dict[str, dict]:
    """Each file's shardscore metadata (footers only)."""
    found = {}
    for name in files:
        meta, why = layout.read_footer(name)
        if meta is None or META_KEY not in (meta.metadata or {}):
            raise UserError(f"{layout.path(name)} is not a shardscore output file ({why or 'no shardscore metadata'})")
        found[name] = {**json.loads(meta.metadata[META_KEY]), "rows": meta.num_rows}
    return found


def _shard_paths(settings: SelectSettings, config: dict) -> dict[str, str] | None:
    """The scored shards by name: data.shards, else as the scored run was given them (expanded once, for
    the completeness check and for resharding)."""
    from pipeline.shards import expand_shards, shard_name

    spec = settings.shards or (config.get("data") or {}).get("shards")
    if not spec:
        return None
    try:
        return {shard_name(p): p for p in expand_shards(spec)}
    except UserError:
        return None  # the run's shards are not reachable from here: _SUCCESS and the files decide


# --- the query --------------------------------------------------------------------------------------

def connect(settings: SelectSettings, *roots: str):
    """A DuckDB connection with its memory bounded, reading object storage through fsspec (so the same
    endpoints and credentials as the rest of the job)."""
    import duckdb

    config = {"memory_limit": settings.memory_limit, "temp_directory": tempfile.gettempdir(),
              "autoinstall_known_extensions": False, "autoload_known_extensions": False}
    if settings.threads:
        config["threads"] = settings.threads
    try:
        con = duckdb.connect(config=config)
    except duckdb.Error as e:
        raise UserError(f"duckdb.memory_limit / duckdb.threads: {str(e).splitlines()[0]}") from None
    registered = set()
    for root in roots:
        if root and is_url(root):
            from pipeline.layout import filesystem

            fs = filesystem(root)[0]
            if fs.protocol not in registered:  # DuckDB takes one filesystem per protocol
                con.register_filesystem(fs)
                registered.add(fs.protocol)
    return con


def query(scores: Scores, settings: SelectSettings, columns: str = "key, shard") -> str:
    """The selection's SQL: `columns` of the scores' rows the predicate keeps, in shard and row order."""
    files = ", ".join(_quote(scores.layout.path(f)) for f in scores.files)
    source = f"read_parquet([{files}], file_row_number = true) AS {SCORES_ALIAS}"
    if settings.join:
        # USING when the metadata's column is also `key`: the predicate then names `key` without a table
        on = ('USING ("key")' if settings.join_on == "key" else
              f"ON {SCORES_ALIAS}.key = {META_ALIAS}.{_ident(settings.join_on)}")
        source += f" JOIN read_parquet({_quote(settings.join)}, union_by_name = true) AS {META_ALIAS} {on}"
    picked = ", ".join(f"{SCORES_ALIAS}.{c.strip()}" for c in columns.split(","))
    # A sample is selected once, however many of its metadata rows match (an inner join: a sample
    # without metadata is not selected). The predicate stands on lines of its own: a trailing `--`
    # comment in it ends there.
    once = (f"QUALIFY row_number() OVER (PARTITION BY {SCORES_ALIAS}.shard, {SCORES_ALIAS}.file_row_number) = 1\n"
            if settings.join else "")
    return (f"SELECT {picked} FROM {source} WHERE (\n{settings.where}\n)\n{once}"
            f"ORDER BY {SCORES_ALIAS}.shard, {SCORES_ALIAS}.file_row_number")


def run_query(con, sql: str, settings: SelectSettings) -> pa.RecordBatchReader:
    import duckdb

    try:
        return con.sql(sql).to_arrow_reader(BATCH_ROWS)
    except duckdb.Error as e:
        given = f"where={settings.where!r}" + (f", join={settings.join!r}" if settings.join else "")
        raise UserError(f"the query failed ({given}): {' '.join(str(e).split())[:300]}") from None


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def selection_metadata(settings: SelectSettings, scores: Scores) -> dict:
    """What a keep-list (and a reshard's selection) says about itself."""
    return {"where": settings.where, "join": settings.join, "join_on": settings.join_on if settings.join else None,
            "scores": settings.output_dir, "identity": scores.identity, "rows_scanned": scores.rows,
            "scores_complete": not scores.problems, "scores_problems": scores.problems}


def write_selection(layout: OutputLayout, name: str, reader: pa.RecordBatchReader, metadata: dict,
                    progress=None) -> int:
    """Stream the reader into one Parquet file, atomically; its metadata gets the counts. Returns the rows."""
    rows = 0
    with layout.open_atomic(name) as f:
        writer = pq.ParquetWriter(f, reader.schema, compression="zstd")
        for batch in reader:
            writer.write_batch(batch)
            rows += batch.num_rows
            if progress:
                progress(rows)
        writer.add_key_value_metadata({META_KEY: json.dumps({**metadata, "rows_kept": rows}, default=str)})
        writer.close()
    return rows


def select(settings: SelectSettings) -> dict:
    """Run the selection; write the keep-list and/or the new shards. Returns the summary it printed."""
    from pipeline.reshard import reshard

    started = time.perf_counter()
    scores = open_scores(settings)
    summary = {"rows_scanned": scores.rows, "scores_complete": not scores.problems}
    metadata = selection_metadata(settings, scores)
    if settings.keep_list:
        folder, name = _split(settings.keep_list)
        con = connect(settings, settings.output_dir, settings.join or "")
        reader = run_query(con, query(scores, settings), settings)
        try:
            kept = write_selection(OutputLayout(folder), name, reader, metadata)
        except OSError as e:
            raise UserError(f"keep_list={settings.keep_list}: cannot write it ({e})") from None
        finally:
            con.close()
        summary.update(kept=kept, keep_list=settings.keep_list)
        log.info("keep-list rows=%d path=%s", kept, settings.keep_list)
    if settings.reshard.dir:
        summary.update(reshard(settings, scores, metadata))
        summary.setdefault("kept", summary.get("samples"))
    summary["seconds"] = round(time.perf_counter() - started, 2)
    print(format_summary(summary), flush=True)
    return summary


def _split(path: str) -> tuple[str, str]:
    folder, _, name = path.rstrip("/").rpartition("/")
    return folder or ".", name


def format_summary(s: dict) -> str:
    kept = s.get("kept") or 0
    share = f" ({100 * kept / s['rows_scanned']:.1f} %)" if s["rows_scanned"] else ""
    lines = [f"select   {s['rows_scanned']} rows scanned, {kept} kept{share}"
             + ("" if s["scores_complete"] else " (from incomplete scores)")]
    if s.get("keep_list"):
        lines.append(f"keep     {s['keep_list']}")
    if "shards_written" in s:
        lines.append(f"reshard  {s['reshard_dir']}: {s['shards_written']} shard(s) written, {s['shards_kept']} already "
                     f"there, of {s['shards']}; {s['bytes_written'] / 1e6:.1f} MB")
    lines.append(f"seconds  {s['seconds']}")
    return "\n".join(lines)

