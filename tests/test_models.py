"""Model sources (torchvision, timm, open_clip, a user's module), the preprocessing each model expects,
and the outputs one forward pass feeds. Seeded random weights saved as checkpoints; no network.

Embedding parity: the job's `embedding` against a direct reference that decodes with PIL, applies the
same preprocessing in fp32 (PIL resampling, our resize/crop geometry) and calls the library's own
embedding call. Tolerance, measured on these images and models: the column is float16 (relative
rounding 2^-11), and DALI's and torchvision's antialiased resamplers differ from PIL's by a few uint8
levels at some edge pixels. Together they moved the embeddings by at most 0.36% (DALI) and 0.05%
(torch) of their largest magnitude, mean 0.04% and 0.007%, cosine ≥ 0.99998. The bounds (1% max, 0.2%
mean, cosine ≥ 0.99) leave ~3-5x headroom; a one-pixel crop shift moves them by 2.7-13% max and
0.45-1.5% mean, and breaks them (tested).
"""

from __future__ import annotations

import io
import json
import math
import tarfile
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
from hydra.utils import instantiate
from PIL import Image
from torchvision.transforms import functional as TF

from conftest import TINY, run_cli, run_cli_cases, small_jpegs, tiny_settings
from pipeline.decode import Preprocess
from pipeline.model import load_model
from pipeline.pack import write_shards
from pipeline.runner import score
from pipeline.settings import DataSettings, ModelSettings, OomSettings, OutputSettings, ScoreSettings

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return write_shards(small_jpegs(12, seed=41), str(tmp_path_factory.mktemp("models")), 12, "m")[0]


def run(shard, out, model: ModelSettings, outputs, decoder="dali", **kw) -> list[dict]:
    settings = ScoreSettings(data=DataSettings(shards=shard), output=OutputSettings(dir=str(out), **kw.pop("output", {})),
                             model=model, outputs=outputs, batch_size=kw.pop("batch_size", 4), precision="fp32",
                             decoder=decoder, progress=False, **kw)
    assert score(settings, build=instantiate) == 0
    (path,) = out.glob("*.parquet")
    return pq.read_table(path).to_pylist()


def metadata(out) -> dict:
    (path,) = out.glob("*.parquet")
    return json.loads(pq.read_schema(path).metadata[b"shardscore"])


def reference_inputs(shard, p: Preprocess) -> torch.Tensor:
    modes = {"bilinear": TF.InterpolationMode.BILINEAR, "bicubic": TF.InterpolationMode.BICUBIC}
    images = []
    with tarfile.open(shard) as tar:
        for member in tar:
            if member.name.endswith(".jpg"):
                image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                height, width = p.resized_shape(image.height, image.width)
                image = TF.resize(image, [height, width], interpolation=modes[p.interpolation], antialias=True)
                top, left = p.crop_origin(height, width)
                crop = TF.to_tensor(TF.crop(image, top, left, p.crop_size, p.crop_size))
                images.append(TF.normalize(crop, p.mean, p.std))
    return torch.stack(images)


def assert_embeddings_close(rows: list[dict], reference: torch.Tensor) -> None:
    got = torch.tensor([r["embedding"] for r in rows], dtype=torch.float32)
    ref = reference.float().flatten(1)
    cosine = torch.nn.functional.cosine_similarity(got, ref, dim=1)
    assert cosine.min() >= 0.99, cosine
    scale, diff = ref.abs().max(), (got - ref).abs()
    assert diff.max() <= 0.01 * scale and diff.mean() <= 0.002 * scale, (diff.max() / scale, diff.mean() / scale)


# --- embedding parity, three sources, both decoders ------------------------------------------------

def timm_model(tmp_path):
    torch.manual_seed(11)
    net = timm.create_model("test_vit", pretrained=False).eval()
    torch.save(net.state_dict(), tmp_path / "timm.pt")
    return net, ModelSettings(source="timm", name="test_vit", checkpoint=str(tmp_path / "timm.pt"))


def open_clip_model(tmp_path):
    torch.manual_seed(12)
    net = open_clip.create_model("ViT-S-32").eval()
    torch.save(net.state_dict(), tmp_path / "clip.pt")
    return net, ModelSettings(source="open_clip", name="ViT-S-32", checkpoint=str(tmp_path / "clip.pt"))


def torchvision_model(tmp_path):
    torch.manual_seed(13)
    net = torchvision.models.resnet18(num_classes=1000).eval()
    torch.save(net.state_dict(), tmp_path / "tv.pt")
    return net, ModelSettings(name="resnet18", checkpoint=str(tmp_path / "tv.pt"), resize_size=72, crop_size=64)


EMBED = {  # the library's own call for pooled features
    "timm": (timm_model, lambda net, x: net.forward_head(net.forward_features(x), pre_logits=True)),
    "open_clip": (open_clip_model, lambda net, x: net.encode_image(x)),
    "torchvision": (torchvision_model, lambda net, x: torch.nn.Sequential(*list(net.children())[:-1])(x).flatten(1)),
}


@pytest.mark.parametrize("decoder", ["dali", "torch"])
@pytest.mark.parametrize("source", sorted(EMBED))
def test_embedding_matches_the_libraries_own_call(shard, tmp_path, source, decoder):
    make, embed = EMBED[source]
    net, model = make(tmp_path)
    rows = run(shard, tmp_path / "out", model, ("embedding",), decoder)
    p = Preprocess(**metadata(tmp_path / "out")["preprocess"])
    with torch.inference_mode():
        reference = embed(net, reference_inputs(shard, p))
    assert len(rows[0]["embedding"]) == reference.shape[1]
    assert_embeddings_close(rows, reference)


@pytest.mark.parametrize("source", sorted(EMBED))
def test_the_parity_bound_sees_a_one_pixel_crop_shift(shard, tmp_path, source):
    make, embed = EMBED[source]
    net, model = make(tmp_path)
    rows = run(shard, tmp_path / "out", model, ("embedding",))
    p = Preprocess(**metadata(tmp_path / "out")["preprocess"])
    shifted = Preprocess(p.resize_size, p.crop_size, p.mean, p.std, p.interpolation)
    original = Preprocess.crop_origin
    try:
        Preprocess.crop_origin = lambda self, h, w: tuple(v + 1 for v in original(self, h, w))
        with torch.inference_mode():
            reference = embed(net, reference_inputs(shard, shifted))
    finally:
        Preprocess.crop_origin = original
    with pytest.raises(AssertionError):
        assert_embeddings_close(rows, reference)


def test_normalized_embedding_has_unit_length(shard, tmp_path):
    _, model = timm_model(tmp_path)
    rows = run(shard, tmp_path / "out", model, ("embedding",), output={"normalize_embedding": True})
    norms = np.linalg.norm(np.array([r["embedding"] for r in rows], dtype=np.float32), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)  # float16 storage
    assert metadata(tmp_path / "out")["outputs"] == ["embedding(normalized)"]


def test_one_forward_pass_feeds_embedding_and_topk(shard, tmp_path):
    net, model = timm_model(tmp_path)
    rows = run(shard, tmp_path / "out", model, ("embedding", "topk", "scores"))
    p = Preprocess(**metadata(tmp_path / "out")["preprocess"])
    with torch.inference_mode():
        logits = net(reference_inputs(shard, p))
    assert [r["topk_index"][0] for r in rows] == logits.argmax(1).tolist()
    assert len(rows[0]["scores"]) == logits.shape[1] and len(rows[0]["embedding"]) == net.num_features


def test_halving_gives_identical_rows_for_embedding_and_topk(shard, tmp_path):
    _, model = timm_model(tmp_path)
    clean = run(shard, tmp_path / "clean", model, ("embedding", "topk"), batch_size=8)
    halved = run(shard, tmp_path / "oom", model, ("embedding", "topk"), batch_size=8, oom=OomSettings(inject_above=2))
    assert [r["topk_index"] for r in halved] == [r["topk_index"] for r in clean]
    np.testing.assert_allclose([r["embedding"] for r in halved], [r["embedding"] for r in clean], atol=2e-3)


# --- preprocessing from the model ------------------------------------------------------------------

def test_half_precision_keeps_batch_norm_in_float32():
    """cuDNN's fast batch norm for fp16/bf16 inputs wants float32 weights; the outputs stay close to fp32."""
    settings = ModelSettings(name="resnet18", resize_size=72, crop_size=64)
    full = load_model(settings, torch.device("cpu"), torch.float32, seed=3)
    half = load_model(settings, torch.device("cpu"), torch.bfloat16, seed=3)
    norms = [m for m in half.module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    convs = [m for m in half.module.modules() if isinstance(m, torch.nn.Conv2d)]
    assert norms and all(m.weight.dtype == torch.float32 and m.running_var.dtype == torch.float32 for m in norms)
    assert all(m.weight.dtype == torch.bfloat16 for m in convs)
    x = torch.rand(4, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        a, b = full.module(x)["output"], half.module(x.bfloat16())["output"]
    assert b.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(a, b.float()).min() > 0.99


def test_preprocessing_from_torchvision_weights_and_overrides():
    for name, weights in (("resnet50", "IMAGENET1K_V2"), ("efficientnet_b3", "IMAGENET1K_V1")):
        t = torchvision.models.get_weight(f"{torchvision.models.get_model_weights(name).__name__}.{weights}").transforms()
        own = Preprocess(t.resize_size[0], t.crop_size[0], tuple(t.mean), tuple(t.std), t.interpolation.value)
        # weights=null and a checkpoint both take the architecture's default weights' preprocessing
        assert load_model(ModelSettings(name=name), CPU, torch.float32, 0).preprocess == own
    assert own.resize_size == 320 and own.crop_size == 300 and own.interpolation == "bicubic"  # efficientnet_b3
    resnet50 = load_model(ModelSettings(name="resnet50", resize_size=256), CPU, torch.float32, 0).preprocess
    assert (resnet50.resize_size, resnet50.crop_size, resnet50.interpolation) == (256, 224, "bilinear")  # own: 232


def test_preprocessing_from_timm_data_config_and_overrides():
    cfg = timm.data.resolve_model_data_config(timm.create_model("vit_tiny_patch16_224", pretrained=False))
    own = Preprocess(math.floor(224 / cfg["crop_pct"]), 224, tuple(cfg["mean"]), tuple(cfg["std"]), cfg["interpolation"])
    model = ModelSettings(source="timm", name="vit_tiny_patch16_224")
    assert load_model(model, CPU, torch.float32, 0).preprocess == own
    given = ModelSettings(source="timm", name="vit_tiny_patch16_224", interpolation="bilinear", mean=(0.5, 0.4, 0.3))
    p = load_model(given, CPU, torch.float32, 0).preprocess
    assert (p.interpolation, p.mean, p.resize_size) == ("bilinear", (0.5, 0.4, 0.3), own.resize_size)


def test_preprocessing_is_logged_and_stored(shard, tmp_path, caplog):
    _, model = timm_model(tmp_path)
    with caplog.at_level("INFO"):
        run(shard, tmp_path / "out", model, ("topk",))
    stored = metadata(tmp_path / "out")
    assert stored["preprocess"] == {"resize_size": 168, "crop_size": 160, "mean": [0.5] * 3, "std": [0.5] * 3,
                                    "interpolation": "bicubic"}  # test_vit: 160 px, crop_pct 0.95
    assert stored["source"] == "timm" and "preprocess=Preprocess(resize_size=168" in caplog.text


# --- a user's own module, from a config folder outside the repo -------------------------------------

MYNET = '''
import torch
from torch import nn


class MyNet(nn.Module):
    """One score per image."""

    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3)
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        return self.head(self.conv(x).mean(dim=(2, 3)))
'''


@pytest.fixture(scope="module")
def user_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    (root / "mypkg").mkdir()
    (root / "mypkg" / "__init__.py").write_text(textwrap.dedent(MYNET))
    import sys

    sys.path.insert(0, str(root))
    from mypkg import MyNet

    torch.manual_seed(3)
    torch.save(MyNet(8).state_dict(), root / "mynet.pt")
    (root / "conf" / "model").mkdir(parents=True)
    (root / "conf" / "model" / "mynet.yaml").write_text(textwrap.dedent(f"""\
        source: module
        module:
          _target_: mypkg.MyNet
          width: 8
        checkpoint: {root / 'mynet.pt'}
        resize_size: 40
        crop_size: 32
        mean: [0.5, 0.5, 0.5]
        std: [0.25, 0.25, 0.25]
        interpolation: bilinear
        """))
    return root, MyNet


def test_scores_from_a_module_in_a_config_folder_outside_the_repo(shard, tmp_path, user_config):
    root, MyNet = user_config
    out = tmp_path / "out"
    r = run_cli("jobs.score", "--config-dir", str(root / "conf"), "model=mynet", f"data.shards={shard}",
                f"output.dir={out}", "outputs=[scores]", "output.activation=sigmoid", "precision=fp32",
                "batch_size=4", "progress=false", env={"PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = pq.read_table(out / "m-000000.parquet").to_pylist()
    net = MyNet(8)
    net.load_state_dict(torch.load(root / "mynet.pt", weights_only=True))
    with torch.inference_mode():
        expected = torch.sigmoid(net(reference_inputs(shard, Preprocess(40, 32, (0.5,) * 3, (0.25,) * 3, "bilinear"))))
    got = torch.tensor([row["score"] for row in rows])  # one value per image: a scalar column
    assert torch.allclose(got, expected[:, 0], atol=0.01) and ((got > 0) & (got < 1)).all()
    assert "scores" not in rows[0] and metadata(out)["source"] == "module" and metadata(out)["model"] == "mypkg.MyNet"


def test_a_module_without_preprocessing_is_a_user_error(shard, tmp_path, user_config):
    root, _ = user_config
    config = root / "conf" / "model" / "bare.yaml"
    config.write_text("source: module\nmodule: {_target_: mypkg.MyNet, width: 4}\nresize_size: 40\n")
    r = run_cli("jobs.score", "--config-dir", str(root / "conf"), "model=bare", f"data.shards={shard}",
                f"output.dir={tmp_path}", "outputs=[scores]", env={"PYTHONPATH": str(root)})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "give model.crop_size=… model.mean=… model.std=… model.interpolation=…" in r.stderr


# --- errors a user can cause -----------------------------------------------------------------------

OFFLINE = {"HF_HUB_OFFLINE": "1"}


PRETRAINED = [("timm", "resnet18", "a1_in1k"), ("open_clip", "ViT-B-32", "laion2b_s34b_b79k")]


@pytest.fixture(scope="module")
def pretrained_runs(shard, tmp_path_factory):
    """Each case of PRETRAINED through `python -m jobs.score`, both in one process, offline."""
    root = tmp_path_factory.mktemp("pretrained")
    args = [[*TINY, f"model.source={source}", f"model.name={name}", f"model.weights={weights}", f"data.shards={shard}",
             f"output.dir={root / source}", "outputs=[embedding]"] for source, name, weights in PRETRAINED]
    results = run_cli_cases("jobs.score", args, env={**OFFLINE, "HF_HOME": str(root / "hf")})
    return {source: (r["code"], r["stderr"], root / source) for (source, _, _), r in zip(PRETRAINED, results)}


@pytest.mark.parametrize("source, name, weights", PRETRAINED)
def test_missing_pretrained_weights_say_what_to_do(pretrained_runs, source, name, weights):
    code, stderr, out = pretrained_runs[source]
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert "pre-download" in lines[0] and "model.checkpoint" in lines[0]
    assert not out.exists() or not list(out.glob("*.parquet"))


def test_topk_of_an_embedding_model_is_a_user_error(shard, tmp_path):
    from pipeline.errors import UserError

    settings = tiny_settings(shard, tmp_path, source="open_clip", name="ViT-S-32", resize_size=224, crop_size=224,
                             outputs=("topk",))
    with pytest.raises(UserError, match=r"outputs=\[topk\] needs a classifier"):
        score(settings)
