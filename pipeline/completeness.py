"""The one completeness rule: a shard's Parquet file is complete when it holds the shard's row count and
was written under the same run identity. Resume, the completion records, `jobs.verify` and
`jobs.select` all decide by it. Kept free of torch, so that the jobs which only read outputs start fast.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq

META_KEY = b"shardscore"  # the file metadata's key for the run's JSON
# What makes two runs' rows interchangeable: a file written under another identity is redone.
# With several models, `models` holds each one's identity (the others are null): a file is then complete
# when it holds every model of the run, and a model's columns can be kept when only others are missing.
IDENTITY_KEYS = ("model", "source", "weights", "precision", "outputs", "preprocess", "models")


def run_identity(metadata: dict) -> dict:
    """The identity as stored in a file's metadata (JSON: tuples become lists), so the two compare."""
    return json.loads(json.dumps({key: metadata.get(key) for key in IDENTITY_KEYS}, default=str))


def stored_metadata(meta: pq.FileMetaData) -> dict:
    return json.loads((meta.metadata or {}).get(META_KEY, b"{}"))


def shard_complete(rows: int, stored: dict, expected_rows: int, identity: dict) -> tuple[bool, str]:
    """The completeness rule: (done, why not). A shard's file is complete when its footer reads (giving
    `rows` and its `stored` metadata), it holds the shard's row count, and it was written under the same
    run identity (model, source, weights, precision, outputs, preprocessing)."""
    if rows != expected_rows:
        return False, f"{rows} rows, shard has {expected_rows}"
    for key, value in identity.items():
        if stored.get(key) != value:
            return False, f"{key} was {stored.get(key)!r}, now {value!r}"
    return True, ""


def kept_and_dropped(stored: dict, identity: dict) -> tuple[set[str], list[str]]:
    """(the run's models a file holds under the same identity, so their columns can be kept; the models it
    holds that the run does not have). Between a one-model file and a run of several, or the reverse, every
    model of the file is one the run does not have."""
    mine, theirs = identity.get("models") or {}, stored.get("models") or {}
    if not mine and not theirs:  # both of the one-model form: a file of another model is redone, as ever
        return set(), []
    if not mine or not theirs:
        return set(), sorted(theirs) if theirs else [str(stored.get("model"))]
    kept = {name for name, ident in mine.items() if theirs.get(name) == ident}
    return kept, sorted(set(theirs) - set(mine))
