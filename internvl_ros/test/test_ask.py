"""Several questions about one frame: `Pipeline.ask`, the KV prefix reuse, the frame embedding
cache, `LanguageModel.prefill(keep=)`, and a failing question that fails alone.

Token equality with separate `generate()` calls runs on onnxruntime and on the axengine double
(fixed 128-row prefill slices: only whole slices of the prefix are kept)."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_pipes import Recorder, both_backends

from internvl_ros.backends import fake_axengine
from internvl_ros.core import GenerationConfig, Question
from internvl_ros.core.errors import (
    BackendError,
    ConfigError,
    ImageDecodeError,
    PromptTooLongError,
)
from internvl_ros.core.framecache import EncodedFrame, FrameCache

QUESTIONS = ["Describe the image.",
             Question("Is the door open?", choices=("yes", "no", "not sure")),
             Question("What is on the table?", max_new_tokens=6)]
CFG = GenerationConfig(max_new_tokens=10)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    with both_backends(tmp_path_factory) as (_, pipes):
        yield pipes


def image(seed=0, h=200, w=260):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def separate(pipe, question, images, cfg=CFG, **kw):
    """A fresh request: nothing reused (no frame key, KV prefix forgotten)."""
    q = question if isinstance(question, Question) else Question(question)
    pipe.reset()
    return pipe.generate(q.prompt, images=images, config=q.config(cfg), **kw).result


@pytest.mark.parametrize("backend", ["onnxruntime", "axengine", "axengine-rows"])
def test_ask_equals_separate_requests_token_for_token(pipes, backend):
    pipe = pipes[backend]
    img = image(1)
    with fake_axengine.installed():
        refs = [separate(pipe, q, [img]) for q in QUESTIONS]
        rec = pipe.llm.layers[0] = Recorder(pipe.llm.layers[0])
        try:
            answers = pipe.ask(QUESTIONS, images=[img], config=CFG).answers
        finally:
            pipe.llm.layers[0] = rec.inner
    assert [a.index for a in answers] == [0, 1, 2]
    for a, ref in zip(answers, refs, strict=True):
        assert a.success and a.message == "ok"
        assert a.result.token_ids == ref.token_ids, (backend, a.index)
        assert a.result.prompt_token_ids == ref.prompt_token_ids
        assert a.finish_reason == ref.finish_reason and a.choice_index == ref.choice_index
    assert answers[1].text in ("yes", "no", "not sure") and answers[1].choice_index >= 0
    assert len(answers[2].result.token_ids) <= 6
    first, *later = [a.timings for a in answers]
    assert first.vit_s > 0 and first.cached_prompt_tokens == 0
    n_img = 256
    for tm, a in zip(later, answers[1:], strict=True):
        assert tm.vit_s == 0 and tm.image_tiles == 1
        assert tm.cached_prompt_tokens > n_img  # system prompt + image block kept
        ids = a.result.prompt_token_ids
        shared = ids.index(pipe.tokenizer.img_end_id) + 2  # up to </img> and the "\n" after it
        if backend.startswith("axengine"):  # the whole slices of the shared prefix
            assert tm.cached_prompt_tokens == shared // 128 * 128
        else:  # the question's own tokens only
            assert tm.cached_prompt_tokens == shared
    # the prefill runs of the follow-ups: what the layer was fed
    runs = [(g, shapes["input"][1], shapes["mask"][-1]) for g, shapes in rec.calls]
    prefills = [c for c in runs if c[1] > 1 or c[0] != pipe.llm.decode_group]
    if backend == "onnxruntime":  # rows fed = the question's tokens, past = the kept rows
        for tm, a in zip(later, answers[1:], strict=True):
            n_new = len(a.result.prompt_token_ids) - tm.cached_prompt_tokens
            assert any(rows == n_new and mask == len(a.result.prompt_token_ids)
                       for _, rows, mask in prefills)
    elif backend == "axengine":  # no follow-up runs the first slice (past 0)
        first_slice_group = pipe.llm.prefill_groups[0].group
        assert sum(g == first_slice_group for g, _, _ in prefills) == 1


@pytest.mark.parametrize("backend", ["onnxruntime", "axengine", "axengine-rows"])
def test_frame_cache_skips_the_vit_and_the_prefix(pipes, backend):
    pipe = pipes[backend]
    pipe.frames.clear()
    img = image(2)
    with fake_axengine.installed():
        ref = separate(pipe, "Describe the image.", [img])
        a = pipe.generate("Describe the image.", images=[img], config=CFG,
                          frame_key=("front", 7)).result
        b = pipe.generate("Describe the image.", images=[img], config=CFG,
                          frame_key=("front", 7)).result
        c = pipe.generate("What colour is it?", images=[img], config=CFG,
                          frame_key=("front", 7)).result
        c_ref = separate(pipe, "What colour is it?", [img])
    assert a.token_ids == b.token_ids == ref.token_ids and c.token_ids == c_ref.token_ids
    assert a.timings.vit_s > 0 and b.timings.vit_s == 0 and c.timings.vit_s == 0
    n = len(b.prompt_token_ids)
    want = (n - 1) // 128 * 128 if backend.startswith("axengine") else n - 1
    assert b.timings.cached_prompt_tokens == want
    assert len(pipe.frames) == 1


def test_frame_cache_is_per_frame_and_checks_the_image(pipes):
    pipe = pipes["onnxruntime"]
    pipe.frames.clear()
    a, b = image(3), image(4)
    ra = pipe.generate("Describe the image.", images=[a], config=CFG, frame_key=1).result
    rb = pipe.generate("Describe the image.", images=[b], config=CFG, frame_key=2).result
    # back to frame 1: its embeddings are cached, but frame 2 ran in between (no KV reuse)
    ra2 = pipe.generate("Describe the image.", images=[a], config=CFG, frame_key=1).result
    assert ra2.token_ids == ra.token_ids and ra2.timings.vit_s == 0
    assert ra2.timings.cached_prompt_tokens == 0
    assert rb.token_ids == separate(pipe, "Describe the image.", [b]).token_ids
    # the same key with an image of another size is another frame: encoded again
    other = image(5, h=120, w=90)
    r = pipe.generate("Describe the image.", images=[other], config=CFG, frame_key=1).result
    assert r.timings.vit_s > 0
    assert r.token_ids == separate(pipe, "Describe the image.", [other]).token_ids
    with pytest.raises(ConfigError, match="hashable"):
        pipe.generate("Q", images=[a], frame_key=["not", "hashable"])


def test_a_direct_prefill_in_between_voids_the_prefix(pipes):
    pipe = pipes["onnxruntime"]
    img = image(6)
    first = pipe.generate("Describe the image.", images=[img], config=CFG, frame_key="k6").result
    llm = pipe.llm
    llm.prefill(llm.embed(first.prompt_token_ids[:40]))  # someone else's rows
    again = pipe.generate("Describe the image.", images=[img], config=CFG,
                          frame_key="k6").result
    assert again.timings.cached_prompt_tokens == 0 and again.token_ids == first.token_ids


def test_text_only_requests_share_the_system_prompt(pipes):
    pipe = pipes["onnxruntime"]
    pipe.reset()
    a = pipe.generate("What is in front of the robot?", config=CFG).result
    b = pipe.generate("What is behind the robot?", config=CFG).result
    assert a.timings.cached_prompt_tokens == 0 and b.timings.cached_prompt_tokens > 20
    assert b.token_ids == separate(pipe, "What is behind the robot?", []).token_ids


def test_one_bad_question_fails_alone(pipes):
    pipe = pipes["onnxruntime"]
    img = image(7)
    long_q = "the robot " * 900
    questions = ["Describe the image.", Question("Door?", choices=("a", "a")), long_q,
                 Question("Door?", choices=("open", "closed")), 42, "What is on the table?"]
    answers = pipe.ask(questions, images=[img], config=CFG).answers
    ok = [a.success for a in answers]
    assert ok == [True, False, False, True, False, True]
    assert "ConfigError" in answers[1].message and "repeats" in answers[1].message
    assert answers[2].message.startswith("PromptTooLongError")
    assert answers[4].message.startswith("ShapeMismatchError")
    assert answers[1].choice_index == -1 and answers[1].text == answers[1].finish_reason == ""
    assert answers[3].text in ("open", "closed")
    assert answers[5].result.token_ids == separate(pipe, "What is on the table?", [img]).token_ids
    assert not pipe.busy


def test_a_backend_failure_fails_its_question_only(pipes):
    pipe = pipes["onnxruntime"]
    img = image(8)
    layer = pipe.llm.layers[1]

    class Broken:
        def __getattr__(self, name):
            return getattr(layer, name)

        def run(self, *a, **k):
            raise RuntimeError("NPU timeout")

    ask = pipe.ask(["Describe the image.", "What is on the table?", "Where is the door?"],
                   images=[img], config=CFG)
    first = next(ask)
    pipe.llm.layers[1] = Broken()
    try:
        second = next(ask)
    finally:
        pipe.llm.layers[1] = layer
    third = next(ask)
    assert first.success and not second.success and third.success
    assert isinstance(second.error, BackendError) and "NPU timeout" in second.message
    assert third.timings.vit_s == 0  # the frame's embeddings survive; its KV rows were reset
    assert third.timings.cached_prompt_tokens == 0
    assert third.result.token_ids == separate(pipe, "Where is the door?", [img]).token_ids
    with pytest.raises(StopIteration):
        next(ask)


def test_cancel_answers_the_rest_as_cancelled(pipes):
    pipe = pipes["onnxruntime"]
    ask = pipe.ask(["Describe the image.", "What is on the table?", "Where?"],
                   images=[image(9)], config=CFG)
    first = next(ask)
    ask.cancel()
    rest = ask.answers[1:]
    assert first.finish_reason in ("eos", "length")
    assert [a.finish_reason for a in rest] == ["cancelled", "cancelled"]
    assert all(a.success and a.message == "cancelled" and a.choice_index == -1 for a in rest)
    assert not pipe.busy


def test_ask_input_errors_raise_at_once(pipes):
    pipe = pipes["onnxruntime"]
    with pytest.raises(ConfigError, match="empty"):
        pipe.ask([], images=[image()])
    with pytest.raises(ConfigError, match="list"):
        pipe.ask("one question", images=[image()])
    with pytest.raises(ImageDecodeError):
        pipe.ask(["Q"], images=[b"not an image"])
    # nine images do not fit the context: every question says so, none raises
    answers = pipe.ask(["Q", "R"], images=[image(h=32, w=32)] * 9).answers
    assert all(isinstance(a.error, PromptTooLongError) for a in answers)


# ------------------------------------------------------------------------------------------
# the language model's keep= and the frame cache, directly


@pytest.mark.parametrize("backend", ["onnxruntime", "axengine", "axengine-rows"])
def test_prefill_keep_equals_a_full_prefill(pipes, backend):
    llm = pipes[backend].llm
    rng = np.random.default_rng(0)
    hidden = llm.config.hidden_size
    x = rng.normal(0, 1, (300, hidden)).astype(np.float32)
    with fake_axengine.installed():
        full = llm.prefill(x)
        y = x.copy()
        y[290:] = rng.normal(0, 1, (10, hidden))  # same first 290 rows, another tail
        keep = llm.reusable_rows(290)
        assert keep == (256 if llm.fixed else 290)
        kept = llm.prefill(y, keep=keep)
        ref = llm.prefill(y)
        np.testing.assert_allclose(kept, ref, rtol=1e-4, atol=1e-4)
        assert not np.allclose(full, ref, atol=1e-3)
        for bad in (300, 500, -1) + ((100,) if llm.fixed else ()):
            with pytest.raises(ValueError):
                llm.prefill(y, keep=bad)
        llm.reset()
        assert llm.reusable_rows(200) == 0
        llm.prefill(y)
        llm.cache.taint()
        assert llm.reusable_rows(200) == 0
        llm.reset()


def frame(nbytes_rows):
    return EncodedFrame(tiles=(1,), video=False, shapes=((1, 1, 3),), pixels=None,
                        features=np.zeros((nbytes_rows, 256), np.float32))  # rows x 1 KiB


def test_frame_cache_is_an_lru_bounded_in_bytes():
    cache = FrameCache(max_bytes=10 << 10)  # 10 KiB
    for k in range(4):
        cache.put(k, frame(3))  # 3 KiB each: the fourth evicts the first
    assert cache.get(0) is None and cache.get(1) is not None
    cache.put(4, frame(3))  # 1 was used last: 2 goes
    assert cache.get(2) is None and cache.get(1) is not None and cache.get(4) is not None
    assert cache.nbytes <= 10 << 10 and len(cache) == 3
    cache.put("huge", frame(11))  # larger than the cache: not kept, nothing evicted
    assert cache.get("huge") is None and len(cache) == 3
    cache.put(1, frame(1))  # replacing an entry updates the byte count
    assert cache.nbytes == 7 << 10
    off = FrameCache(0)
    off.put(1, frame(1))
    assert off.get(1) is None
    with pytest.raises(ConfigError):
        FrameCache(-1)


def test_frame_cache_count_bound():
    """The node bounds the cache by frames too (the latest of each camera): however small the
    embeddings, it never holds more than max_frames, and evicts the least recently used."""
    cache = FrameCache(max_bytes=64 << 20, max_frames=2)
    for k in range(100):
        cache.put(k, frame(1))
        assert len(cache) == min(k + 1, 2) and cache.nbytes == len(cache) << 10
    assert cache.get(98) is not None and cache.get(99) is not None and cache.get(97) is None
    cache.get(98)  # 98 used last: the next put evicts 99
    cache.put(100, frame(1))
    assert cache.get(99) is None and cache.get(98) is not None
    off = FrameCache(max_bytes=64 << 20, max_frames=0)
    off.put(1, frame(1))
    assert off.get(1) is None and len(off) == 0
    for bad in (-1, True, 1.5):
        with pytest.raises(ConfigError, match="frame_cache_frames"):
            FrameCache(max_frames=bad)
