"""Mistakes a user can make end in one line on stderr, exit code 2, no traceback, before any image is read."""

from __future__ import annotations

import pytest

from conftest import TINY, run_cli, run_cli_cases

BAD = {
    "unknown model": (["model.name=resnet_does_not_exist"], "unknown model"),
    "bad precision": (["precision=fp8"], "precision must be one of"),
    "batch size zero": (["batch_size=0"], "batch_size must be a positive integer"),
    "pattern matches nothing": (["data.shards=/nonexistent/x-{000..009}.tar"], "matches no file"),
    "unknown key": (["batch_sise=4"], "batch_sise"),
    "unknown model group": (["model=nonexistent"], "model"),
    "bad checkpoint path": (["model.checkpoint=/nonexistent/ckpt.pt"], "does not exist"),
    "bad decoder": (["decoder=pillow"], "decoder must be one of"),
    "unknown source": (["model.source=keras"], "unknown model.source 'keras'"),
    "module without a target": (["model.source=module"], "needs model.module with a _target_"),
    "module that does not build": (["model.source=module", "+model.module={_target_: nopkg.Net}"],
                                   "cannot build model.module nopkg.Net"),
    "unknown output kind": (["outputs=[logits]"], "outputs must be a list of distinct topk, embedding, scores"),
    "nearest interpolation": (["model.interpolation=nearest"], "model.interpolation must be one of bilinear|bicubic"),
    "tensorrt without a gpu": (["model.backend=tensorrt", "device=cpu"],
                               "model.backend=tensorrt needs a CUDA GPU (device=cpu here)"),
    "unknown backend": (["model.backend=openvino"], "model.backend must be one of eager|compile|onnxruntime|tensorrt"),
    "compile and an engine": (["model.compile=true", "model.backend=onnxruntime"], "choose one"),
    "int8 without an engine": (["precision=int8"], "precision=int8 quantises an engine"),
    "onnx outputs without onnx": (["model.onnx_outputs={output: 0}"], "model.onnx_outputs is for an .onnx model.path"),
    "onnx file missing": (["model.path=/nonexistent/m.onnx", "model.mean=[0.5,0.5,0.5]", "model.std=[0.5,0.5,0.5]",
                           "model.interpolation=bilinear"], "model.path /nonexistent/m.onnx does not exist"),
    "onnx on the cpu in fp16": (["model.backend=onnxruntime", "precision=fp16", "device=cpu"],
                                "runs fp32 or int8: not precision=fp16"),
    "stage dir under a file": (["data.stage_dir=/dev/null/stage"],
                               "data.stage_dir=/dev/null/stage: cannot stage shards there (Not a directory)"),
}


@pytest.fixture(scope="module")
def bad_runs(shards, tmp_path_factory):
    """Every case of BAD through the real entry (`python -m jobs.score`), all in one process: (exit code,
    stderr, output folder) by case. The exit codes of the process itself are checked below."""
    root = tmp_path_factory.mktemp("bad-arguments")
    cases = sorted(BAD)
    args = [[*TINY, f"data.shards={shards[0]}", f"output.dir={root / str(i)}", *BAD[case][0]]
            for i, case in enumerate(cases)]
    results = run_cli_cases("jobs.score", args)
    return {case: (r["code"], r["stderr"], root / str(i)) for i, (case, r) in enumerate(zip(cases, results))}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_argument_is_one_clear_line(bad_runs, case):
    code, stderr, out = bad_runs[case]
    assert code == 2, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip() and "][" not in ln]  # log lines aside
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error:") and BAD[case][1] in lines[0]
    assert "Traceback" not in stderr
    assert not list(out.glob("*.parquet"))


def test_a_bad_argument_exits_the_process_with_2(shards, tmp_path):
    r = run_cli("jobs.score", *TINY, f"data.shards={shards[0]}", f"output.dir={tmp_path / 'out'}", "batch_size=0")
    assert r.returncode == 2 and r.stderr.strip() == "error: batch_size must be a positive integer or auto, got 0"


def test_missing_output_dir(shards):
    r = run_cli("jobs.score", *TINY, f"data.shards={shards[0]}")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error:") and "output.dir" in r.stderr
    assert "Traceback" not in r.stderr


def test_weights_without_network_say_what_to_do(shards, tmp_path):
    """No network here: named weights that are not cached must fail clearly, never fall back to random."""
    r = run_cli("jobs.score", *TINY, f"data.shards={shards[0]}", f"output.dir={tmp_path}",
                "model.weights=IMAGENET1K_V1", env={"TORCH_HOME": str(tmp_path / "empty-cache")})
    assert r.returncode == 2
    assert "cannot load pretrained weights" in r.stderr and "model.checkpoint" in r.stderr
    assert "Traceback" not in r.stderr
