"""The types that flow between the stages.

Rows travel as columns (one list per field) rather than one object per sample: every stage then works
per batch, and the writer turns each column into an Arrow array in one call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

OK = "ok"


@dataclass
class Rows:
    """Per-sample columns, in input order: where each sample came from and whether it became an image.

    `status` is ok or an error kind (missing_image, duplicate_key, too_large, empty_image,
    unsupported_format, decode_error); `error` is one line, None when ok. `components` holds the
    sample components kept as columns (`output.keep_components`), bytes or None per row.
    """

    keys: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    labels: list[int | None] = field(default_factory=list)
    status: list[str] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)
    components: dict[str, list] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    def extend(self, other: Rows) -> None:
        self.keys += other.keys
        self.shards += other.shards
        self.labels += other.labels
        self.status += other.status
        self.errors += other.errors
        for name, values in other.components.items():
            self.components.setdefault(name, []).extend(values)

    def slice(self, start: int, stop: int) -> Rows:
        return Rows(self.keys[start:stop], self.shards[start:stop], self.labels[start:stop],
                    self.status[start:stop], self.errors[start:stop],
                    {name: values[start:stop] for name, values in self.components.items()})

    def mark(self, i: int, status: str, error: str) -> None:
        self.status[i], self.errors[i] = status, error

    def shard_runs(self) -> list[tuple[str, int, int]]:
        """(shard, start, stop) for each run of consecutive rows from one shard."""
        runs, start = [], 0
        shards = self.shards
        for i in range(1, len(shards) + 1):
            if i == len(shards) or shards[i] != shards[start]:
                runs.append((shards[start], start, i))
                start = i
        return runs


@dataclass
class Batch:
    """Exactly `batch_size` images, one view of them per preprocessing of the run (its "branches"); the
    first `n_valid` rows are real, the rest padding.

    Rows whose status is not ok carry a placeholder image; their model outputs are never written.
    `ready` (CUDA only) is recorded on the producer's stream once every view is written.
    """

    views: tuple[torch.Tensor, ...]  # each [B, 3, H, W] on the scoring device, model dtype, channels_last
    rows: Rows
    ready: object | None = None

    @property
    def images(self) -> torch.Tensor:
        """The first (in a one-model run, the only) view."""
        return self.views[0]

    @property
    def n_valid(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class ShardFailure:
    """A shard that could not be read to its end; none of its rows may be written."""

    shard: str
    reason: str
