"""mode=e2e: the whole job against simple baselines and its two ceilings, over the same images.

  naive        per image: PIL decode, torchvision transforms, model(x.unsqueeze(0)) in fp32
  dataloader   webdataset + DataLoader(num_workers) + PIL + torchvision transforms, fp32, batch_size
  score_dali   pipeline.runner.score with decoder=dali, in this process (images/s from its metrics JSON)
  score_torch  the same with decoder=torch
  decode_only  the DALI decoder with no model: the input ceiling
  model_only   the job's Scorer on pre-decoded Batches at the run's precision and batch size: the model ceiling

Every variant is timed by a `Meter`, so images/s means the same everywhere: the images after the first
two batches of `batch_size`, over the time they took (the whole-run rate, start-up included, is kept too).
Each round runs every variant once, in an order rotated per round, so the drift of a shared machine hits
all alike; the report gives medians over rounds. On a CPU, decoding and the model share the cores, so the
most a pipeline can reach is bound = 1/(1/decode + 1/model); on CUDA they run side by side: min(decode, model).
Every image must decode (the naive baselines have no error rows).
"""

from __future__ import annotations

import functools
import gc
import io
import json
import logging
import os
import shutil
import statistics
import tempfile
from dataclasses import dataclass, field, replace

import torch
from PIL import Image

from pipeline import device as dev
from pipeline.batch import Batch, ShardFailure
from pipeline.bench import BenchSettings
from pipeline.bench.report import format_e2e_table, plot_e2e, write_json
from pipeline.decode import Preprocess, SampleRules, choose_decoder, make_decoder
from pipeline.errors import EXIT_OK, UserError
from pipeline.meter import Meter
from pipeline.model import load_model
from pipeline.outputs import compute_all
from pipeline.runner import Plan, plan, score
from pipeline.scorer import Scorer
from pipeline.settings import DataSettings, DistSettings, ScoreSettings
from pipeline.shards import Shard, expand_shards, open_shard

log = logging.getLogger(__name__)

WARMUP_BATCHES = 2  # as the job's Meter: left out of images/s
KEPT_BATCHES = 16  # decoded batches model_only replays: memory bounded whatever the run's size


@dataclass
class E2ERun:
    """What every variant shares: the job's plan, the resolved settings, the shards, and decoded input."""

    plan: Plan
    settings: ScoreSettings  # batch_size and precision resolved, data.shards = exactly the chosen shards
    shards: list[Shard]
    images: int
    workers: int
    decoded: list[Batch] = field(default_factory=list)  # model_only's input
    _models: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.plan.batch_size

    @property
    def device(self) -> torch.device:
        return self.plan.device

    @property
    def dtype(self) -> torch.dtype:
        return self.plan.dtype

    def model(self, dtype: torch.dtype) -> torch.nn.Module:
        """The job's model ({"output", …} from images) at `dtype`: the plan's own at the run's precision."""
        if dtype == self.plan.dtype:
            return self.plan.loaded.module
        if dtype not in self._models:
            s = self.settings
            self._models[dtype] = load_model(s.model, self.device, dtype, s.seed, False, self.plan.build).module
        return self._models[dtype]

    def meter(self, warmup_batches: int = WARMUP_BATCHES) -> Meter:
        return Meter(self.images, self.device, progress=False, warmup_batches=warmup_batches)


def run_e2e(settings: ScoreSettings, bench: BenchSettings, build=None) -> dict:
    """Run every variant for bench.e2e.rounds rounds; print the table, write e2e.json and e2e.png."""
    run = prepare(settings, bench, build)
    variants = list(bench.e2e.variants)
    if "score_dali" in variants or "decode_only" in variants:
        choose_decoder("dali", run.shards)  # a UserError now when DALI cannot read these shards
    print(f"e2e: model={settings.model.label} precision={run.settings.precision} "
          f"batch_size={run.batch_size} images={run.images} shards={len(run.shards)} device={dev.describe(run.device)} "
          f"loader.threads={settings.loader.threads} loader.prefetch={settings.loader.prefetch} "
          f"workers={run.workers} rounds={bench.e2e.rounds}", flush=True)
    padding = -run.images % run.batch_size
    if padding:
        log.warning("images=%d is not a multiple of batch_size=%d: the job and model_only pad their last batch "
                    "with %d rows the model still computes; naive and dataloader do not", run.images,
                    run.batch_size, padding)
    # Warm-up pass: page cache, DALI start-up; its Batches are model_only's pre-decoded input.
    _, run.decoded = decode_only(run, choose_decoder("auto", run.shards), keep="model_only" in variants)
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for r in range(bench.e2e.rounds):
        for name in variants[r % len(variants):] + variants[: r % len(variants)]:
            # The last variant's DALI pipelines sit in reference cycles: free them here, as a forked
            # DataLoader worker that collected them would hang in DALI's destructor.
            gc.collect()
            result = VARIANTS[name](run)
            if result["images"] != run.images:
                raise RuntimeError(f"variant {name} processed {result['images']} images, not {run.images}")
            results[name].append(result)
            print(f"round={r + 1}/{bench.e2e.rounds} variant={name} "
                  f"images_per_sec={result['sustained_images_per_sec']:.1f}", flush=True)
    report = summarise(run, bench, results)
    print(format_e2e_table(report), flush=True)
    write_json(report, os.path.join(bench.out_dir, "e2e.json"))
    plot_e2e(report, os.path.join(bench.out_dir, "e2e.png"))
    print(f"wrote {os.path.join(bench.out_dir, 'e2e.json')}, {os.path.join(bench.out_dir, 'e2e.png')}", flush=True)
    return report


def prepare(settings: ScoreSettings, bench: BenchSettings, build=None) -> E2ERun:
    """The job's own plan over the chosen shards: the same model, preprocessing, outputs and batch size."""
    shards = select_shards(settings.data, bench.e2e.images)
    settings = replace(settings, dist=DistSettings(0, 1), data=replace(settings.data, shards=[s.path for s in shards]))
    p = plan(settings, build=build)
    os.makedirs(settings.output.dir, exist_ok=True)
    settings = replace(p.settings, batch_size=p.batch_size, precision=p.precision)
    return E2ERun(p, settings, shards, sum(s.count for s in shards), bench.e2e.workers)


def select_shards(data: DataSettings, images: int | None) -> list[Shard]:
    """All shards of data.shards, or the leading whole shards holding at least `images` images (whole
    shards, so the job reads exactly the images the other variants read)."""
    shards = [open_shard(p, data.index_cache_dir) for p in expand_shards(data.shards)]
    for s in shards:
        if s.error:
            raise UserError(f"mode=e2e needs readable shards: {s.path}: {s.error}")
    chosen, total = [], 0
    for s in shards:
        if images is not None and total >= images:
            break
        chosen.append(s)
        total += s.count
    return chosen


def decode_only(run: E2ERun, decoder_name: str = "dali", keep: bool = False) -> tuple[dict, list[Batch]]:
    """Iterate the job's decoder with no model; returns (summary, up to KEPT_BATCHES Batches when `keep`)."""
    rules, preprocess = run.plan.rules, run.plan.preprocess
    s = run.settings
    decoder = make_decoder(decoder_name, run.shards, rules, preprocess, run.batch_size, run.device, run.dtype,
                           s.loader, s.oom)
    meter, kept = run.meter(), []
    try:
        for item in decoder:
            if isinstance(item, ShardFailure):
                raise RuntimeError(f"shard {item.shard} failed: {item.reason}")
            meter.batch_done(item.n_valid)
            if keep and len(kept) < KEPT_BATCHES:  # bounded: the device need not hold the whole run
                kept.append(item)
    finally:
        decoder.stop()
        meter.close()
    return meter.summary(), kept


def model_only(run: E2ERun) -> dict:
    """The job's model stage (forward, softmax, top-k, copy to host) on pre-decoded Batches: as many as the
    run has, cycling through the kept ones."""
    s = run.settings
    scorer = Scorer(run.model(run.dtype), run.batch_size, run.device, s.oom)
    outputs = run.plan.outputs
    meter = run.meter()
    total = -(-run.images // run.batch_size)
    for i in range(total):
        batch = run.decoded[i % len(run.decoded)]
        dev.consume(batch.images, batch.ready)
        n_valid = run.images - i * run.batch_size if i == total - 1 else run.batch_size
        with meter.timing("model"):
            output = scorer.forward(batch.images, n_valid)
            dev.HostCopy(compute_all(outputs, output), run.device).wait()
        meter.batch_done(n_valid)
    meter.close()
    return meter.summary()


def score_variant(run: E2ERun, decoder: str) -> dict:
    """The real job in this process, into a fresh output folder that is removed afterwards."""
    out = tempfile.mkdtemp(prefix=f"score_{decoder}-", dir=run.settings.output.dir)
    settings = replace(run.settings, decoder=decoder, output=replace(run.settings.output, dir=out, overwrite=True))
    try:
        code = score(settings, build=run.plan.build)
        if code != EXIT_OK:
            raise RuntimeError(f"jobs.score decoder={decoder} ended with exit code {code} (see its log above)")
        with open(os.path.join(out, "_metrics", "rank-00000.json")) as f:
            metrics = json.load(f)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {k: metrics[k] for k in ("images", "seconds", "images_per_sec", "sustained_images_per_sec",
                                    "time_split_seconds")}


def torchvision_transform(p: Preprocess):
    from torchvision import transforms as T

    modes = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}
    return T.Compose([T.Resize(p.resize_size, interpolation=modes[p.interpolation], antialias=True),
                      T.CenterCrop(p.crop_size), T.ToTensor(), T.Normalize(p.mean, p.std)])


def decode_sample(sample: dict, rules: SampleRules, transform) -> torch.Tensor:
    """A webdataset sample's image, decoded with PIL and transformed."""
    data = next(v for k, v in sample.items() if not k.startswith("__") and rules.is_image(k))
    with Image.open(io.BytesIO(data)) as image:
        return transform(image.convert("RGB"))


def webdataset_images(run: E2ERun):
    import webdataset as wds

    decode = functools.partial(decode_sample, rules=run.plan.rules, transform=torchvision_transform(run.plan.preprocess))
    return wds.WebDataset([s.path for s in run.shards], shardshuffle=False, nodesplitter=None,
                          empty_check=False).map(decode)


def naive(run: E2ERun) -> dict:
    model, k = run.model(torch.float32), run.settings.model.topk
    meter = run.meter(warmup_batches=WARMUP_BATCHES * run.batch_size)  # counted per image here
    with torch.inference_mode():
        for x in webdataset_images(run):
            model(x.to(run.device).unsqueeze(0))["output"].softmax(1).topk(k).indices.cpu()
            meter.batch_done(1)
    meter.close()
    return meter.summary()


def dataloader(run: E2ERun) -> dict:
    from torch.utils.data import DataLoader

    model, k = run.model(torch.float32), run.settings.model.topk
    loader = DataLoader(webdataset_images(run), batch_size=run.batch_size, num_workers=run.workers,
                        prefetch_factor=run.settings.loader.prefetch if run.workers else None)
    meter = run.meter()
    with torch.inference_mode():
        for x in loader:
            model(x.to(run.device))["output"].softmax(1).topk(k).indices.cpu()
            meter.batch_done(x.shape[0])
    meter.close()
    return meter.summary()


VARIANTS = {"naive": naive, "dataloader": dataloader, "score_dali": functools.partial(score_variant, decoder="dali"),
            "score_torch": functools.partial(score_variant, decoder="torch"),
            "decode_only": lambda run: decode_only(run)[0], "model_only": model_only}


def throughput_bound(decode: float, model: float, device: torch.device) -> float:
    """The most a pipeline of the two stages can reach: they share the cores on a CPU, overlap on CUDA."""
    if device.type == "cuda":
        return min(decode, model)
    return 1 / (1 / decode + 1 / model)


def summarise(run: E2ERun, bench: BenchSettings, results: dict[str, list[dict]]) -> dict:
    variants = {}
    for name, rounds in results.items():
        variants[name] = {
            "images_per_sec": round(statistics.median(r["sustained_images_per_sec"] for r in rounds), 2),
            "whole_run_images_per_sec": round(statistics.median(r["images_per_sec"] for r in rounds), 2),
            "images": rounds[0]["images"], "rounds": rounds,
        }
    reference = next((v for v in ("score_dali", "score_torch") if v in variants), None)
    bound = None
    if "decode_only" in variants and "model_only" in variants:
        rate = throughput_bound(variants["decode_only"]["images_per_sec"], variants["model_only"]["images_per_sec"],
                                run.device)
        bound = {"images_per_sec": round(rate, 2),
                 "rule": "min(decode, model)" if run.device.type == "cuda" else "1/(1/decode + 1/model)"}
    if reference:
        ref_rate = variants[reference]["images_per_sec"]
        for v in variants.values():
            v["ratio_to_score"] = round(v["images_per_sec"] / ref_rate, 3)
        if bound:
            bound["ratio_to_score"] = round(bound["images_per_sec"] / ref_rate, 3)
    s = run.settings
    return {
        "mode": "e2e", "model": run.plan.metadata["model"], "image_size": run.plan.preprocess.crop_size,
        "precision": s.precision, "batch_size": s.batch_size, "device": dev.describe(run.device),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "loader": {"threads": s.loader.threads, "prefetch": s.loader.prefetch}, "dataloader_workers": run.workers,
        "images": run.images, "shards": [sh.path for sh in run.shards], "rounds": bench.e2e.rounds,
        "images_per_sec_means": f"images after the first {WARMUP_BATCHES} batches / their seconds, median over rounds",
        "reference": reference, "variants": variants, "bound": bound,
        "score_to_bound": round(variants[reference]["images_per_sec"] / bound["images_per_sec"], 3)
        if reference and bound else None,
    }
