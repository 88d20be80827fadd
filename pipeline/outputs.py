"""Output kinds (`outputs=[…]`): each turns the model's outputs for a batch ({"output", "embedding"}) into
named tensors, on the device, and those into Arrow arrays, once per batch each. Error rows get nulls in
every column. The writer knows no output column by name: it asks each kind for its fields and arrays.
A new kind is a class here plus its entry in `KINDS`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from pipeline.errors import UserError


@dataclass(frozen=True)
class OutputOptions:
    """What sizes and shapes the kinds: the model's outputs on one probe image, and the settings."""

    probe: dict  # {"output": tensor [1, …], "embedding": tensor [1, …]}
    topk: int
    categories: list[str] | None
    classifier: bool
    normalize_embedding: bool
    activation: str


class TopK:
    """Softmax top-k classes: `topk_index`, `topk_prob`, and `topk_label` when the weights name the classes."""

    def __init__(self, k: int, categories: list[str] | None):
        self.k = k
        self.categories = pa.array(categories, pa.string()) if categories is not None else None

    @classmethod
    def from_options(cls, o: OutputOptions) -> TopK:
        output = o.probe["output"]
        if not o.classifier or output.dim() != 2 or output.shape[1] < 2:
            gives = "embeddings" if not o.classifier else f"an output of shape {list(output.shape)}"
            raise UserError(f"outputs=[topk] needs a classifier's [batch, classes] output; this model gives "
                            f"{gives}: use outputs=[embedding] or outputs=[scores]")
        named = o.categories is not None and len(o.categories) == output.shape[1]
        return cls(o.topk, o.categories if named else None)

    @property
    def identity(self) -> str:
        return f"topk({self.k})"

    def fields(self) -> list[pa.Field]:
        fields = [pa.field("topk_index", pa.list_(pa.int32())), pa.field("topk_prob", pa.list_(pa.float32()))]
        if self.categories is not None:
            fields.append(pa.field("topk_label", pa.list_(pa.string())))
        return fields

    def compute(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = outputs["output"]
        prob, index = torch.softmax(logits.float(), dim=1).topk(min(self.k, logits.shape[1]), dim=1)
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


class Embedding:
    """The model's pooled features as `embedding`, fixed_size_list<float16>[D]; L2-normalised on request."""

    def __init__(self, dim: int, normalize: bool):
        self.dim, self.normalize = dim, normalize

    @classmethod
    def from_options(cls, o: OutputOptions) -> Embedding:
        return cls(o.probe["embedding"][0].numel(), o.normalize_embedding)

    @property
    def identity(self) -> str:
        return "embedding(normalized)" if self.normalize else "embedding"

    def fields(self) -> list[pa.Field]:
        return [pa.field("embedding", pa.list_(pa.float16(), self.dim))]

    def compute(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        features = outputs["embedding"].float().flatten(1)
        if self.normalize:
            features = torch.nn.functional.normalize(features, dim=1)
        return {"embedding": features.to(torch.float16)}

    def arrays(self, values: dict[str, np.ndarray], valid: np.ndarray) -> dict[str, pa.Array]:
        return {"embedding": pa.FixedSizeListArray.from_arrays(flat_array(values["embedding"], pa.float16()), self.dim,
                                                               mask=pa.array(~valid))}


class Scores:
    """The raw model output, after `output.activation`: `scores` fixed_size_list<float32>[K], or `score`
    (float32) when the model gives one value per image."""

    def __init__(self, width: int, activation: str):
        self.width, self.activation = width, activation
        self.column = "score" if width == 1 else "scores"

    @classmethod
    def from_options(cls, o: OutputOptions) -> Scores:
        return cls(o.probe["output"][0].numel(), o.activation)

    @property
    def identity(self) -> str:
        return f"scores({self.activation})"

    def fields(self) -> list[pa.Field]:
        if self.width == 1:
            return [pa.field("score", pa.float32())]
        return [pa.field("scores", pa.list_(pa.float32(), self.width))]

    def compute(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        scores = outputs["output"].float().flatten(1)
        if self.activation == "sigmoid":
            scores = torch.sigmoid(scores)
        elif self.activation == "softmax":
            scores = torch.softmax(scores, dim=1)
        return {self.column: scores}

    def arrays(self, values: dict[str, np.ndarray], valid: np.ndarray) -> dict[str, pa.Array]:
        scores = values[self.column]
        if self.width == 1:
            return {"score": pa.array(scores.reshape(-1), mask=~valid)}
        return {"scores": pa.FixedSizeListArray.from_arrays(flat_array(scores, pa.float32()), self.width,
                                                            mask=pa.array(~valid))}


def flat_array(values: np.ndarray, type_: pa.DataType) -> pa.Array:
    """A numpy array's values as one flat Arrow array, without a copy (pa.array converts float16 one
    value at a time)."""
    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(type_, values.size, [None, pa.py_buffer(values)])


class Prefixed:
    """A kind whose columns carry its model's name (`clip_embedding`, `aesthetic_score`), for runs of
    several models; the kind itself computes under its own names."""

    def __init__(self, kind, model: str):
        self.kind, self.model, self.prefix = kind, model, f"{model}_"
        self._fields = [f.with_name(self.prefix + f.name) for f in kind.fields()]

    @property
    def identity(self) -> str:
        return self.kind.identity

    def fields(self) -> list[pa.Field]:
        return self._fields

    def compute(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self.prefix + name: value for name, value in self.kind.compute(outputs).items()}

    def arrays(self, values: dict[str, np.ndarray], valid: np.ndarray) -> dict[str, pa.Array]:
        n = len(self.prefix)
        own = {name[n:]: value for name, value in values.items() if name.startswith(self.prefix)}
        return {self.prefix + name: array for name, array in self.kind.arrays(own, valid).items()}


KINDS = {"topk": TopK, "embedding": Embedding, "scores": Scores}


def check_names(names) -> None:
    unknown = [n for n in names if n not in KINDS]
    if unknown or not names or len(set(names)) != len(names):
        raise UserError(f"outputs must be a list of distinct {', '.join(KINDS)}; got {list(names)}")


def make_outputs(names, options: OutputOptions, model: str | None = None) -> list:
    """The output kinds asked for (`outputs=[…]`), sized from the model's outputs on one probe image;
    with `model`, their columns are prefixed with its name."""
    check_names(names)
    kinds = [KINDS[name].from_options(options) for name in names]
    return kinds if model is None else [Prefixed(kind, model) for kind in kinds]


def compute_all(kinds: list, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every kind's tensors from one forward pass."""
    values: dict[str, torch.Tensor] = {}
    for kind in kinds:
        values.update(kind.compute(outputs))
    return values
