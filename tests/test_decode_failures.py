"""DALI decode failures, on real DALI pipelines: a bad image costs only itself and never a pipeline rebuild
(it is judged on a CPU decode pipeline built once and kept), and an allocation failure in the decoder, in
the words DALI, CUDA and nvImageCodec really use (pipeline.device.OUT_OF_MEMORY_TEXTS), is retried on the
same images with memory released, never written as a bad image. Errors are injected where DALI raises
them (the pipeline's output), carrying those texts; one test runs out of host memory for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import ROOT, small_jpegs
from corrupt import write_corrupt_shard
from pipeline import device as dev
from pipeline.decode.assemble import Preprocess
from pipeline.decode.dali_decode import DecodeStage
from pipeline.errors import OutOfMemoryAtOneRow
from pipeline.pack import damage_scan, encode_jpeg, synthetic_image, write_shards
from pipeline.runner import score
from pipeline.settings import (DataSettings, LoaderSettings, ModelSettings, OomSettings, OutputSettings,
                               ScoreSettings)

pytestmark = pytest.mark.dali

MAX_PIXELS = 300 * 300
PRE = Preprocess(40, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear")
# What DALI's Python API raises for a failed run: RuntimeError, the operator's error inside its frame.
DALI_FRAME = ("Critical error in pipeline:\nError in CPU operator `nvidia.dali.fn.decoders.image`,\nwhich was used "
              "in the pipeline definition with the following traceback:\n\n  File \"x.py\", line 1\n\nencountered:"
              "\n\n{}\nCurrent pipeline object is no longer valid.")


def run(shard, out, batch_size=8, inject=None, decoder="dali"):
    settings = ScoreSettings(
        data=DataSettings(shards=shard, max_pixels=MAX_PIXELS), output=OutputSettings(dir=str(out)), outputs=("topk", "scores"),
        model=ModelSettings(name="resnet18", weights=None, resize_size=40, crop_size=32),
        batch_size=batch_size, precision="fp32", decoder=decoder, progress=False,
        oom=OomSettings(inject_decode_above=inject))
    code = score(settings)
    rows = [r for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    return code, rows, json.loads((out / "_metrics" / "rank-00000.json").read_text())


def jpegs(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.frombuffer(encode_jpeg(synthetic_image(rng, 50, 90)), dtype=np.uint8) for _ in range(count)]


def stage(batch_size=8, regrow_after=50) -> DecodeStage:
    return DecodeStage([PRE], batch_size, torch.device("cpu"), torch.float32, LoaderSettings(threads=2),
                       OomSettings(regrow_after=regrow_after))


def decode(s: DecodeStage, batches):
    """Every batch through the stage with two in flight, as the decoder drives it."""
    results, tokens = [], []
    for i, batch in enumerate(batches):
        tokens.append(s.start(batch))
        if i:
            (images,), failed = s.finish(tokens[i - 1], batches[i - 1])
            results.append((images.clone(), failed))
    (images,), failed = s.finish(tokens[-1], batches[-1])
    return results + [(images.clone(), failed)]


def fail_once(s: DecodeStage, text: str, when=lambda n: n > 1, error=RuntimeError, times=1):
    """The next `times` outputs of the main pipeline whose batch size passes `when` (not the one-image
    check run after a failure) raise `error(text)`,
    after DALI produced them (as a real failed run is taken out of DALI)."""
    real, left = s._pipe.output, [times]

    def output():
        images = real()
        if left[0] and when(images[0].shape[0]):
            left[0] -= 1
            raise error(text)
        return images

    s._pipe.output = output


@pytest.fixture(scope="module")
def good_shard(tmp_path_factory):
    return write_shards(small_jpegs(20, seed=9), str(tmp_path_factory.mktemp("good")), 20, "good")[0]


# --- out of memory -------------------------------------------------------------------------------

@pytest.mark.parametrize("text", dev.OUT_OF_MEMORY_TEXTS)
def test_every_allocation_failure_text_is_retried_smaller_with_memory_released(text, monkeypatch):
    batches = [jpegs(8, 1), jpegs(8, 2)]
    clean = decode(stage(), batches)
    released = []
    monkeypatch.setattr(dev, "release_memory", lambda device: released.append(device))
    s = stage()
    fail_once(s, DALI_FRAME.format(f"... {text} ..."), when=lambda n: n > 4)
    got = decode(s, batches)
    assert [f for _, f in got] == [[], []]  # no image written as a bad one
    for (a, _), (b, _) in zip(got, clean):
        torch.testing.assert_close(a, b)
    assert s.oom_events == 1 and s.fallbacks == 0 and released and s.policy.size == 4


def test_bad_alloc_as_memory_error_and_the_real_texts_in_full():
    """pybind11 turns std::bad_alloc into MemoryError; DALI's CUDABadAlloc and CUDAError texts in full."""
    for error in (MemoryError("std::bad_alloc"), RuntimeError(DALI_FRAME.format("Can't allocate 52428800 bytes on device 0.")),
                  RuntimeError(DALI_FRAME.format("Can't allocate 1048576 bytes on host.")),
                  RuntimeError("CUDA runtime API error cudaErrorMemoryAllocation (2):\nout of memory"),
                  RuntimeError("CUDA driver API error CUDA_ERROR_OUT_OF_MEMORY (2):\nout of memory"),
                  torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")):
        assert dev.is_out_of_memory(error), error
    for error in (RuntimeError(DALI_FRAME.format("Failed to decode sample #3 : ")),
                  RuntimeError(DALI_FRAME.format("nvImageCodec failure: '#3'")),
                  RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x10)"), ValueError("out of memory")):
        assert not dev.is_out_of_memory(error), error


def test_oom_at_one_image_gives_up():
    s = stage(batch_size=2)
    fail_once(s, "std::bad_alloc", when=lambda n: True, times=10)
    with pytest.raises(OutOfMemoryAtOneRow, match="decoding a single image"):
        decode(s, [jpegs(2, 1)])


def test_decoder_out_of_memory_in_a_whole_run_retries_the_same_images(good_shard, tmp_path):
    code, clean, _ = run(good_shard, tmp_path / "clean")
    assert code == 0
    code, rows, metrics = run(good_shard, tmp_path / "oom", inject=3)  # batches of 8 → 4 → 2 fit
    assert code == 0 and metrics["decode_oom_events"] >= 2
    assert [r["status"] for r in rows] == ["ok"] * 20  # no good image written as decode_error
    np.testing.assert_allclose([r["scores"] for r in rows], [r["scores"] for r in clean], atol=1e-2)


def test_out_of_memory_with_a_bad_image_in_the_batch(tmp_path):
    expected = write_corrupt_shard(str(tmp_path / "bad.tar"))
    _, clean, _ = run(str(tmp_path / "bad.tar"), tmp_path / "clean")
    code, rows, metrics = run(str(tmp_path / "bad.tar"), tmp_path / "oom", inject=2)
    assert code == 0 and metrics["decode_oom_events"] >= 1
    assert [(r["key"], r["status"]) for r in rows] == expected == [(r["key"], r["status"]) for r in clean]


REAL_OOM = textwrap.dedent("""
    import io, re, resource, sys
    import numpy as np, torch
    from PIL import Image
    from pipeline.decode.assemble import Preprocess
    from pipeline.decode.dali_decode import DecodeStage
    from pipeline.settings import LoaderSettings, OomSettings
    a = np.zeros((6000, 6000, 3), np.uint8); a[::7] = 200
    b = io.BytesIO(); Image.fromarray(a).save(b, format="JPEG", quality=50)
    big = np.frombuffer(b.getvalue(), np.uint8)
    s = DecodeStage([Preprocess(64, 64, (0.5,) * 3, (0.5,) * 3, "bilinear")], 4, torch.device("cpu"), torch.float32,
                    LoaderSettings(threads=1), OomSettings())
    s.finish(s.start([big]), [big])  # one image fits
    vm = int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
    limit = vm + int(sys.argv[1]) * 2**20  # room for one 108 MB image, not for four
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    (images,), failed = s.finish(s.start([big] * 4), [big] * 4)
    print(images.shape[0], failed, s.oom_events)
""")


def test_a_real_host_out_of_memory_in_dali_is_retried_not_written_as_bad():
    """DALI's CPU decoder really runs out of memory (an address-space limit). DALI then says either
    std::bad_alloc or only "Failed to decode sample #0" (the allocation failure goes to its log); either way
    the images are retried in smaller decode batches or, at one image, the run stops (exit 1): a good image
    is never written as bad. Several limits, because how much of the room the decoder gets varies."""
    outcomes = []
    for room in (300, 250, 350, 400):
        r = subprocess.run([sys.executable, "-c", REAL_OOM, str(room)], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "MALLOC_ARENA_MAX": "1"}, timeout=300)
        if r.returncode:
            assert "OutOfMemoryAtOneRow: out of memory decoding a single image" in r.stderr, r.stderr[-2000:]
            outcomes.append("gave up at one image")
            continue
        decoded, failed, oom_events = r.stdout.split()
        assert failed == "[]" and decoded == "4", r.stdout  # never a good image as failed
        outcomes.append(int(oom_events))
        if int(oom_events) >= 1:
            break  # four at once did not fit; smaller decode batches did
    assert any(isinstance(o, int) and o >= 1 for o in outcomes), outcomes


# --- bad images ----------------------------------------------------------------------------------

def test_a_damaged_image_is_judged_on_the_cpu_reference_without_a_rebuild():
    batches = [jpegs(8, 1), jpegs(8, 2), jpegs(8, 3)]
    batches[0][5] = np.frombuffer(damage_scan(batches[0][5].tobytes()), dtype=np.uint8)
    batches[1][0] = np.frombuffer(damage_scan(batches[1][0].tobytes()), dtype=np.uint8)
    batches[1][7] = np.frombuffer(damage_scan(batches[1][7].tobytes()), dtype=np.uint8)
    s = stage()
    main = s._pipe._pipe
    got = decode(s, batches)
    assert [f for _, f in got] == [[5], [0, 7], []]
    assert [images.shape[0] for images, _ in got] == [7, 6, 8]
    assert s._pipe._pipe is main  # the main pipeline was never rebuilt …
    reference = s._reference
    assert reference is not None and s.fallbacks == 2 and s.oom_events == 0
    clean = decode(stage(), [jpegs(8, 3)])
    torch.testing.assert_close(got[2][0], clean[0][0])  # … and decodes the batch after them as before
    assert s._reference is reference  # one reference pipeline, kept


def test_a_failure_the_reference_does_not_reproduce_uses_its_decode():
    """DALI names an image the CPU reference decodes (on a GPU: nvJPEG out of its own memory, say): the
    reference's image is used; two such images in one batch count as out of memory."""
    batches = [jpegs(8, 1)]
    clean = decode(stage(), batches)
    s = stage()
    fail_once(s, DALI_FRAME.format("Failed to decode sample #3 : "))
    got = decode(s, batches)
    assert got[0][1] == [] and s.reference_decodes == 1 and s.oom_events == 0
    torch.testing.assert_close(got[0][0], clean[0][0])
    s = stage()
    fail_once(s, DALI_FRAME.format("Failed to decode sample #2 : "), times=2)
    got = decode(s, batches)
    assert got[0][1] == [] and s.oom_events == 1 and s.policy.size == 4
    torch.testing.assert_close(got[0][0], clean[0][0])


def test_an_error_that_names_no_image_is_searched_on_the_reference():
    batches = [jpegs(9, 4)]
    batches[0][6] = np.frombuffer(damage_scan(batches[0][6].tobytes()), dtype=np.uint8)
    s = stage(batch_size=9)
    fail_once(s, DALI_FRAME.format("nvImageCodec failure: '#3'"), times=100)  # every main run fails, unnamed
    got = decode(s, batches)
    assert got[0][1] == [6] and got[0][0].shape[0] == 8 and s.oom_events == 0


def test_truncated_jpegs_are_decided_before_any_decoder(tmp_path):
    """A JPEG cut short (no end-of-image marker after its scan) is decode_error from its bytes, in both
    back-ends, without a failed DALI batch; data after the marker (a motion photo's video) is fine."""
    rng = np.random.default_rng(3)
    samples = [(f"{i:03d}", {"jpg": encode_jpeg(synthetic_image(rng, 50, 90))}) for i in range(16)]
    data = samples[11][1]["jpg"]
    samples[11] = ("011", {"jpg": data[: len(data) * 2 // 3]})  # the header is intact; the scan is cut
    samples[4] = ("004", {"jpg": samples[4][1]["jpg"] + b"\0\0ftypmp42" + bytes(range(256)) * 4})
    shard = write_shards(iter(samples), str(tmp_path / "in"), 16, "cut")[0]
    for decoder in ("dali", "torch"):
        code, rows, metrics = run(shard, tmp_path / decoder, batch_size=16, decoder=decoder)
        assert code == 0
        assert [r["key"] for r in rows if r["status"] != "ok"] == ["011"], decoder
        assert rows[11]["status"] == "decode_error" and "end-of-image marker" in rows[11]["error"]
        assert rows[11]["topk_index"] is None
        assert metrics["dali_fallback_batches"] == 0


@pytest.mark.parametrize("out_dtype", [torch.uint8, torch.float32], ids=["cpu-uint8", "cuda-normalised"])
def test_an_image_only_torchvision_decodes_is_scored_with_its_decode(out_dtype, monkeypatch):
    """DALI fails an image and its CPU reference fails it alone too (injected at both pipelines' outputs):
    torchvision, the torch back-end's decoder, has the last word; it decodes it, so the row is scored
    with torchvision's pixels, as decoder=torch would score it. In both output forms: uint8 crops (the
    CPU's) and normalised in DALI (CUDA's, here on the CPU)."""
    from pipeline.decode import dali_decode
    from pipeline.decode.torch import decode_and_crop

    monkeypatch.setattr(dali_decode, "output_dtype", lambda device, dtype: out_dtype)
    batch = jpegs(4, 5)
    s = stage(batch_size=4)
    fail_once(s, DALI_FRAME.format("Failed to decode sample #2 : "))
    real = s._reference_run
    refused = []

    def reference_run(items):
        if len(items) == 1 and not refused:
            refused.append(True)
            return RuntimeError(DALI_FRAME.format("Failed to decode sample #0 : "))
        return real(items)

    s._reference_run = reference_run
    (images, failed), = decode(s, [batch])
    assert failed == [] and images.shape[0] == 4 and s.reference_decodes == 1 and refused
    crop = decode_and_crop(batch[2].tobytes(), [PRE])[0].permute(1, 2, 0)
    if out_dtype == torch.uint8:
        assert torch.equal(images[2], crop)
    else:
        torch.testing.assert_close(images[2], (crop.float() - torch.tensor(PRE.mean) * 255) / (torch.tensor(PRE.std) * 255))
        assert images.dtype == torch.float32


def test_the_decode_batch_regrows_after_oom_regrow_after_good_batches():
    s = stage(batch_size=8, regrow_after=2)
    fail_once(s, "std::bad_alloc", when=lambda n: n > 4)
    decode(s, [jpegs(8, i) for i in range(4)])
    assert s.oom_events == 1 and s.policy.size == 8  # halved to 4, then doubled back after two good batches


def test_a_batch_held_back_after_oom_does_not_take_the_next_batchs_images():
    """After a halving, a full batch is not fed whole but a short one behind it is (a window's tail): the
    held-back batch must not be given the short batch's output."""
    batches = [jpegs(8, 1), jpegs(8, 2), jpegs(8, 3), jpegs(3, 4)]  # the third is held back, the fourth fed
    clean = decode(stage(), batches)
    s = stage()
    fail_once(s, "std::bad_alloc", when=lambda n: n > 4)
    got = decode(s, batches)
    assert [f for _, f in got] == [[]] * 4 and s.oom_events == 1
    for (a, _), (b, _) in zip(got, clean):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_normalising_in_dali_matches_normalising_uint8_crops(dtype):
    """CUDA's form (DALI normalises into the model's dtype) and the CPU's (uint8 crops normalised by the
    Normalizer) give the same model input, both run here on DALI's CPU decoder and resize."""
    from pipeline.decode.assemble import Normalizer
    from pipeline.decode.dali_decode import DecodePipeline
    from pipeline.settings import DaliSettings

    batch = jpegs(8, 7)
    inputs = []
    for out_dtype in (torch.uint8, dtype):
        pipe = DecodePipeline([PRE], 8, torch.device("cpu"), out_dtype,
                              LoaderSettings(threads=2, dali=DaliSettings(resize="dali")))
        pipe.feed(batch)
        inputs.append(Normalizer(8, PRE, torch.device("cpu"), dtype).place(pipe.output()[0], None, 8).float())
        pipe.close()
    torch.testing.assert_close(inputs[1], inputs[0], atol=2e-3 if dtype == torch.float16 else 1e-5, rtol=1e-3)


def test_decoded_images_stay_valid_while_held():
    """Batches are used without a copy: an output DALI gave must not change when DALI runs again."""
    from pipeline.decode.dali_decode import DecodePipeline

    pipe = DecodePipeline([PRE], 8, torch.device("cpu"), torch.float32, LoaderSettings(threads=2))  # CUDA's form
    held = []
    for seed in range(4):
        pipe.feed(jpegs(8, seed))
        (images,) = pipe.output()
        held.append((images, images.clone()))
    assert all(torch.equal(images, copy) for images, copy in held)
    assert not torch.equal(held[0][1], held[1][1])  # (distinct batches)
    pipe.close()


@pytest.mark.parametrize("pieces, lengths", [
    ([(3, None), (4, [0, 2, 3]), (5, None), (2, [1])], [5, 5, 4]),  # (rows, positions of rows with an image)
    ([(3, None), (4, None), (1, None)], [5, 3]),  # every row with its image: stitched without a scatter
])
def test_stitched_pieces_land_where_their_rows_are(pieces, lengths):
    """DecodedAssembler: pieces shorter than a batch (a window's last reader batch), with all their images or
    some rows failed (positions), are stitched into full batches; each image lands on its own row, the
    rows without one and the padding are zeros."""
    from pipeline.batch import Rows
    from pipeline.decode.assemble import DecodedAssembler, Normalizer

    size, batch_size = 4, 5
    stds = (0.25, 0.5)  # two branches: each row's image lands on the same row in both views
    assembler = DecodedAssembler([Normalizer(batch_size, Preprocess(4, 4, (0.5,) * 3, (std,) * 3, "bilinear"),
                                             torch.device("cpu"), torch.float32) for std in stds])
    expected, batches, value = [], [], 0
    for n, positions in pieces:
        rows = Rows([f"k{value + i}" for i in range(n)], ["s"] * n, [None] * n, ["ok"] * n, [None] * n)
        have = range(n) if positions is None else positions
        images = torch.stack([torch.full((size, size, 3), value + i, dtype=torch.uint8) for i in have])
        expected += [float(value + i) if i in have else None for i in range(n)]
        batches += assembler.add(rows, (images, images.clone()), positions)
        value += n
    batches += assembler.flush()
    assert [len(b.rows) for b in batches] == lengths
    assert [k for b in batches for k in b.rows.keys] == [f"k{i}" for i in range(value)]
    for row, want in enumerate(expected + [None] * (-value % batch_size)):  # then the padding
        for view, std in zip(batches[row // batch_size].views, stds):
            got = view[row % batch_size]
            if want is None:
                assert torch.equal(got, torch.zeros_like(got))
            else:
                assert torch.allclose(got, torch.full_like(got, (want - 127.5) / (255 * std))), row


def test_batch_buffers_are_taken_again_only_once_nothing_refers_to_them():
    from pipeline.decode.assemble import BatchBuffers

    buffers = BatchBuffers((2, 3, 4, 4), torch.float32, torch.device("cpu"))
    first, second = buffers.take(), buffers.take()
    assert first.data_ptr() != second.data_ptr()  # both held
    assert first.is_contiguous(memory_format=torch.channels_last)
    kept = first.data_ptr()
    view = first[:1]
    del first
    third = buffers.take()
    assert third.data_ptr() not in (kept, second.data_ptr())  # a view of the first is alive
    del view, third
    assert buffers.take().data_ptr() == kept  # nothing refers to it any more


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_one_images_crop_comes_out_channels_last_with_the_batchs_pixels(interpolation):
    """An HWC image's CHW view (what both decoders hand over) resizes to a channels_last crop, as a batch of
    such images does, with the same pixels: a planar crop would cost a transposing copy per image and
    branch (half the resize's time, docs/BENCHMARKS.md)."""
    from pipeline.decode.assemble import resize_and_crop

    hwc = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (35, 47, 3), dtype=np.uint8))
    p = Preprocess(24, 20, (0.5,) * 3, (0.5,) * 3, interpolation)
    one = resize_and_crop(hwc.permute(2, 0, 1), p)
    batch = resize_and_crop(hwc[None].permute(0, 3, 1, 2), p)
    assert one.shape == (3, 20, 20) and one.stride()[0] == 1  # channels innermost
    assert torch.equal(one, batch[0])
    planar = resize_and_crop(hwc.permute(2, 0, 1).contiguous(), p)
    assert torch.equal(planar, one)


@pytest.mark.parametrize("decoder", ["dali", "torch"])
def test_a_model_whose_output_is_a_view_of_its_input_keeps_its_rows(shards, tmp_path, monkeypatch, decoder):
    """Batch tensors are reused on the CPU: a model whose output is a view of its input (the scores then
    wait, as that view, to be written after the next batch is scored) must still write each row's own
    values. Many batches of 4 against one batch of 32."""
    from dataclasses import replace

    from hydra.utils import instantiate

    from conftest import tiny_settings

    (tmp_path / "viewnet.py").write_text(textwrap.dedent("""
        from torch import nn


        class FirstRow(nn.Module):
            def forward(self, x):
                return x[:, 0, 0, :]  # a view of the input batch, [n, width]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    model = ModelSettings(source="module", module={"_target_": "viewnet.FirstRow"}, resize_size=8, crop_size=8,
                          mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear")
    rows = {}
    for batch_size in (4, 32):
        out = tmp_path / str(batch_size)
        settings = tiny_settings(shards, out, batch_size=batch_size, decoder=decoder, outputs=("scores",))
        assert score(replace(settings, model=model), build=instantiate) == 0
        rows[batch_size] = pq.read_table(out).sort_by("key").column("scores").to_pylist()
    assert rows[4] == rows[32] and len(rows[4]) == 23 and len(set(map(tuple, rows[4]))) > 20
