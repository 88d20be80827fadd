"""Several models from one decode: each writes what it writes alone, a model added later runs alone and
keeps the others' columns, one model's OOM costs no other model a row, and the config's rules."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hydra.utils import instantiate

from conftest import run_cli, small_jpegs, tiny_settings, verify_output
from pipeline.errors import UserError
from pipeline.pack import write_shards
from pipeline.runner import score
from pipeline.settings import ModelSettings, OomSettings, ScoreSettings, from_mapping
from pipeline.sources.head import mlp

# Two backbones on different preprocessings (size, interpolation) and a head on the first one's embedding.
A = ModelSettings(name="resnet18", resize_size=40, crop_size=32, outputs=("topk", "embedding"))
B = ModelSettings(name="mobilenet_v3_small", resize_size=72, crop_size=64, interpolation="bicubic",
                  outputs=("scores",), activation="softmax")

COUNTED = """
import torch
from torch import nn

calls = {}


class Counted(nn.Module):
    '''A tiny backbone that records the size of each input it is called on, by its tag.'''

    def __init__(self, tag, classes=10):
        super().__init__()
        self.tag = tag
        self.fc = nn.Linear(3, classes)

    def forward(self, x):
        calls.setdefault(self.tag, []).append(x.shape[0])
        return self.fc(x.float().mean((2, 3))).to(x.dtype)
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two shards (12 and 7 samples), one sample's JPEG cut short: it is a row with an error status."""
    samples = list(small_jpegs(19, seed=4))
    samples[5][1]["jpg"] = samples[5][1]["jpg"][:200]
    return write_shards(iter(samples), str(tmp_path_factory.mktemp("several")), shard_size=12, prefix="part")


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> ModelSettings:
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("head") / "head.pt"
    torch.save(mlp(512, (16, 1), "relu").state_dict(), path)
    return ModelSettings(source="head", input="a.embedding", normalize_input=True, layers=(16, 1),
                         checkpoint=str(path))


def settings_for(data, out, decoder, models=None, model=None, **kw) -> ScoreSettings:
    s = tiny_settings(data, out, decoder=decoder, batch_size=8, models=models or {}, **kw)
    return replace(s, model=model) if model else s


def table(out) -> dict[str, list]:
    return pq.read_table(str(out)).sort_by([("shard", "ascending"), ("key", "ascending")]).to_pydict()


@pytest.mark.parametrize("decoder", ["dali", "torch"])
def test_three_models_write_what_each_writes_alone(data, head, tmp_path, decoder):
    """Two backbones with their own preprocessing and a head, in one pass: each model's columns equal its
    own run's (a and b alone, unprefixed; the head with only its input model); the error row is null in all."""
    assert score(settings_for(data, tmp_path / "three", decoder, {"a": A, "b": B, "h": head})) == 0
    assert score(settings_for(data, tmp_path / "a", decoder, model=A)) == 0  # the one-model form: `model`
    assert score(settings_for(data, tmp_path / "b", decoder, model=B)) == 0
    assert score(settings_for(data, tmp_path / "ah", decoder, {"a": A, "h": head})) == 0
    three, a, b, ah = (table(tmp_path / n) for n in ("three", "a", "b", "ah"))
    assert list(three) == ["key", "shard", "label", "status", "error", "a_topk_index", "a_topk_prob", "a_embedding",
                           "b_scores", "h_score"]
    assert three["key"] == a["key"] == b["key"] and len(three["key"]) == 19 and len(set(three["key"])) == 19
    assert three["status"] == a["status"] and three["status"].count("ok") == 18
    assert three["a_topk_index"] == a["topk_index"]  # top-k identical
    np.testing.assert_allclose(np.array(three["a_topk_prob"][:5]), np.array(a["topk_prob"][:5]), rtol=1e-6)
    ok = [i for i, s in enumerate(three["status"]) if s == "ok"]
    bad = three["status"].index("decode_error")
    for mine, alone in (("a_embedding", a["embedding"]), ("b_scores", b["scores"])):
        np.testing.assert_allclose(np.array([three[mine][i] for i in ok]), np.array([alone[i] for i in ok]),
                                   rtol=1e-3, atol=1e-3)
        assert three[mine][bad] is None and alone[bad] is None
    np.testing.assert_allclose([three["h_score"][i] for i in ok], [ah["h_score"][i] for i in ok], rtol=1e-5)
    assert three["h_score"][bad] is None and three["a_topk_index"][bad] is None
    meta = json.loads(pq.read_schema(str(tmp_path / "three" / "part-000000.parquet")).metadata[b"shardscore"])
    assert meta["model"] is None and sorted(meta["models"]) == ["a", "b", "h"]
    assert meta["models"]["b"]["preprocess"]["interpolation"] == "bicubic"
    assert meta["models"]["h"]["preprocess"]["of"] == meta["models"]["a"]  # the head's input is part of its identity
    metrics = json.loads((tmp_path / "three" / "_metrics" / "rank-00000.json").read_text())
    assert sorted(metrics["models"]) == ["a", "b", "h"] and metrics["decoder"] == decoder


def test_a_model_added_later_runs_alone_and_keeps_the_others(data, tmp_path, monkeypatch):
    """A completed three-model output, scored again with a fourth model: only the fourth runs (the others'
    forward passes are never called), the others' columns are kept byte for byte, one row per key."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "counted.py").write_text(textwrap.dedent(COUNTED))
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    import counted

    def backbone(tag, classes=10, **kw):
        return ModelSettings(source="module", module={"_target_": "counted.Counted", "tag": tag, "classes": classes},
                             resize_size=kw.pop("resize", 36), crop_size=32, mean=(0.5,) * 3, std=(0.5,) * 3,
                             interpolation="bilinear", outputs=("scores",), **kw)

    three = {"a": backbone("a"), "b": backbone("b", resize=48),
             "h": ModelSettings(source="head", input="a.scores", layers=(4, 1))}
    out = tmp_path / "out"
    assert score(settings_for(data, out, "dali", three), build=instantiate) == 0
    assert counted.calls["a"] == counted.calls["b"] == [1, 8, 8, 8]  # the probe that sizes the columns, then 3 batches
    before = table(out)
    counted.calls.clear()
    four = {**three, "d": backbone("d", classes=3, resize=40)}
    assert score(settings_for(data, out, "dali", four), build=instantiate) == 0
    # No batch reaches a or b (each sees only the one blank image that sizes its columns), nor the head.
    assert counted.calls == {"a": [1], "b": [1], "d": [1, 8, 8, 8]}
    after = table(out)
    assert list(after) == [*list(before)[:-1], "d_scores", "h_score"]  # columns as models run: backbones, then heads
    assert {k: v for k, v in after.items() if k != "d_scores"} == before
    ok = [i for i, s in enumerate(after["status"]) if s == "ok"]
    assert all(len(after["d_scores"][i]) == 3 for i in ok) and after["d_scores"][after["status"].index("decode_error")] is None
    import duckdb
    import pandas as pd
    import polars as pl

    assert duckdb.sql(f"SELECT count(*), count(DISTINCT key), count(d_scores), count(h_score) FROM "
                      f"'{out}/*.parquet'").fetchall() == [(19, 19, 18, 18)]
    assert pd.read_parquet(out)["d_scores"].notna().sum() == 18
    assert pl.scan_parquet(f"{out}/*.parquet").select(pl.col("h_score").count()).collect().item() == 18
    assert (out / "_SUCCESS").exists() and verify_output(data, out)[0]  # one run identity, every key once
    # A model the files hold and the run does not: a user error before any image is read, unless overwrite.
    counted.calls.clear()
    with pytest.raises(UserError, match="holds model\\(s\\) d that this run does not have"):
        score(settings_for(data, out, "dali", three), build=instantiate)
    assert counted.calls == {"a": [1], "b": [1]}
    assert score(settings_for(data, out, "dali", three, overwrite=True), build=instantiate) == 0
    assert "d_scores" not in table(out)
    # The one-model form over it drops every model: the same rule.
    with pytest.raises(UserError, match="holds model\\(s\\) a, b, h that this run does not have"):
        score(settings_for(data, out, "dali", model=backbone("a")), build=instantiate)


def test_an_oom_in_one_model_costs_no_row_of_any_model(data, head, tmp_path):
    """A real OutOfMemoryError in b above 3 rows: b halves to 2 and retries; every row of every model is
    written once, with the values of a run without the OOM, and a's micro-batch is untouched."""
    models = {"a": A, "b": B, "h": head}
    assert score(settings_for(data, tmp_path / "clean", "torch", models)) == 0
    oom = OomSettings(inject_above=3, inject_model="b")
    assert score(settings_for(data, tmp_path / "oom", "torch", models, oom=oom)) == 0
    clean, hit = table(tmp_path / "clean"), table(tmp_path / "oom")
    assert hit["key"] == clean["key"] and len(hit["key"]) == 19
    assert hit["a_topk_index"] == clean["a_topk_index"] and hit["h_score"] == clean["h_score"]
    np.testing.assert_allclose(np.array([v for v in hit["b_scores"] if v]), np.array([v for v in clean["b_scores"] if v]),
                               rtol=1e-4, atol=1e-5)
    metrics = json.loads((tmp_path / "oom" / "_metrics" / "rank-00000.json").read_text())["models"]
    assert metrics["b"]["oom_events"] >= 2 and metrics["b"]["min_micro_batch"] == 2
    assert metrics["a"]["oom_events"] == 0 and metrics["a"]["min_micro_batch"] == 8


def test_the_config_of_several_models_is_checked_before_any_work():
    base = {"data": {"shards": "x.tar"}, "output": {"dir": "o"}}
    bad = {
        "there is no model 'clip'": {"h": {"source": "head", "input": "clip.embedding", "layers": [1]}},
        "read each other in a loop": {"g": {"source": "head", "input": "h.scores", "layers": [1]},
                                      "h": {"source": "head", "input": "g.scores", "layers": [1]}},
        "a head needs input": {"h": {"source": "head", "layers": [1]}},
        "exactly one of layers": {"a": {"source": "timm", "name": "resnet18"}, "h": {"source": "head",
                                                                                   "input": "a.embedding"}},
        "prefixes its columns": {"Clip-1": {"source": "timm", "name": "resnet18"}},
        "a head's module needs a _target_": {"a": {"source": "timm", "name": "resnet18"},
                                             "h": {"source": "head", "input": "a.embedding", "module": {"width": 3}}},
        "models.a.crop_size must be > 0": {"a": {"source": "timm", "name": "resnet18", "crop_size": 0}},
        "unknown config key 'models.a.nme'": {"a": {"source": "timm", "nme": "resnet18"}},
    }
    for message, models in bad.items():
        with pytest.raises(UserError, match=message.replace("(", "\\(")):
            from_mapping(ScoreSettings, {**base, "models": models})
    with pytest.raises(UserError, match="model.source=head runs on another model's output"):
        from_mapping(ScoreSettings, {**base, "model": {"source": "head", "input": "a.embedding", "layers": [1]}})
    ok = from_mapping(ScoreSettings, {**base, "models": {"h": {"source": "head", "input": "a.embedding", "layers": [1]},
                                                         "a": {"source": "timm", "name": "resnet18"}}})
    assert [name for name, _ in ok.named_models] == ["a", "h"]  # a head runs after what it reads


def test_the_cli_composes_models_from_the_group_and_refuses_model_keys_beside_them(data, tmp_path):
    """`+models=[…]` from conf/models, a model's key overridden by its path; model.* with models: is one line, exit 2."""
    ckpt = tmp_path / "wm.pt"
    import timm

    torch.save(timm.create_model("efficientnet_b3", num_classes=2).state_dict(), ckpt)
    out = tmp_path / "out"
    r = run_cli("jobs.score", f"data.shards=[{data[1]}]", f"output.dir={out}", "+models=[watermark]",
                f"models.watermark.checkpoint={ckpt}", "models.watermark.resize_size=40", "models.watermark.crop_size=32",
                "batch_size=8", "precision=fp32", "progress=false")
    assert r.returncode == 0, r.stderr[-2000:]
    t = pq.read_table(str(out))
    assert t.column_names[-1] == "watermark_scores" and t.num_rows == 7
    assert np.allclose([sum(v) for v in t.column("watermark_scores").to_pylist() if v], 1, atol=1e-5)  # softmax
    r = run_cli("jobs.score", f"data.shards=[{data[1]}]", f"output.dir={tmp_path / 'x'}", "+models=[watermark]",
                f"models.watermark.checkpoint={ckpt}", "model.name=resnet50")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: model.name=resnet50: with models:")
    assert "Traceback" not in r.stderr and not list((tmp_path / "x").glob("*.parquet"))


def test_the_documented_conversion_of_laions_aesthetic_predictor_loads_as_a_head(data, tmp_path):
    """docs/MODELS.md's snippet, run on a state_dict of the published layout (Linear/Dropout in `layers`):
    the head it makes scores each row as that MLP scores the row's normalised embedding."""
    from torch import nn

    class Laion(nn.Module):  # the published predictor's module, at the width of resnet18's embedding
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(nn.Linear(512, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

        def forward(self, x):
            return self.layers(x)

    torch.manual_seed(5)
    laion = Laion().eval()
    source, target = str(tmp_path / "published.pth"), str(tmp_path / "aesthetic.pt")
    torch.save(laion.state_dict(), source)
    doc = (Path(__file__).parents[1] / "docs" / "MODELS.md").read_text()
    snippet = doc.split("```python\n", 1)[1].split("```", 1)[0]
    exec(snippet, {"source": source, "target": target})
    aesthetic = ModelSettings(source="head", input="a.embedding", normalize_input=True, layers=(1024, 128, 64, 16, 1),
                              hidden_activation="none", checkpoint=target)
    assert score(settings_for(data, tmp_path / "out", "torch", {"a": A, "aesthetic": aesthetic})) == 0
    t = table(tmp_path / "out")
    ok = [i for i, s in enumerate(t["status"]) if s == "ok"]
    embedding = torch.nn.functional.normalize(torch.tensor([t["a_embedding"][i] for i in ok]), dim=1)
    with torch.no_grad():
        expected = laion(embedding)[:, 0].numpy()
    np.testing.assert_allclose([t["aesthetic_score"][i] for i in ok], expected, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("same_size", [False, True])
def test_dalis_branches_resized_by_dali_and_by_torch_agree(same_size):
    """One decode, two branches, as the GPU's graph resizes them (DALI's resize, here on the CPU) and as the
    CPU path does (torch's resize of DALI's decoded images: one call per batch when all are one size):
    the same crops to within interpolation rounding, and the CPU path's crop is exactly resize_and_crop
    (the torch decoder's resize) of DALI's decoded image."""
    from PIL import Image

    from pipeline.decode.assemble import Preprocess
    from pipeline.decode.dali_decode import DecodePipeline
    from pipeline.decode.assemble import resize_and_crop
    from pipeline.pack import encode_jpeg, synthetic_image
    from pipeline.settings import DaliSettings, LoaderSettings

    rng = np.random.default_rng(2)
    sizes = [(120, 90)] * 6 if same_size else [(int(w), int(h)) for w, h in rng.integers(60, 200, size=(6, 2))]
    images = [np.asarray(synthetic_image(rng, 10, 10).resize(size)) for size in sizes]
    encoded = [np.frombuffer(encode_jpeg(Image.fromarray(a), quality=95), np.uint8) for a in images]
    branches = [Preprocess(40, 32, (0.5,) * 3, (0.5,) * 3, "bilinear"), Preprocess(72, 64, (0.5,) * 3, (0.5,) * 3, "bicubic")]
    views = {}
    for where in ("dali", "torch"):
        pipe = DecodePipeline(branches, 6, torch.device("cpu"), torch.uint8,
                              LoaderSettings(threads=2, dali=DaliSettings(resize=where)))
        assert pipe.torch_resize == (where == "torch")
        pipe.feed(encoded)
        views[where] = [v.clone() for v in pipe.output()]
        pipe.close()
    for b, p in enumerate(branches):
        by_dali, by_torch = views["dali"][b].float(), views["torch"][b].float()
        assert by_dali.shape == by_torch.shape == (6, p.crop_size, p.crop_size, 3)
        assert (by_dali - by_torch).abs().mean() < 1.5  # grey levels: two resamplers, one geometry
    pipe = DecodePipeline([branches[1]], 1, torch.device("cpu"), torch.uint8, LoaderSettings(threads=2))
    pipe.feed(encoded[:1])
    (decoded,) = pipe._pipe.outputs()  # DALI's decoded image: torch's crop of it is the CPU path's view
    own = resize_and_crop(torch.from_numpy(np.asarray(decoded[0])).permute(2, 0, 1).contiguous(), branches[1])
    assert torch.equal(views["torch"][1][0], own.permute(1, 2, 0))
    pipe.close()


def test_the_report_draws_each_models_charts(data, head, tmp_path, capsys):
    """jobs.report on a three-model output: per model its own charts (a's classes, top-1 probability and
    embedding norms, b's none of those, the head's scores), the models' table, and a summary naming each."""
    from pipeline.report import ReportSettings, write_report

    out = tmp_path / "out"
    assert score(settings_for(data, out, "torch", {"a": A, "b": B, "h": head}, oom=OomSettings(inject_above=4,
                                                                                               inject_model="b"))) == 0
    capsys.readouterr()
    result = write_report(ReportSettings(output_dir=str(out)))
    printed = capsys.readouterr().out
    by_name = {m["name"]: m for m in result["models"]}
    assert list(by_name) == ["a", "b", "h"]
    assert by_name["a"]["class_column"] == "a_topk_index" and by_name["a"]["top1_prob"]["values"] == 18
    assert by_name["a"]["embedding_norm"]["values"] == 18 and by_name["a"]["score"] is None
    assert by_name["b"]["top1_prob"] is None and by_name["b"]["embedding_norm"] is None  # b writes a scores list
    assert by_name["h"]["score"]["values"] == 18 and not by_name["h"]["top_classes"]
    stats = {s["model"]: s for s in result["model_stats"]}
    assert stats["b"]["oom_events"] >= 1 and stats["b"]["min_micro_batch"] == 4 and stats["a"]["oom_events"] == 0
    page = (out / "_report" / "index.html").read_text()
    for title in ("a: Top predicted classes", "a: Top-1 probability", "a: Embedding L2 norm", "h: Score", "Models"):
        assert f"<h2>{title}</h2>" in page, title
    assert "<h2>b: " not in page
    assert "models   a (resnet18, topk(5)+embedding), b (mobilenet_v3_small, scores(softmax)), h (head(16x1), " \
           "scores(none)); fp32, batch 8" in printed


def test_batch_size_auto_picks_the_decode_batch_every_model_fits(data, tmp_path, capsys):
    """batch_size=auto with several models: a sweep per backbone without its own batch_size, the smallest
    choice. b runs out of memory above 16 rows (injected into b alone), so the decode batch is at most 16;
    a, whose own batch_size caps its chunks at 4, is not swept and runs at 4."""
    from pipeline.settings import AutoBatchSettings

    models = {"a": replace(A, batch_size=4), "b": B, "c": replace(A, resize_size=36)}  # c: swept, no OOM
    settings = settings_for(data, tmp_path, "torch", models, auto=AutoBatchSettings(max_batch_size=64, repeats=1),
                            oom=OomSettings(inject_above=16, inject_model="b"))
    assert score(replace(settings, batch_size="auto")) == 0
    printed = capsys.readouterr().out
    assert printed.count("batch_size=auto on cpu") == 2  # b's and c's: a fits by its own chunks
    metrics = json.loads((tmp_path / "_metrics" / "rank-00000.json").read_text())
    assert re.search(r"^\s*32 \|\s+OOM", printed, re.MULTILINE) and metrics["batch_size"] <= 16  # b's sweep
    # (the choice is the smallest within 3 % of the best rate: on a busy machine it can be below 4)
    assert metrics["models"]["a"]["micro_batch"] == min(4, metrics["batch_size"]) and metrics["models"]["a"]["oom_events"] == 0
    assert len(table(tmp_path)["key"]) == 19


def test_a_head_reads_the_embedding_of_a_backbone_that_writes_only_its_classes(data, head, tmp_path):
    """The head makes its input model give its embedding, though that model writes top-k only."""
    assert score(settings_for(data, tmp_path, "torch", {"a": replace(A, outputs=("topk",)), "h": head})) == 0
    t = table(tmp_path)
    assert "a_embedding" not in t and sum(v is not None for v in t["h_score"]) == 18


def test_the_cpu_paths_crops_without_a_resize_stay_valid_while_held():
    """Same-size images needing no resize come back as views of DALI's memory (no copy): held outputs
    must not change when DALI runs again."""
    from PIL import Image

    from pipeline.decode.assemble import Preprocess
    from pipeline.decode.dali_decode import DecodePipeline
    from pipeline.pack import encode_jpeg, synthetic_image
    from pipeline.settings import LoaderSettings

    rng = np.random.default_rng(3)
    pipe = DecodePipeline([Preprocess(32, 32, (0.5,) * 3, (0.5,) * 3, "bilinear")], 8, torch.device("cpu"),
                          torch.uint8, LoaderSettings(threads=2))
    held = []
    for _ in range(4):
        batch = [np.frombuffer(encode_jpeg(Image.fromarray(np.asarray(synthetic_image(rng, 32, 32)))), np.uint8)
                 for _ in range(8)]
        pipe.feed(batch)
        (view,) = pipe.output()
        held.append((view, view.clone()))
    assert all(torch.equal(view, copy) for view, copy in held)
    assert not torch.equal(held[0][1], held[1][1])
    pipe.close()
