"""Pipeline and step API: streaming, stop reasons, cancel, busy, backend errors, timings."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from internvl_ros.backends import fake_axengine
from internvl_ros.core import GenerationConfig, Pipeline
from internvl_ros.core.errors import (
    BackendError,
    BusyError,
    ConfigError,
    ImageDecodeError,
    ModelDirError,
    PromptTooLongError,
)

Q = "What is in front of the robot?"


@pytest.fixture(scope="module")
def pipe(host_dir):
    p = Pipeline.from_model_dir(host_dir, num_threads=1)
    yield p
    p.close()


def image(seed=0, h=120, w=160):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def run(pipe, n=12, **kw):
    gen = pipe.generate(Q, config=GenerationConfig(max_new_tokens=n), **kw)
    steps = list(gen)
    return steps, gen.result


def test_streaming_steps_and_result(pipe):
    steps, res = run(pipe, 12, images=[image()])
    assert res.finish_reason == "length" and len(res.token_ids) == 12
    assert [s.token_id for s in steps] == res.token_ids
    assert [s.index for s in steps] == list(range(12))
    assert "".join(s.text_delta for s in steps) + res.text_tail == res.text
    assert res.text == pipe.tokenizer.decode(res.token_ids)
    assert res.prompt_token_ids.count(pipe.tokenizer.img_context_id) == 256
    t = res.timings
    assert t.prompt_tokens == len(res.prompt_token_ids) and t.generated_tokens == 12
    assert t.image_tiles == 1 and t.vit_s > 0 and t.prefill_s > 0 and t.decode_s > 0
    assert t.ttft_s >= t.vit_s + t.prefill_s and t.total_s >= t.ttft_s
    assert t.decode_tokens_per_s > 0
    assert set(res.to_dict()) >= {"text", "token_ids", "prompt_token_ids", "finish_reason",
                                  "timings"}


def test_image_changes_the_answer(pipe):
    _, a = run(pipe, 8, images=[image(1)])
    _, b = run(pipe, 8, images=[image(2)])
    _, c = run(pipe, 8, images=[image(1)])
    assert a.token_ids == c.token_ids and a.token_ids != b.token_ids
    assert a.timings.ttft_s > 0


def test_bytes_images_and_errors(pipe):
    import cv2

    ok, jpg = cv2.imencode(".jpg", image(3))
    _, res = run(pipe, 4, images=[jpg.tobytes()])
    assert res.finish_reason == "length"
    with pytest.raises(ImageDecodeError, match="could not be decoded"):
        pipe.generate(Q, images=[b"garbage"])
    assert not pipe.busy


def test_explicit_step_api(pipe):
    gen = pipe.generate(Q, config=GenerationConfig(max_new_tokens=3))
    steps = [gen.step() for _ in range(5)]
    assert [s is None for s in steps] == [False, False, False, True, True]
    assert gen.finished and gen.result.token_ids == [s.token_id for s in steps[:3]]


def test_eos_stops_and_is_not_returned(pipe):
    _, ref = run(pipe, 8)
    stop = next(t for i, t in enumerate(ref.token_ids) if i >= 2 and t not in ref.token_ids[:i])
    cut = ref.token_ids.index(stop)
    saved = pipe.tokenizer.eos_token_ids
    pipe.tokenizer.eos_token_ids = saved + (stop,)
    try:
        _, res = run(pipe, 8)
    finally:
        pipe.tokenizer.eos_token_ids = saved
    assert res.finish_reason == "eos" and res.token_ids == ref.token_ids[:cut]


class Gate:
    """A session wrapper that, once armed, blocks its next run until `proceed` is set: a step
    is then in flight in the iterating thread for as long as the test wants."""

    def __init__(self, session):
        self.inner = session
        self.armed = False
        self.entered = threading.Event()
        self.proceed = threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run(self, output_names, feed, shape_group=0):
        if self.armed:
            self.armed = False
            self.entered.set()
            assert self.proceed.wait(60)
        return self.inner.run(output_names, feed, shape_group=shape_group)


def consume_in_thread(gen):
    """Iterate `gen` in a new thread; returns (thread, steps, errors)."""
    steps, errors = [], []

    def loop():
        try:
            for step in gen:
                steps.append(step)
        except BaseException as exc:  # reported to the test
            errors.append(exc)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread, steps, errors


@pytest.fixture
def gate(pipe):
    g = Gate(pipe.llm.layers[1])
    pipe.llm.layers[1] = g
    yield g
    g.proceed.set()
    pipe.llm.layers[1] = g.inner


def test_cancel_between_tokens(pipe):
    gen = pipe.generate(Q, config=GenerationConfig(max_new_tokens=50))
    got = []
    for step in gen:
        got.append(step.token_id)
        if len(got) == 3:
            gen.cancel()
    assert gen.result.finish_reason == "cancelled" and len(got) == 3
    assert gen.result.token_ids == got and not pipe.busy


@pytest.mark.parametrize("how", ["cancel", "close"])
def test_cancel_or_close_from_another_thread_during_a_step(pipe, gate, how):
    _, ref = run(pipe, 6)
    gen = pipe.generate(Q, config=GenerationConfig(max_new_tokens=50))
    got = [next(gen).token_id, next(gen).token_id]
    gate.armed = True
    thread, steps, errors = consume_in_thread(gen)
    assert gate.entered.wait(60)  # the other thread is inside decode, in layer 1
    getattr(gen, how)()
    # the step in flight still owns the pipeline and its KV cache
    assert pipe.busy and not gen.finished
    with pytest.raises(BusyError, match="already generating"):
        pipe.generate(Q)
    with pytest.raises(BusyError, match="another thread is iterating"):
        next(gen)
    gate.proceed.set()
    thread.join(60)
    assert not thread.is_alive() and errors == []
    assert steps == []  # nothing is yielded after cancel()/close() returned
    res = gen.result
    assert res.finish_reason == "cancelled" and res.token_ids == got
    assert not pipe.busy
    # the next request starts from a clean state: same tokens, cache filled as expected
    _, again = run(pipe, 6)
    assert again.token_ids == ref.token_ids
    assert pipe.llm.cache.filled == len(again.prompt_token_ids) + 5  # the last token unfed


def test_close_between_steps_frees_the_pipeline_at_once(pipe):
    gen = pipe.generate(Q, config=GenerationConfig(max_new_tokens=50))
    next(gen)
    done = threading.Event()
    threading.Thread(target=lambda: (gen.close(), done.set()), daemon=True).start()
    assert done.wait(30)
    assert gen.finished and not pipe.busy and list(gen) == []
    assert gen.result.finish_reason == "cancelled" and len(gen.result.token_ids) == 1


def test_two_threads_cannot_iterate_one_generation(pipe, gate):
    gen = pipe.generate(Q, config=GenerationConfig(max_new_tokens=4))
    next(gen)
    gate.armed = True
    thread, steps, errors = consume_in_thread(gen)
    assert gate.entered.wait(60)
    with pytest.raises(BusyError, match="another thread"):
        gen.step()
    with pytest.raises(BusyError, match="another thread"):
        _ = gen.result
    gate.proceed.set()
    thread.join(60)
    assert errors == [] and len(steps) == 3 and gen.result.finish_reason == "length"


def test_garbage_collecting_an_abandoned_generation_never_deadlocks(host_dir):
    """gc may finalise a Generation at any point, e.g. while its pipeline's lock is held by
    the same thread (inside generate() or reset()): nothing may take that lock then."""
    import gc

    with Pipeline.from_model_dir(host_dir, num_threads=1) as p:
        gc.disable()
        try:
            gen = p.generate(Q, config=GenerationConfig(max_new_tokens=3))
            gen.cycle = gen  # only the cycle collector can free it
            del gen

            def collect_under_the_lock():
                with p._lock:
                    gc.collect()

            t = threading.Thread(target=collect_under_the_lock, daemon=True)
            t.start()
            t.join(20)
            assert not t.is_alive(), "gc of an abandoned generation deadlocked"
        finally:
            gc.enable()
        assert not p.busy  # the collected generation no longer holds the pipeline
        assert p.generate(Q, config=GenerationConfig(max_new_tokens=2)).result.token_ids


def test_one_generation_at_a_time(pipe):
    gen = pipe.generate(Q, config=GenerationConfig(max_new_tokens=5))
    next(gen)
    with pytest.raises(BusyError, match="cancel"):
        pipe.generate(Q)
    gen.close()
    assert gen.result.finish_reason == "cancelled"
    _, res = run(pipe, 3)  # free again
    assert res.finish_reason == "length"
    gen = pipe.generate(Q)
    del gen  # abandoned without iterating: must not keep the pipeline busy
    assert not pipe.busy


class Failing:
    """A session wrapper that raises on its n-th run."""

    def __init__(self, session, fail_at):
        self._s, self.fail_at, self.n = session, fail_at, 0

    def __getattr__(self, name):
        return getattr(self._s, name)

    def run(self, output_names, feed, shape_group=0):
        self.n += 1
        if self.n == self.fail_at:
            raise RuntimeError("NPU timeout (injected)")
        return self._s.run(output_names, feed, shape_group=shape_group)


def test_backend_error_mid_generation_leaves_pipeline_ready(pipe):
    _, ref = run(pipe, 10, images=[image(4)])
    original = pipe.llm.layers[1]
    pipe.llm.layers[1] = Failing(original, fail_at=5)  # 1 prefill run, then decode steps
    try:
        gen = pipe.generate(Q, images=[image(4)], config=GenerationConfig(max_new_tokens=10))
        with pytest.raises(BackendError) as e:
            for _ in gen:
                pass
        assert "decoder layer 1" in str(e.value) and "injected" in str(e.value)
        assert pipe.llm.cache.filled == 0 and not pipe.busy
        with pytest.raises(BackendError, match="failed"):
            _ = gen.result
    finally:
        pipe.llm.layers[1] = original
    _, again = run(pipe, 10, images=[image(4)])
    assert again.token_ids == ref.token_ids


def test_context_limit_finish_reason(host_dir):
    with Pipeline.from_model_dir(host_dir, num_threads=1, max_context=200) as small:
        n_prompt = len(small.prepare(Q, system_prompt="")[0])
        _, res = run(small, 500, system_prompt="")
    assert res.finish_reason == "context"
    assert n_prompt + len(res.token_ids) == 200 + 1  # the last token is never fed
    with Pipeline.from_model_dir(host_dir, num_threads=1, max_context=300) as small:
        with pytest.raises(PromptTooLongError) as e:
            small.generate(Q, images=[image(), image(1)])
    msg = str(e.value)
    assert "image tokens" in msg and "512 image tokens for 2 tile(s)" in msg


def test_too_many_images_for_the_npu_prefill(host_dir, tmp_path):
    fake_axengine.make_fake_axera_dir(host_dir, tmp_path)  # the real limits: 2047 / 1152
    with fake_axengine.installed():
        with Pipeline.from_model_dir(tmp_path, backend="axengine") as npu:
            assert npu.max_prompt_tokens == 1152 and npu.max_context == 2047
            # the caption CLI's default for --video (4 with the real tokenizer, whose default
            # system prompt is shorter than the tiny byte-level one's)
            assert npu.fit_frames(Q) == 3
            with pytest.raises(PromptTooLongError) as e:
                npu.generate(Q, images=[image(i) for i in range(4)])
            assert "at most 1152" in str(e.value) and "prefill limit 1152" in str(e.value)
            _, res = run(npu, 4, images=[image(0)])
            assert res.finish_reason == "length"


def test_seeded_sampling_is_reproducible(pipe):
    cfg = GenerationConfig(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    a = pipe.generate(Q, config=cfg).result
    b = pipe.generate(Q, config=cfg).result
    c = pipe.generate(Q, config=GenerationConfig(max_new_tokens=10, temperature=1.0,
                                                 top_p=0.9, seed=8)).result
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_video_frames_and_multi_image_prompts(pipe):
    ids, pixels = pipe.prepare(Q, [image(0), image(1), image(2)], video=True)
    text = pipe.tokenizer.decode(ids, skip_special_tokens=True)
    assert "Frame1: " in text and "Frame3: " in text and pixels.shape == (3, 3, 448, 448)
    ids, _ = pipe.prepare(Q, [image(0), image(1)])
    assert "Image-2: " in pipe.tokenizer.decode(ids)


def test_bad_config_and_missing_vit(host_dir, tmp_path, pipe):
    with pytest.raises(ConfigError):
        pipe.generate(Q, config={"max_new_tokens": 3})
    import shutil

    for f in host_dir.iterdir():
        if "vit" not in f.name:
            shutil.copy(f, tmp_path / f.name)
    with Pipeline.from_model_dir(tmp_path, num_threads=1) as textonly:
        assert textonly.generate(Q, config=GenerationConfig(max_new_tokens=2)).result.token_ids
        with pytest.raises(ModelDirError, match="ViT"):
            textonly.generate(Q, images=[image()])


class Nhwc8Vit:
    """A ViT compiled with uint8 NHWC input and the normalisation inside (Axera's U8 config)."""

    def __init__(self, session):
        self._s = session
        self.path = "vit_u8.axmodel"
        self.seen = []

    def get_inputs(self, g=0):
        from internvl_ros.backends.base import NodeInfo

        return [NodeInfo("image", (1, 448, 448, 3), np.dtype(np.uint8))]

    def get_outputs(self, g=0):
        return self._s.get_outputs(g)

    def run(self, names, feed, shape_group=0):
        x = feed["image"]
        assert x.shape == (1, 448, 448, 3) and x.dtype == np.uint8
        self.seen.append(x)
        from internvl_ros.core.preprocess import normalize

        return self._s.run(names, {"image": normalize([x[0]])}, shape_group)

    def close(self):
        pass


def test_uint8_nhwc_vit_input(pipe):
    from internvl_ros.core.pipeline import VisionModel
    from internvl_ros.core.preprocess import resize_bicubic

    img = image(9)
    _, pixels = pipe.prepare(Q, [img])
    wrapped = Nhwc8Vit(pipe.vision.session)
    u8 = VisionModel(wrapped, pipe.config)
    assert u8.nhwc_u8 and u8.image_size == 448
    np.testing.assert_array_equal(u8(pixels), pipe.vision(pixels))
    np.testing.assert_array_equal(wrapped.seen[0][0], resize_bicubic(img, 448, 448))


class HistorySpy:
    """Wraps a Generation's Sampler and records the history passed with every token."""

    def __init__(self, sampler):
        self.inner, self.seen = sampler, []

    def __call__(self, logits, history=()):
        self.seen.append(np.array(history, dtype=np.int64).copy())
        return self.inner(logits, history)


@pytest.mark.parametrize("penalize_prompt", [False, True])
def test_repetition_penalty_covers_generated_ids(pipe, penalize_prompt):
    """As InternVL's chat(): generate(inputs_embeds=...) penalises only generated tokens."""
    cfg = GenerationConfig(max_new_tokens=6, repetition_penalty=1.3,
                           penalize_prompt=penalize_prompt)
    gen = pipe.generate(Q, images=[image(5)], config=cfg)
    spy = gen._sampler = HistorySpy(gen._sampler)
    res = gen.result
    head = res.prompt_token_ids if penalize_prompt else []
    assert [h.tolist() for h in spy.seen] == [head + res.token_ids[:i] for i in range(6)]
    # the tokens equal a greedy loop that penalises exactly those ids
    from internvl_ros.core.sampling import apply_repetition_penalty

    llm = pipe.llm
    embeds = llm.embed(res.prompt_token_ids)
    where = np.flatnonzero(np.asarray(res.prompt_token_ids) == pipe.tokenizer.img_context_id)
    embeds[where] = pipe.vision(pipe.prepare(Q, [image(5)])[1])
    logits, ids = llm.prefill(embeds), []
    for _ in range(6):
        ids.append(int(np.argmax(apply_repetition_penalty(logits, head + ids, 1.3))))
        logits = llm.decode(ids[-1])
    assert ids == res.token_ids


def test_no_history_without_a_penalty(pipe):
    gen = pipe.generate(Q, config=GenerationConfig(max_new_tokens=4))
    spy = gen._sampler = HistorySpy(gen._sampler)
    assert len(gen.result.token_ids) == 4
    assert len(spy.seen) == 4 and all(h.size == 0 for h in spy.seen)


@pytest.mark.parametrize("value", [0, -5, 2.5, True, "2048"])
def test_max_context_must_be_a_positive_integer(host_dir, tmp_path, value):
    with pytest.raises(ConfigError, match="max_context"):
        Pipeline.from_model_dir(host_dir, num_threads=1, max_context=value)
    fake_axengine.make_fake_axera_dir(host_dir, tmp_path)
    with fake_axengine.installed(), pytest.raises(ConfigError, match="max_context"):
        Pipeline.from_model_dir(tmp_path, backend="axengine", max_context=value)


@pytest.mark.parametrize("max_context", [None, 900, 300, 200])
def test_fit_frames_is_the_most_that_fit(host_dir, max_context):
    with Pipeline.from_model_dir(host_dir, num_threads=1, max_context=max_context) as p:
        fits = []
        for n in range(1, 9):
            try:
                p.prepare(Q, [image(0, 16, 16)] * n, video=True)
                fits.append(n)
            except PromptTooLongError:
                pass
        assert p.fit_frames(Q) == (max(fits) if fits else 0)
        assert p.fit_frames(Q, max_frames=2) == min(2, max(fits, default=0))
    if max_context is None:
        assert max(fits) == 7  # 8 x 256 image tokens never fit the 2048-token default
