"""The accuracy gate: an engine scores the dataset only once its outputs on real rows agree with the model's
reference (eager torch; for an ONNX file quantised to int8, the file in fp32).

What is compared is what the model writes: class top-1 where it writes top-k, the cosine of each row's
scores where it writes scores, of each row's embedding where it writes one or a head reads it.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def checks_for(output_kinds: list[str], classifier: bool, embedding_read: bool) -> list[str]:
    """Which comparisons gate a model writing `output_kinds` (unprefixed: topk, scores, embedding)."""
    checks = []
    if "topk" in output_kinds:
        checks.append("top1" if classifier else "output")
    if "scores" in output_kinds and "output" not in checks:
        checks.append("output")
    if "embedding" in output_kinds or embedding_read:
        checks.append("embedding")
    return checks or ["output"]


def compare(reference: dict[str, torch.Tensor], engine: dict[str, torch.Tensor], rows: int, checks: list[str],
            min_top1: float, min_cosine: float) -> dict:
    """Figures over the first `rows` rows and whether they pass: top-1 agreement ≥ `min_top1`, the mean
    per-row cosine ≥ `min_cosine` (the smallest is reported beside it)."""
    figures: dict = {"rows": rows}
    passed = rows > 0
    for check in checks:
        key = "embedding" if check == "embedding" else "output"
        a = reference[key][:rows].float().flatten(1)
        b = engine[key][:rows].float().flatten(1).to(a.device)
        if check == "top1":
            agreement = (a.argmax(1) == b.argmax(1)).float().mean().item()
            figures["top1_agreement"] = round(agreement, 5)
            passed &= agreement >= min_top1
        else:
            cosine = F.cosine_similarity(a, b, dim=1, eps=1e-12)
            figures[f"{key}_cosine_mean"] = round(cosine.mean().item(), 6)
            figures[f"{key}_cosine_min"] = round(cosine.min().item(), 6)
            passed &= cosine.mean().item() >= min_cosine
    figures["passed"] = bool(passed)
    return figures
