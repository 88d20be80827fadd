"""mode=models: what decoding once for several models saves, over photo-size JPEGs and models that cost
nearly nothing (pool → Linear, as in mode=overhead, over every 16th pixel), so decoding, resizing and
normalising are what is timed, as on a GPU node where decoding is the bound.

Variants, each a whole `jobs.score` process (imports included, as a user runs it), rounds rotating:
- `three_runs`: three models with three different preprocessings, one run each (their walls summed);
- `one_pass`: the same three as `models:` in one run (one decode, three resize/crop branches);
- `one_model`: the first of them alone, in the one-model form (`model.*`);
- `embedder` / `embedder_head`: a free 768-wide embedder alone, and with LAION's aesthetic-head shape
  (768→1024→128→64→16→1) on its normalised embedding.
The report gives medians of per-round ratios (paired), and each variant's medians.
"""

from __future__ import annotations

import os
import statistics

import numpy as np

import torch

from pipeline.bench.overhead import EMBEDDING_WIDTH, JobRunner, cpu_flags, read_rank_metrics
from pipeline.bench.report import write_json
from pipeline.pack import encode_jpeg, synthetic_image, write_shards

# (resize, crop, interpolation) of the three models: as a ResNet, a 256-px EfficientNet-style and a CLIP-style model
PREPROCESSINGS = ((256, 224, "bilinear"), (288, 256, "bicubic"), (224, 224, "bicubic"))
HEAD_LAYERS = "[1024,128,64,16,1]"
PHOTO_QUALITY = 90  # ~50 KB at 300-640 px, as web images are


class SampledFreeModel(torch.nn.Module):
    """Pool → Linear over every 16th pixel: at 224 px a full average pool costs ~0.3 ms of CPU per image
    here, as much as a resize, where a GPU's model costs the host nothing; this one costs nearly nothing."""

    def __init__(self, width: int):
        super().__init__()
        self.fc = torch.nn.Linear(3, width)

    def forward(self, x):
        return self.fc(x[:, :, ::16, ::16].float().mean((2, 3)))


def free_model(path: str, width: int) -> str:
    torch.manual_seed(0)
    torch.jit.script(SampledFreeModel(width).eval()).save(path)
    return path


def run_models(settings, bench) -> dict:
    o = bench.models
    root = os.path.join(bench.out_dir, "models")
    os.makedirs(os.path.join(root, "logs"), exist_ok=True)
    classifier = free_model(os.path.join(root, "free-model.pt"), 1000)
    embedder = free_model(os.path.join(root, "free-embedder.pt"), EMBEDDING_WIDTH)
    shards = photo_shards(os.path.join(root, f"photos-{o.images}-q{PHOTO_QUALITY}"), o.images, o.shard_size)
    runner = JobRunner(root, classifier, embedder, o, settings)
    runner.clean()
    variants = variant_args(classifier, embedder, o)
    sizes = [os.path.getsize(os.path.join(shards, f)) for f in os.listdir(shards) if f.endswith(".tar")]
    print(f"mode=models: {o.images} photo-size JPEGs (300-640 px, {sum(sizes) / o.images / 1024:.0f} KB each in "
          f"the tars), batch_size={o.batch_size}, decoder={o.decoder}, {o.rounds} rounds; cpu={cpu_flags()}", flush=True)
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for r in range(o.rounds):
        names = list(variants)
        for name in names[r % len(names):] + names[: r % len(names)]:
            runs = [runner_run(runner, shards, args, f"{name}-{r}-{i}") for i, args in enumerate(variants[name])]
            result = {"wall_seconds": round(sum(x["wall_seconds"] for x in runs), 3),
                      "job_seconds": round(sum(x["job_seconds"] for x in runs), 3),
                      "rows_per_sec": runs[0]["rows_per_sec"], "input_wait_share": runs[0]["input_wait_share"],
                      "peak_rss_mb": max(x["peak_rss_mb"] for x in runs)}
            results[name].append(result)
            print(f"round={r + 1}/{o.rounds} variant={name} wall={result['wall_seconds']:.2f}s "
                  f"job={result['job_seconds']:.2f}s rows_per_sec={result['rows_per_sec']:.0f}", flush=True)
    runner.clean()
    report = summarise(o, results)
    print(format_models_table(report), flush=True)
    path = os.path.join(bench.out_dir, "models.json")
    write_json(report, path)
    print(f"wrote {path}", flush=True)
    return report


def variant_args(classifier: str, embedder: str, o) -> dict[str, list[list[str]]]:
    """Per variant, the jobs.score overrides of each of its processes (beyond data, output, batch, decoder)."""
    def keys(prefix: str, resize: int, crop: int, interp: str) -> list[str]:
        return [f"{prefix}.resize_size={resize}", f"{prefix}.crop_size={crop}", f"{prefix}.interpolation={interp}",
                f"{prefix}.mean=[0.5,0.5,0.5]", f"{prefix}.std=[0.5,0.5,0.5]"]

    singles = [[f"model.path={classifier}", *keys("model", *p)] for p in PREPROCESSINGS]
    several = ["+models={" + ", ".join(f"m{i}: {{source: torchvision, path: '{classifier}'}}"
                                       for i in range(len(PREPROCESSINGS))) + "}"]
    for i, p in enumerate(PREPROCESSINGS):
        several += keys(f"+models.m{i}", *p)
    embed = [f"model.path={embedder}", "outputs=[embedding]", *keys("model", 224, 224, "bicubic")]
    head = ["+models={e: {path: '" + embedder + "', outputs: [embedding]}, aesthetic: {source: head, input: "
            f"e.embedding, normalize_input: true, layers: {HEAD_LAYERS}, hidden_activation: none}}}}",
            *keys("+models.e", 224, 224, "bicubic")]
    return {"three_runs": singles, "one_pass": [several], "one_model": [singles[0]], "embedder": [embed],
            "embedder_head": [head]}


def runner_run(runner: JobRunner, shards: str, args: list[str], name: str) -> dict:
    out = os.path.join(runner.root, "runs", name)
    o = runner.o
    wall, rss = runner.run([f"data.shards='{shards}/*.tar'", f"output.dir={out}", f"batch_size={o.batch_size}",
                            "precision=fp32", "device=cpu", f"decoder={o.decoder}", "progress=false", *runner.loader,
                            *args, *o.extra], name)
    m = read_rank_metrics(out)
    if m["images"] != o.images:
        raise RuntimeError(f"{name} scored {m['images']} images, not {o.images}")
    split = m.get("time_split_seconds") or {}
    return {"wall_seconds": wall, "job_seconds": m["job_seconds"], "rows_per_sec": m["sustained_images_per_sec"],
            "input_wait_share": round(split.get("input", 0) / max(m["seconds"], 1e-9), 3), "peak_rss_mb": round(rss)}


def photo_shards(folder: str, images: int, shard_size: int) -> str:
    """`images` photo-like JPEGs of 300-640 px a side (512 distinct ones, repeated), made once and reused."""
    done = os.path.join(folder, ".complete")
    if os.path.exists(done):
        return folder
    rng = np.random.default_rng(0)
    pool = [encode_jpeg(synthetic_image(rng, 300, 640), quality=PHOTO_QUALITY) for _ in range(min(512, images))]
    write_shards(((f"{i:08d}", {"jpg": pool[i % len(pool)]}) for i in range(images)), folder, shard_size, "photo")
    open(done, "w").close()
    return folder


def _paired(results: dict, a: str, b: str, key: str) -> float:
    return round(statistics.median(x[key] / y[key] for x, y in zip(results[a], results[b])), 3)


def summarise(o, results: dict[str, list[dict]]) -> dict:
    report = {"mode": "models", "cpu_flags": cpu_flags(), "cpu_count": os.cpu_count(), "images": o.images,
              "batch_size": o.batch_size, "decoder": o.decoder, "rounds": o.rounds,
              "preprocessings": [list(p) for p in PREPROCESSINGS], "variants": {}}
    for name, runs in results.items():
        report["variants"][name] = {k: statistics.median(r[k] for r in runs)
                                    for k in ("wall_seconds", "job_seconds", "rows_per_sec", "input_wait_share")}
        report["variants"][name]["rounds"] = runs
    report["three_runs_over_one_pass"] = {k: _paired(results, "three_runs", "one_pass", k)
                                          for k in ("wall_seconds", "job_seconds")}
    report["head_cost"] = {"wall": _paired(results, "embedder_head", "embedder", "wall_seconds"),
                           "job": _paired(results, "embedder_head", "embedder", "job_seconds"),
                           "rows_per_sec": _paired(results, "embedder_head", "embedder", "rows_per_sec")}
    return report


def format_models_table(r: dict) -> str:
    lines = [f"{'variant':<14} {'wall s':>8} {'job s':>8} {'rows/s':>8} {'input wait':>10}"]
    for name, v in r["variants"].items():
        lines.append(f"{name:<14} {v['wall_seconds']:>8.2f} {v['job_seconds']:>8.2f} {v['rows_per_sec']:>8.0f} "
                     f"{v['input_wait_share']:>10.0%}")
    t, h = r["three_runs_over_one_pass"], r["head_cost"]
    lines.append(f"three runs / one pass: {t['wall_seconds']:.2f}x wall, {t['job_seconds']:.2f}x job time (paired medians)")
    lines.append(f"head on the embedding: {h['wall']:.3f}x wall, {h['job']:.3f}x job time, {h['rows_per_sec']:.3f}x rows/s")
    return "\n".join(lines)
