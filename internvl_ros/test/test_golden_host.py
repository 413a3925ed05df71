"""Golden tests of the host layout (`internvl-export --layout host`: one onnxruntime graph with
GroupQueryAttention and a KV cache kept in the session): greedy ids == transformers
generate(do_sample=False) on both tiny checkpoints, for the cases of test_golden.py (text only,
one image, two images, prompts of exactly 127, 128, 129 and 256 tokens), plus what only this
layout has: prefix reuse, the in-place cache, int8/int4 exports and layout discovery.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_golden import MAX_NEW, image, question_for_length

from internvl_ros.core import GenerationConfig, Pipeline
from internvl_ros.core.errors import ConfigError, ModelDirError, PromptTooLongError
from internvl_ros.core.host_llm import HostLanguageModel
from internvl_ros.core.modeldir import discover
from internvl_ros.export.exporter import export_model, host_lm_file
from internvl_ros.export.quantize import QuantConfig
from internvl_ros.export.testing import hf_greedy, tiny_model_dirs


@pytest.fixture(scope="module", params=["a", "b"])
def model(request, tmp_path_factory):
    hf_dir, _ = tiny_model_dirs(request.param)
    out = export_model(hf_dir, tmp_path_factory.mktemp(f"host-{request.param}"), layout="host",
                       max_positions=1024)
    pipe = Pipeline.from_model_dir(out, num_threads=1)
    assert isinstance(pipe.llm, HostLanguageModel) and pipe.max_context == 1024
    yield hf_dir, pipe
    pipe.close()


def check(hf_dir, pipe, question, images=(), system_prompt=None):
    ids, pixels = pipe.prepare(question, images, system_prompt=system_prompt)
    reference = hf_greedy(hf_dir, ids, pixels, max_new_tokens=MAX_NEW)
    assert len(reference) >= 4, f"the reference stopped at once: {reference}"
    res = pipe.generate(question, images=images, system_prompt=system_prompt,
                        config=GenerationConfig(max_new_tokens=MAX_NEW)).result
    assert res.prompt_token_ids == ids
    n = len(res.token_ids)
    if res.finish_reason == "eos":  # ours excludes the stop token, HF includes it
        assert reference[:n + 1] == res.token_ids + [reference[n]]
    else:
        assert res.finish_reason == "length" and res.token_ids == reference
    return ids, res


def test_text_only(model):
    check(*model, "What is in front of the robot?")


def test_one_image(model):
    _, res = check(*model, "Describe the image.", images=[image(1)])
    assert res.timings.image_tiles == 1


def test_two_images(model):
    hf_dir, pipe = model
    ids, _ = check(hf_dir, pipe, "Compare the two images.", images=[image(2), image(3)])
    assert ids.count(pipe.tokenizer.img_context_id) == 512


@pytest.mark.parametrize("target", [127, 128, 129, 256])
def test_prompt_lengths(model, target):
    hf_dir, pipe = model
    question = question_for_length(pipe, target)
    ids, _ = check(hf_dir, pipe, question, system_prompt="You describe images.")
    assert len(ids) == target


def test_chunked_prefill_and_prefix_reuse_match_one_pass(model):
    """A prompt fed in chunks, or continued after keeping a cached prefix, gives the logits of
    one pass; stale rows of a longer earlier request are never read."""
    _, pipe = model
    llm = pipe.llm
    ids, _ = pipe.prepare("Describe the image.", [image(4)])
    embeds = llm.embed(ids)  # (L, hidden)
    whole = llm.prefill(embeds).copy()
    after = llm.decode(int(whole.argmax())).copy()
    chunk = llm.chunk
    try:
        llm.chunk = 100
        np.testing.assert_allclose(llm.prefill(embeds), whole, rtol=1e-4, atol=1e-4)
    finally:
        llm.chunk = chunk
    llm.prefill(embeds[:150])  # a prefix; the rows of the longer request above stay stale
    assert llm.reusable_rows(len(embeds)) == 150
    np.testing.assert_allclose(llm.prefill(embeds, keep=150), whole, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(llm.decode(int(whole.argmax())), after, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="cannot keep"):
        llm.prefill(embeds, keep=llm.cache.filled + 1)


def test_context_limits(model):
    _, pipe = model
    llm = pipe.llm
    with pytest.raises(PromptTooLongError, match="at most 1024"):
        llm.check_prompt_length(1025)
    llm.prefill(llm.embed([5] * 1023))
    llm.decode(7)
    with pytest.raises(PromptTooLongError, match="context of 1024 tokens is full"):
        llm.decode(7)
    llm.reset()
    assert llm.cache.filled == 0


def test_max_context_beyond_export_is_refused(model, tmp_path):
    _, pipe = model
    with pytest.raises(ConfigError, match="--max-positions"):
        Pipeline.from_model_dir(pipe.model_dir.paths.root, max_context=4096)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_host_export_matches_split_quantized_logits(tmp_path, bits):
    """int8/int4 MatMulNBits in the host graph (fused q/k/v and gate/up) compute what the
    split layout's quantised build computes (same round-to-nearest weights)."""
    from internvl_ros.export.quantize import quantize_model_dir

    hf_dir, onnx_dir = tiny_model_dirs("a")
    quant = QuantConfig(bits, 32, True, 0)
    host = export_model(hf_dir, tmp_path / "host", layout="host", quant=quant)
    split = quantize_model_dir(onnx_dir, tmp_path / "split", bits=bits, accuracy_level=0)
    info = (host / "internvl_export.json").read_text()
    assert '"layout": "host"' in info and f'"bits": {bits}' in info
    ids = None
    logits = {}
    for name, d in (("host", host), ("split", split)):
        with Pipeline.from_model_dir(d, num_threads=1) as pipe:
            ids = ids or pipe.prepare("Describe the robot.")[0]
            first = pipe.llm.prefill(pipe.llm.embed(ids)).copy()
            logits[name] = np.stack([first, pipe.llm.decode(int(first.argmax())).copy()])
    np.testing.assert_allclose(logits["host"], logits["split"], rtol=1e-3, atol=1e-3)


def test_discovery_tells_the_layouts_apart(model, tmp_path):
    _, pipe = model
    host_dir = pipe.model_dir.paths.root
    paths = discover(host_dir)
    assert paths.layout == "host" and paths.layers == ()
    assert paths.host_lm == host_dir / host_lm_file()
    _, onnx_dir = tiny_model_dirs("a")
    split = discover(onnx_dir)
    assert split.layout == "split" and split.host_lm is None and len(split.layers) == 2
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for f in [*host_dir.iterdir(), *split.layers]:
        (mixed / f.name).symlink_to(f)
    with pytest.raises(ModelDirError, match="one layout per folder"):
        discover(mixed)


def test_export_replaces_the_other_layout(tmp_path):
    hf_dir, _ = tiny_model_dirs("a")
    out = tmp_path / "out"
    export_model(hf_dir, out)
    export_model(hf_dir, out, layout="host")
    assert discover(out).layout == "host" and not list(out.glob("*_together.onnx"))
    export_model(hf_dir, out)
    assert discover(out).layout == "split" and not (out / host_lm_file()).exists()


def test_quantize_tool_on_a_host_export_equals_quantised_export(tmp_path):
    """`python -m internvl_ros.export.quantize` on a float host export packs what
    `internvl-export --layout host --bits 8` packs (the lm_head kept float here)."""
    from internvl_ros.export.quantize import quantize_model_dir

    hf_dir, _ = tiny_model_dirs("a")
    float_dir = export_model(hf_dir, tmp_path / "float", layout="host")
    post = quantize_model_dir(float_dir, tmp_path / "post", bits=8, lm_head_bits=0,
                              accuracy_level=0)
    direct = export_model(hf_dir, tmp_path / "direct", layout="host",
                          quant=QuantConfig(8, 32, True, 0), lm_head_bits=0)
    out = []
    for d in (post, direct):
        with Pipeline.from_model_dir(d, num_threads=1) as pipe:
            assert discover(d).layout == "host"
            ids = pipe.prepare("Describe the robot.")[0]
            out.append(pipe.llm.prefill(pipe.llm.embed(ids)))
    np.testing.assert_allclose(out[0], out[1], rtol=1e-5, atol=1e-5)


def test_wrong_files_for_the_host_runner_are_refused(model):
    from dataclasses import replace

    from internvl_ros.backends.onnxruntime_backend import OnnxRuntimeKVSession
    from internvl_ros.core.errors import ShapeMismatchError

    _, pipe = model
    _, onnx_dir = tiny_model_dirs("a")
    layer = discover(onnx_dir).layers[0]
    with pytest.raises(ModelDirError, match="not a host-layout language model"):
        OnnxRuntimeKVSession(str(layer), num_threads=1)
    session = OnnxRuntimeKVSession(str(pipe.model_dir.paths.host_lm), num_threads=1)
    other = replace(pipe.config, num_hidden_layers=pipe.config.num_hidden_layers + 1)
    with pytest.raises(ShapeMismatchError, match="belong to different models"):
        HostLanguageModel(session, pipe.llm.embeddings, other)
    session.close()
