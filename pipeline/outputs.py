"""Output kinds: each turns the model's output for a batch into named tensors (on the device, once per
batch) and those, for one shard's rows, into Arrow arrays (once per shard). Error rows get nulls.

The writer knows no output column by name: it asks each kind for its fields and arrays.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch


class TopK:
    """Softmax top-k classes: `topk_index`, `topk_prob`, and `topk_label` when the weights name the classes."""

    def __init__(self, k: int, categories: list[str] | None):
        self.k = k
        self.categories = pa.array(categories, pa.string()) if categories is not None else None

    def fields(self) -> list[pa.Field]:
        fields = [pa.field("topk_index", pa.list_(pa.int32())), pa.field("topk_prob", pa.list_(pa.float32()))]
        if self.categories is not None:
            fields.append(pa.field("topk_label", pa.list_(pa.string())))
        return fields

    def compute(self, output: torch.Tensor) -> dict[str, torch.Tensor]:
        k = min(self.k, output.shape[1])
        prob, index = torch.softmax(output.float(), dim=1).topk(k, dim=1)
        return {"topk_index": index.to(torch.int32), "topk_prob": prob}

    def arrays(self, values: dict[str, np.ndarray], valid: np.ndarray) -> dict[str, pa.Array]:
        index, prob = values["topk_index"], values["topk_prob"]
        offsets = pa.array(np.arange(len(index) + 1, dtype=np.int32) * index.shape[1])
        mask = pa.array(~valid)
        arrays = {"topk_index": pa.ListArray.from_arrays(offsets, pa.array(index.reshape(-1)), mask=mask),
                  "topk_prob": pa.ListArray.from_arrays(offsets, pa.array(prob.reshape(-1)), mask=mask)}
        if self.categories is not None:
            labels = self.categories.take(pa.array(index.reshape(-1).astype(np.int64)))
            arrays["topk_label"] = pa.ListArray.from_arrays(offsets, labels, mask=mask)
        return arrays


class Logits:
    """The raw model output as `logits`, fixed_size_list<float16>[classes]."""

    def __init__(self, classes: int):
        self.classes = classes

    def fields(self) -> list[pa.Field]:
        return [pa.field("logits", pa.list_(pa.float16(), self.classes))]

    def compute(self, output: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": output.to(torch.float16)}

    def arrays(self, values: dict[str, np.ndarray], valid: np.ndarray) -> dict[str, pa.Array]:
        flat = pa.array(values["logits"].reshape(-1))
        return {"logits": pa.FixedSizeListArray.from_arrays(flat, self.classes, mask=pa.array(~valid))}


def compute_all(kinds: list, output: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every kind's tensors from one forward pass."""
    values: dict[str, torch.Tensor] = {}
    for kind in kinds:
        values.update(kind.compute(output))
    return values
