"""internvl-caption: JSON output, streaming, video, the axengine path, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from internvl_ros.backends import fake_axengine
from internvl_ros.core import GenerationConfig, Pipeline, Tokenizer, load_image
from internvl_ros.export.testing import tiny_model_dirs
from internvl_ros.tools import caption

PROMPT = "What is in front of the robot?"


@pytest.fixture(scope="module")
def onnx_dir():
    return tiny_model_dirs("a")[1]


@pytest.fixture(scope="module")
def jpg(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "x.jpg"
    rng = np.random.default_rng(0)
    cv2.imwrite(str(path), rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))
    return path


def cli(*args, timeout=120, env=None):
    return subprocess.run([sys.executable, "-m", "internvl_ros.tools.caption", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_json_output_matches_the_pipeline(onnx_dir, jpg):
    out = cli("--model-dir", onnx_dir, "--image", jpg, "--prompt", PROMPT, "--max-new-tokens",
              "10", "--json", "--threads", "1")
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert {"text", "prompt_token_ids", "token_ids", "finish_reason", "timings"} <= set(record)
    assert record["finish_reason"] == "length" and len(record["token_ids"]) == 10
    assert {"ttft_s", "prefill_s", "vit_s", "decode_tokens_per_s"} <= set(record["timings"])
    with Pipeline.from_model_dir(onnx_dir, num_threads=1) as pipe:
        res = pipe.generate(PROMPT, images=[load_image(jpg)],
                            config=GenerationConfig(max_new_tokens=10)).result
    assert record["token_ids"] == res.token_ids and record["text"] == res.text
    assert record["prompt_token_ids"] == res.prompt_token_ids


def test_stream_prints_the_text(onnx_dir, jpg, capsys):
    rc = caption.main(["--model-dir", str(onnx_dir), "--image", str(jpg), "--prompt", PROMPT,
                       "--max-new-tokens", "8", "--stream", "--threads", "1"])
    streamed = capsys.readouterr().out
    rc2 = caption.main(["--model-dir", str(onnx_dir), "--image", str(jpg), "--prompt", PROMPT,
                        "--max-new-tokens", "8", "--threads", "1"])
    plain = capsys.readouterr().out
    assert rc == rc2 == 0 and streamed == plain and plain.strip()


def test_sampling_flags_and_seed(onnx_dir, capsys):
    args = ["--model-dir", str(onnx_dir), "--prompt", PROMPT, "--max-new-tokens", "8",
            "--temperature", "1.0", "--top-k", "50", "--top-p", "0.9", "--json", "--threads", "1"]
    runs = []
    for seed in ("1", "1", "2"):
        assert caption.main(args + ["--seed", seed]) == 0
        runs.append(json.loads(capsys.readouterr().out)["token_ids"])
    assert runs[0] == runs[1] != runs[2]


def write_clip(path, count=10):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5, (160, 120))
    for i in range(count):
        writer.write(np.full((120, 160, 3), 20 * i, np.uint8))
    writer.release()


@pytest.mark.parametrize("max_context", [None, 800])
def test_video_default_frames_fit_the_prompt_limit(onnx_dir, tmp_path, capsys, max_context):
    """Without --frames: as many frames as fit (8 x 256 image tokens never fit 2048)."""
    path = tmp_path / "clip.avi"
    write_clip(path)
    extra = [] if max_context is None else ["--max-context", str(max_context)]
    rc = caption.main(["--model-dir", str(onnx_dir), "--video", str(path), "--prompt", PROMPT,
                       "--max-new-tokens", "2", "--json", "--threads", "1"] + extra)
    out = capsys.readouterr()
    assert rc == 0, out.err
    record = json.loads(out.out)
    with Pipeline.from_model_dir(onnx_dir, num_threads=1, max_context=max_context) as pipe:
        limit = pipe.max_prompt_tokens
        text_only = len(pipe.prepare(PROMPT, [], video=True)[0])
    frames = record["timings"]["image_tiles"]
    n_prompt = len(record["prompt_token_ids"])
    per_frame = (n_prompt - text_only) / frames  # 256 image tokens + "FrameN: <img></img>\n"
    assert n_prompt <= limit < n_prompt + per_frame or frames == 8
    assert frames == (7 if max_context is None else 2)


def test_video(onnx_dir, tmp_path, capsys):
    path = tmp_path / "clip.avi"
    write_clip(path)
    rc = caption.main(["--model-dir", str(onnx_dir), "--video", str(path), "--frames", "2",
                       "--prompt", PROMPT, "--max-new-tokens", "4", "--json", "--threads", "1"])
    record = json.loads(capsys.readouterr().out)
    assert rc == 0 and record["timings"]["image_tiles"] == 2
    tok = Tokenizer.from_path(onnx_dir / "tokenizer.json")
    assert record["prompt_token_ids"].count(tok.img_context_id) == 2 * 256
    assert "Frame1: " in tok.decode(record["prompt_token_ids"])
    assert "Frame2: " in tok.decode(record["prompt_token_ids"])


def test_axengine_backend_on_the_test_double(onnx_dir, jpg, tmp_path, capsys):
    fake_axengine.make_fake_axera_dir(onnx_dir, tmp_path)
    args = ["--image", str(jpg), "--prompt", PROMPT, "--max-new-tokens", "6", "--json"]
    with fake_axengine.installed():
        assert caption.main(["--model-dir", str(tmp_path), "--backend", "axengine"] + args) == 0
    npu = json.loads(capsys.readouterr().out)
    assert caption.main(["--model-dir", str(onnx_dir), "--threads", "1"] + args) == 0
    host = json.loads(capsys.readouterr().out)
    assert npu["backend"] == "axengine" and npu["token_ids"] == host["token_ids"]


@pytest.mark.parametrize("case", ["bad_image", "missing_image", "missing_dir", "too_long",
                                  "bad_config", "no_axengine", "zero_context",
                                  "negative_context", "missing_video"])
def test_errors_are_one_line_exit_2(onnx_dir, jpg, tmp_path, case):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not a jpeg")
    base = ["--model-dir", onnx_dir, "--prompt", PROMPT, "--threads", "1"]
    args, expect = {
        "bad_image": (base + ["--image", bad], "could not be decoded"),
        "missing_image": (base + ["--image", tmp_path / "none.jpg"], "cannot read image file"),
        "missing_dir": (["--model-dir", tmp_path / "nope", "--prompt", "x"], "does not exist"),
        "too_long": (base + ["--image", jpg, "--max-context", "100"], "at most 100"),
        "bad_config": (base + ["--top-p", "0"], "top_p"),
        "zero_context": (base + ["--max-context", "0"], "max_context=0"),
        "negative_context": (base + ["--max-context", "-5"], "max_context=-5"),
        "missing_video": (base + ["--video", tmp_path / "none.mp4"], "does not exist"),
        "no_axengine": (None, "pyaxengine"),
    }[case]
    env = None
    if case == "no_axengine":
        root = tmp_path / "ax"
        fake_axengine.make_fake_axera_dir(onnx_dir, root)
        args = ["--model-dir", root, "--backend", "axengine", "--prompt", PROMPT]
        # what pyaxengine does on a machine without an NPU
        stub = tmp_path / "stub"
        stub.mkdir()
        (stub / "axengine.py").write_text("raise ImportError('No providers found. Please make "
                                          "sure you have installed one of the following: "
                                          "[AxEngineExecutionProvider, AXCLRTExecutionProvider]')")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(stub)] + [p for p in sys.path if p]))
    out = cli(*args, env=env)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("internvl-caption: error:"), out.stderr
    assert expect in lines[0] and "Traceback" not in out.stderr
    assert out.stdout == ""
