"""mode=engines: what an engine gives end to end, each run a whole `jobs.score` process over the same
photo-size JPEGs, in paired rounds of rotating order:

- per model of `bench.engines.models` (resnet18, resnet50, a ViT): `eager` against `onnxruntime`, fp32,
  the engine exported once before the rounds (that build's seconds reported), then loaded from the cache;
- `int8`: a classifier fitted here (resnet18's random features, a ridge-regression head on a colour rule,
  so that its classes mean something and agreement is not noise) in fp32 eager against its int8 engine,
  calibrated on the run's first images, with the gate opened so that every row is int8's: top-1 agreement
  over every image, beside the speed; and what the gate itself measured on the first batch.
"""

from __future__ import annotations

import os
import statistics

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline.bench.overhead import JobRunner, cpu_flags, read_rank_metrics
from pipeline.bench.report import write_json
from pipeline.bench.several import photo_shards

ARCHITECTURES = {
    "resnet18": ["model=resnet18"],
    "resnet50": ["model=resnet50"],
    "vit": ["model=timm", "model.name=vit_small_patch16_224"],
}
FITTED_CLASSES = 9


def run_engines(settings, bench) -> dict:
    o = bench.engines
    root = os.path.join(bench.out_dir, "engines")
    os.makedirs(os.path.join(root, "logs"), exist_ok=True)
    shards = photo_shards(os.path.join(root, f"photos-{o.images}"), o.images, o.shard_size)
    runner = JobRunner(root, "", "", o, settings)
    cache_dir = os.path.join(root, "engine-cache")
    common = [f"data.shards='{shards}/*.tar'", f"batch_size={o.batch_size}", "precision=fp32", "device=cpu",
              f"decoder={o.decoder}", "progress=false", "model.weights=null", f"engine.cache_dir={cache_dir}",
              *runner.loader, *o.extra]
    print(f"mode=engines: {o.images} photo-size JPEGs, batch_size={o.batch_size}, decoder={o.decoder}, "
          f"{o.rounds} rounds; cpu={cpu_flags()}", flush=True)
    report = {"mode": "engines", "cpu_flags": cpu_flags(), "images": o.images, "batch_size": o.batch_size,
              "rounds": o.rounds, "models": {}}
    for name in o.models:
        variants = {"eager": [*common, *ARCHITECTURES[name]],
                    "onnxruntime": [*common, *ARCHITECTURES[name], "model.backend=onnxruntime"]}
        report["models"][name] = compare(runner, root, name, variants, o.rounds, build_first="onnxruntime")
        print(format_row(name, report["models"][name]), flush=True)
    if o.int8:
        checkpoint = fitted_classifier(os.path.join(root, "fitted-resnet18.pt"))
        fitted = [*common, "model=resnet18", f"model.checkpoint={checkpoint}", f"model.num_classes={FITTED_CLASSES}"]
        variants = {"eager": fitted,
                    "int8": [*fitted, "model.backend=onnxruntime", "precision=int8",
                             f"engine.calibration_images={o.calibration_images}",
                             "engine.gate_top1=1e-9", "engine.gate_cosine=1e-9"]}  # opened: every row is int8's
        result = compare(runner, root, "fitted", variants, o.rounds, build_first="int8")
        result["top1_agreement"] = agreement(result["outputs"]["eager"], result["outputs"]["int8"])
        report["int8"] = result
        print(format_row("fitted int8", result) + f"  top-1 agreement {result['top1_agreement']:.4f}", flush=True)
    path = os.path.join(bench.out_dir, "engines.json")
    write_json(report, path)
    print(f"wrote {path}", flush=True)
    return report


def compare(runner: JobRunner, root: str, name: str, variants: dict[str, list[str]], rounds: int,
            build_first: str) -> dict:
    """Paired rounds of each variant's whole process; the engine variant runs once before them, building
    its engine (that run's figures are the `build` entry)."""
    build = _run(runner, root, f"{name}-{build_first}-build", variants[build_first])
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    order = list(variants)
    for r in range(rounds):
        for v in (order if r % 2 == 0 else order[::-1]):
            runs[v].append(_run(runner, root, f"{name}-{v}-{r}", variants[v]))
    base, other = order
    result = {"variants": {v: {k: statistics.median(x[k] for x in rs) for k in ("wall_seconds", "rows_per_sec")}
                           for v, rs in runs.items()},
              "ratio_rows_per_sec": round(statistics.median(b["rows_per_sec"] / a["rows_per_sec"]
                                                            for a, b in zip(runs[base], runs[other])), 3),
              "ratio_wall": round(statistics.median(b["wall_seconds"] / a["wall_seconds"]
                                                    for a, b in zip(runs[base], runs[other])), 3),
              "build_run": build, "rounds": runs,
              "outputs": {v: rs[-1]["out"] for v, rs in runs.items()}}
    return result


def _run(runner: JobRunner, root: str, name: str, args: list[str]) -> dict:
    out = os.path.join(root, "runs", name)
    wall, rss = runner.run([*args, f"output.dir={out}"], name)
    m = read_rank_metrics(out)
    engines = m.get("engines") or {}
    return {"wall_seconds": round(wall, 3), "rows_per_sec": m["sustained_images_per_sec"], "peak_rss_mb": round(rss),
            "engine": next(iter(engines.values()), None), "out": out}


def agreement(a: str, b: str) -> float:
    """The share of keys whose top-1 class is the same in the two output folders."""
    ta, tb = (pq.read_table(p, columns=["key", "topk_index"]).to_pydict() for p in (a, b))
    first = dict(zip(ta["key"], (i[0] for i in ta["topk_index"])))
    same = [first[k] == i[0] for k, i in zip(tb["key"], tb["topk_index"])]
    return round(float(np.mean(same)), 5)


def fitted_classifier(path: str, images: int = 768) -> str:
    """resnet18 (seeded random features) with its last layer fitted by ridge regression to a colour rule
    (which channel dominates the mean colour × how bright it is: 9 classes), saved as a checkpoint."""
    if os.path.exists(path):
        return path
    import torchvision

    from pipeline.decode.assemble import Preprocess, resize_and_crop
    from pipeline.pack import synthetic_image

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=FITTED_CLASSES).eval()
    rng = np.random.default_rng(7)
    pre = Preprocess(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear")
    mean, std = torch.tensor(pre.mean).view(1, 3, 1, 1), torch.tensor(pre.std).view(1, 3, 1, 1)
    features, labels = [], []
    pooled = {}
    net.avgpool.register_forward_hook(lambda m, i, o: pooled.__setitem__("x", o.flatten(1)))
    for start in range(0, images, 64):
        batch, rule = [], []
        for _ in range(min(64, images - start)):
            pixels = torch.from_numpy(np.asarray(synthetic_image(rng, 300, 640))).permute(2, 0, 1)
            crop = resize_and_crop(pixels, pre)
            batch.append(crop)
            colour = crop.float().mean((1, 2))
            rule.append(int(colour.argmax()) * 3 + min(2, int(colour.mean() / 256 * 3)))
        x = (torch.stack(batch).float() / 255 - mean) / std
        with torch.inference_mode():
            net(x)
        features.append(pooled["x"])
        labels += rule
    f = torch.cat(features).double()
    f = torch.cat([f, torch.ones(len(f), 1, dtype=torch.float64)], 1)
    y = torch.nn.functional.one_hot(torch.tensor(labels), FITTED_CLASSES).double() * 10
    w = torch.linalg.solve(f.T @ f + 1e-3 * len(f) * torch.eye(f.shape[1], dtype=torch.float64), f.T @ y)
    with torch.no_grad():
        net.fc.weight.copy_(w[:-1].T.float())
        net.fc.bias.copy_(w[-1].float())
    accuracy = float(((f @ w).argmax(1) == torch.tensor(labels)).double().mean())
    print(f"fitted classifier: {FITTED_CLASSES} classes, training accuracy {accuracy:.3f} on {images} images",
          flush=True)
    torch.save(net.state_dict(), path)
    return path


def format_row(name: str, r: dict) -> str:
    (a, va), (b, vb) = r["variants"].items()
    build = r["build_run"]["engine"] or {}
    seconds = sum(x["seconds"] for x in build.get("builds", {}).values())
    return (f"{name:<12} {a}: {va['rows_per_sec']:8.1f} rows/s {va['wall_seconds']:7.1f} s   {b}: "
            f"{vb['rows_per_sec']:8.1f} rows/s {vb['wall_seconds']:7.1f} s   rows/s x{r['ratio_rows_per_sec']:.3f} "
            f"wall x{r['ratio_wall']:.3f}   build {seconds:.1f} s")
