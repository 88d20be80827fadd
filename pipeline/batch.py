"""The types that flow between the stages."""

from __future__ import annotations

from dataclasses import dataclass

import torch

OK = "ok"


@dataclass(frozen=True)
class Row:
    """One input sample: where it came from and whether it could be made into an image."""

    key: str
    shard: str  # shard name (the Parquet file's stem)
    label: int | None = None
    status: str = OK  # ok or an error kind: missing_image, duplicate_key, too_large, empty_image, decode_error
    error: str | None = None  # one line, None when ok


@dataclass
class Batch:
    """Exactly `batch_size` images; the first `len(rows)` are real, the rest padding.

    Rows whose status is not ok carry a placeholder image; their model outputs are never written.
    """

    images: torch.Tensor  # [B, 3, H, W] on the scoring device, model dtype, channels_last
    rows: list[Row]

    @property
    def n_valid(self) -> int:
        return len(self.rows)

    @property
    def batch_size(self) -> int:
        return self.images.shape[0]


@dataclass(frozen=True)
class ShardFailure:
    """A shard that could not be read to its end; none of its rows may be written."""

    shard: str
    reason: str


@dataclass
class Predictions:
    """Model outputs for the valid rows of one Batch, in row order (numpy-friendly CPU tensors)."""

    topk_index: torch.Tensor  # [n_valid, k] int32
    topk_prob: torch.Tensor  # [n_valid, k] float32
    logits: torch.Tensor | None = None  # [n_valid, C] float16 when asked for
