"""The node's parts in-process, without DDS: the inference worker on the real pipeline and the
tiny model (backend failure mid-generation, queue bound, cancel, shutdown), QoS matching, the
parameter table and the warning throttle."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest

from internvl_ros.core import GenerationConfig, Pipeline
from internvl_ros.export.testing import tiny_model_dirs
from internvl_ros.ros.worker import InferenceWorker, Job, Outcome, Request, RequestError

LOG = logging.getLogger("test_node_worker")
RGB = np.random.default_rng(5).integers(0, 256, (480, 640, 3), dtype=np.uint8)


def request(prompt="What is in front of the robot?", tokens=16, **kw) -> Request:
    return Request(prompt=prompt, system_prompt=None, max_new_tokens=tokens,
                   max_frame_age=float("inf"), source="service", **kw)


@pytest.fixture(scope="module")
def model_dir():
    return tiny_model_dirs("a")[1]


@pytest.fixture
def make_worker(model_dir):
    made = []

    def make(max_queue=2, prepare=None, pipeline=None):
        pipe = pipeline or Pipeline.from_model_dir(model_dir)
        published = []
        w = InferenceWorker(
            pipe,
            prepare=prepare or (lambda job: (RGB, "hdr", 0.001)),
            make_config=lambda job: GenerationConfig(max_new_tokens=job.request.max_new_tokens),
            on_caption=lambda job, outcome: published.append(outcome.text),
            logger=LOG,
            max_queue_fn=lambda: max_queue,
        )
        w.published = published
        made.append(w)
        return w

    yield make
    for w in made:
        w.stop()
        w.pipeline.close()


def run(worker, req, timeout=30.0) -> Outcome:
    job = Job(req)
    assert worker.submit(job) is None
    assert job.wait(timeout)
    return job.outcome


def reference_text(model_dir, tokens=16) -> str:
    with Pipeline.from_model_dir(model_dir) as pipe:
        gen = pipe.generate("What is in front of the robot?", images=[RGB],
                            config=GenerationConfig(max_new_tokens=tokens))
        return gen.result.text


def test_backend_error_mid_generation_fails_that_request_and_the_next_is_served(
        make_worker, model_dir):
    worker = make_worker()
    llm = worker.pipeline.llm
    real_decode, calls = llm.decode, {"n": 0}

    def flaky_decode(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("NPU fell over")
        return real_decode(*args, **kwargs)

    llm.decode = flaky_decode
    bad = run(worker, request())
    assert not bad.success and bad.message == "backend error: RuntimeError: NPU fell over"
    assert worker.published == []  # a failure is not a caption
    good = run(worker, request())
    assert good.success and good.finish_reason == "length"
    assert good.text == reference_text(model_dir)  # the KV cache did not leak into it
    assert worker.published == [good.text]
    t = good.timings
    assert t["generated_tokens"] == 16 and t["prompt_tokens"] > 256
    assert 0 < t["ttft"] <= t["total"] and t["vit"] > 0 and t["tokens_per_second"] > 0


def test_queue_bound_refuses_at_once_and_every_job_gets_one_outcome(make_worker):
    gate = threading.Event()

    def slow_prepare(job):
        gate.wait(10)
        return RGB, None, 0.0

    worker = make_worker(max_queue=1, prepare=slow_prepare)
    jobs = [Job(request(tokens=4)) for _ in range(4)]
    assert worker.submit(jobs[0]) is None
    time.sleep(0.1)  # the worker picks it up and blocks in prepare
    assert worker.submit(jobs[1]) is None  # waits
    t0 = time.monotonic()
    refused = [worker.submit(j) for j in jobs[2:]]
    assert time.monotonic() - t0 < 0.05
    assert all(r and r.startswith("busy:") and "max_queue 1" in r for r in refused)
    assert worker.state() == ("generating", 1)
    gate.set()
    for j in jobs[:2]:
        assert j.wait(30) and j.outcome.success
    assert not jobs[0].finish(Outcome.fail("late"))  # first outcome wins
    assert jobs[0].outcome.success


def test_request_errors_and_cancel(make_worker):
    def prepare(job):
        if job.request.prompt == "stale":
            raise RequestError("the latest frame is stale")
        return RGB, None, 0.0

    worker = make_worker(prepare=prepare)
    out = run(worker, request(prompt="stale"))
    assert not out.success and out.message == "the latest frame is stale"
    out = run(worker, request(prompt="x" * 20000))
    assert not out.success and out.message.startswith("PromptTooLongError")

    seen = []
    job = Job(request(tokens=1500, on_delta=lambda text, delta, n: seen.append(n)))
    assert worker.submit(job) is None
    while not seen:
        time.sleep(0.001)
    job.cancel.set()
    assert job.wait(30)
    assert job.outcome.success and job.outcome.finish_reason == "cancelled"
    assert 1 <= job.outcome.timings["generated_tokens"] < 1500
    assert worker.published == []  # partial text is not published as a caption
    assert run(worker, request()).success  # and the pipeline is free again


def test_stop_answers_queued_jobs_and_cancels_the_running_one(make_worker):
    worker = make_worker(max_queue=4)
    first = Job(request(tokens=1500, on_delta=lambda *a: time.sleep(0.001)))
    queued = [Job(request()) for _ in range(3)]
    for j in (first, *queued):
        assert worker.submit(j) is None
    time.sleep(0.2)
    worker.stop()
    for j in (first, *queued):
        assert j.done and not j.outcome.success
        assert j.outcome.message == "the node is shutting down"
    assert not worker._thread.is_alive()  # the running generation stopped at a token
    assert not worker.pipeline.busy
    assert worker.submit(Job(request())) == "the node is shutting down"


# ---------------------------------------------------------------------------------------------
# QoS matching, parameter table, throttled warnings


def test_auto_reliability_matches_the_publishers_like_rosbag2():
    from rclpy.qos import ReliabilityPolicy as R

    from internvl_ros.ros.qos import choose_reliability

    assert choose_reliability([])[0] == R.BEST_EFFORT  # matches whoever appears
    assert choose_reliability([R.RELIABLE, R.RELIABLE])[0] == R.RELIABLE
    policy, why = choose_reliability([R.RELIABLE, R.BEST_EFFORT])
    assert policy == R.BEST_EFFORT and "1 of 2" in why
    assert choose_reliability([int(R.BEST_EFFORT)])[0] == R.BEST_EFFORT  # raw ints from graph


def test_parameter_table_is_consistent():
    from internvl_ros.ros import params

    names = [p.name for p in params.PARAMS]
    assert len(names) == len(set(names))
    issue_names = {"model_dir", "backend", "provider", "image_transport", "default_prompt",
                   "system_prompt", "max_new_tokens", "temperature", "top_k", "top_p",
                   "repetition_penalty", "caption_rate_hz", "max_frame_age", "max_queue",
                   "request_timeout", "qos_reliability", "qos_depth", "max_image_dim"}
    assert issue_names <= set(names)
    assert params.check_values({"backend": "tensorrt", "top_p": 0.5}) == [
        "backend must be one of onnxruntime, axengine; got 'tensorrt'"]
    assert params.check_values({"max_queue": 99})  # out of range
    with pytest.raises(ValueError):
        params.Param("x", 5, "d", "g")  # a number needs a range
    with pytest.raises(ValueError):
        params.Param("x", "a", "d", "g", choices=("b",))
    # every value the parameter ranges allow is valid for the core's GenerationConfig
    gen = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty")
    for name in gen:
        p = params.BY_NAME[name]
        for value in (p.lo, p.default, p.hi):
            kw = {n: params.BY_NAME[n].default for n in gen}
            kw[name] = type(p.default)(value)
            GenerationConfig(**kw)
    seed = params.BY_NAME["seed"]
    GenerationConfig(seed=int(seed.hi))  # -1 (lo) is mapped to None by the node


def test_throttle_is_per_kind_and_counts_what_it_held_back():
    from internvl_ros.ros.diagnostics import Throttle

    t = Throttle(period=0.2)
    assert t("size") == 0 and t("corrupt") == 0  # different kinds do not throttle each other
    assert t("size") is None and t("size") is None
    time.sleep(0.25)
    assert t("size") == 2
