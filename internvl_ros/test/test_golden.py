"""Golden tests: greedy ids of our runtime == transformers generate(do_sample=False).

Both tiny checkpoints ("a": 2 layers, GQA 2; "b": 3 layers, GQA 3), through
- the onnxruntime path (dynamic shapes, float32), and
- the axengine path on the pyaxengine-contract double (fixed shape groups with the published
  build's limits: kv_cache_len 2047, 8 prefill slices of 128; bfloat16 layer I/O),
for: text only, one image, two images, and prompts of exactly 127, 128, 129 and 256 tokens.
"""

from __future__ import annotations

import numpy as np
import pytest

from internvl_ros.backends import fake_axengine
from internvl_ros.core import GenerationConfig, Pipeline
from internvl_ros.export.testing import hf_greedy, tiny_model_dirs

MAX_NEW = 16
FILLERS = [" the", " robot", " is", " near", " a", " red", " cup", ".", ","]


@pytest.fixture(scope="module", params=["a", "b"])
def model(request, tmp_path_factory):
    hf_dir, onnx_dir = tiny_model_dirs(request.param)
    axera = tmp_path_factory.mktemp(f"axera-{request.param}")
    fake_axengine.make_fake_axera_dir(onnx_dir, axera)  # 2047 / 1152, as published
    host = Pipeline.from_model_dir(onnx_dir, num_threads=1)
    with fake_axengine.installed():
        npu = Pipeline.from_model_dir(axera, backend="axengine")
    assert npu.llm.fixed and npu.max_context == 2047 and npu.max_prompt_tokens == 1152
    yield hf_dir, host, npu
    host.close()
    npu.close()


def image(seed, h=300, w=400):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def question_for_length(pipe, target, system_prompt="You describe images."):
    """Pad the question until the whole prompt is exactly `target` tokens."""
    question = "Describe"
    count = len(pipe.prepare(question, system_prompt=system_prompt)[0])
    assert count < target
    i = 0
    while count < target:
        for filler in FILLERS[i % len(FILLERS):] + FILLERS[:i % len(FILLERS)]:
            n = len(pipe.prepare(question + filler, system_prompt=system_prompt)[0])
            if n <= target:
                question, count = question + filler, n
                break
        else:
            raise AssertionError("no filler fits")
        i += 1
    return question


def check(hf_dir, host, npu, question, images=(), system_prompt=None):
    cfg = GenerationConfig(max_new_tokens=MAX_NEW)
    ids, pixels = host.prepare(question, images, system_prompt=system_prompt)
    eos = list(host.tokenizer.eos_token_ids)  # the same stop tokens on both sides
    reference = hf_greedy(hf_dir, ids, pixels, max_new_tokens=MAX_NEW, eos_token_ids=eos)
    assert len(reference) >= 4, f"the reference stopped at once: {reference}"
    results = {}
    for name, pipe in (("onnxruntime", host), ("axengine", npu)):
        with fake_axengine.installed():
            res = pipe.generate(question, images=images, system_prompt=system_prompt,
                                config=cfg).result
        assert res.prompt_token_ids == ids
        n = len(res.token_ids)
        if res.finish_reason == "eos":  # ours excludes the stop token, HF includes it
            # transformers stopped there too: one more id, and it is a stop token
            assert len(reference) == n + 1 and reference[n] in eos, (name, reference)
            assert reference[:n] == res.token_ids, name
        else:
            assert res.finish_reason == "length" and res.token_ids == reference, name
            assert not set(reference) & set(eos), name  # transformers did not stop early
        results[name] = res
    return ids, results


def test_text_only(model):
    hf_dir, host, npu = model
    check(hf_dir, host, npu, "What is in front of the robot?")


def test_one_image(model):
    hf_dir, host, npu = model
    ids, res = check(hf_dir, host, npu, "Describe the image.", images=[image(1)])
    assert res["axengine"].timings.image_tiles == 1


def test_two_images(model):
    hf_dir, host, npu = model
    ids, _ = check(hf_dir, host, npu, "Compare the two images.", images=[image(2), image(3)])
    assert ids.count(host.tokenizer.img_context_id) == 512


@pytest.mark.parametrize("target", [127, 128, 129, 256])
def test_prompt_lengths_around_slice_boundaries(model, target):
    hf_dir, host, npu = model
    question = question_for_length(host, target)
    ids, _ = check(hf_dir, host, npu, question, system_prompt="You describe images.")
    assert len(ids) == target


def test_remote_code_layout_export(tmp_path):
    """A checkpoint in the original remote-code layout (llm_config; what the published
    InternVL3.5 folders use), exported, gives the same greedy ids as the native one."""
    from internvl_ros.export.testing import SPECS
    from internvl_ros.export.tiny import main as make_tiny

    hf_dir, _ = tiny_model_dirs("a")
    flags = [x for k, v in SPECS["a"].items() for x in (f"--{k.replace('_', '-')}", str(v))]
    assert make_tiny(["--output", str(tmp_path / "hf"), "--export", str(tmp_path / "onnx"),
                      "--layout", "remote", *flags]) == 0
    with Pipeline.from_model_dir(tmp_path / "onnx", num_threads=1) as pipe:
        assert pipe.config.layout == "remote"
        img = image(7)
        res = pipe.generate("Describe the image.", images=[img],
                            config=GenerationConfig(max_new_tokens=MAX_NEW)).result
        ids, pixels = pipe.prepare("Describe the image.", [img])
    assert res.token_ids == hf_greedy(hf_dir, ids, pixels, max_new_tokens=MAX_NEW)
