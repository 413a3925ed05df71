"""The node's parts in-process, without DDS: the inference worker on the real pipeline and the
tiny model (backend failure mid-generation, queue bound, cancel, shutdown, continuous mode giving
way to requests, an internal error, a caption racing a timeout), QoS matching, the parameter
table and the warning throttle."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest

from internvl_ros.core import GenerationConfig, Pipeline
from internvl_ros.export.testing import tiny_model_dirs
from internvl_ros.ros.worker import (
    CONTINUOUS,
    InferenceWorker,
    Job,
    Outcome,
    Request,
    RequestError,
)

LOG = logging.getLogger("test_node_worker")
RGB = np.random.default_rng(5).integers(0, 256, (480, 640, 3), dtype=np.uint8)


class Img:
    """An ImageSource: RGB, after ``hook()`` (which may block, or raise RequestError)."""

    def __init__(self, hook=None):
        self.hook = hook

    def decode(self, max_dim):
        if self.hook is not None:
            self.hook()
        return RGB, "hdr"


def request(prompt="What is in front of the robot?", tokens=16, source="service", image=None,
            **kw) -> Request:
    return Request(prompt=prompt, system_prompt=None,
                   config=GenerationConfig(max_new_tokens=tokens), image=image or Img(),
                   source=source, **kw)


def wait_until(pred, timeout=10.0, what="a condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


@pytest.fixture(scope="module")
def model_dir():
    return tiny_model_dirs("a")[1]


class Harness:
    """A worker, the jobs' caption callback, and the queue bound the node would pass."""

    def __init__(self, pipeline, max_queue, on_caption=None):
        self.worker = InferenceWorker(pipeline, LOG)
        self.max_queue = max_queue
        self.published = []
        self._on_caption = on_caption

    def publish(self, job, outcome):
        if self._on_caption is not None:
            self._on_caption(job, outcome)
        self.published.append(outcome.text)

    def job(self, req: Request) -> Job:
        return Job(req, on_caption=self.publish)

    def submit(self, job: Job, **kw):
        return self.worker.submit(job, self.max_queue, **kw)

    def __getattr__(self, name):
        return getattr(self.worker, name)


@pytest.fixture
def make_worker(model_dir):
    made = []

    def make(max_queue=2, pipeline=None, on_caption=None):
        w = Harness(pipeline or Pipeline.from_model_dir(model_dir), max_queue, on_caption)
        made.append(w)
        return w

    yield make
    for w in made:
        w.stop()
        assert w.join(30)
        w.pipeline.close()


def run(worker, req, timeout=30.0) -> Outcome:
    job = worker.job(req)
    assert worker.submit(job) is None
    assert job.wait(timeout)
    return job.outcome


def reference_text(model_dir, tokens=16) -> str:
    with Pipeline.from_model_dir(model_dir) as pipe:
        gen = pipe.generate("What is in front of the robot?", images=[RGB],
                            config=GenerationConfig(max_new_tokens=tokens))
        return gen.result.text


def test_backend_error_mid_generation_fails_that_request_and_the_next_is_served(
        make_worker, model_dir, caplog):
    """A backend session fails under the core's wrapping (run_session -> BackendError), as a
    real NPU failure does: "backend error: ...", an ERROR with the traceback, a pipeline reset."""
    worker = make_worker()
    layer = worker.pipeline.llm.layers[0]
    real_run, armed = layer.run, threading.Event()

    def flaky_run(*args, **kwargs):
        if armed.is_set():
            armed.clear()
            raise RuntimeError("NPU fell over")
        return real_run(*args, **kwargs)

    layer.run = flaky_run
    resets = []
    real_reset = worker.pipeline.reset
    worker.pipeline.reset = lambda: (resets.append(1), real_reset())
    with caplog.at_level(logging.ERROR, logger=LOG.name):
        bad = run(worker, request(on_delta=lambda *a: armed.set()))  # fails at the 2nd token
    assert not bad.success and bad.message.startswith("backend error: ")
    assert "RuntimeError: NPU fell over" in bad.message and "BackendError" not in bad.message
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and "NPU fell over" in errors[0].getMessage()
    assert "Traceback" in errors[0].getMessage()  # the traceback is in the log
    assert resets == [1]
    assert worker.published == []  # a failure is not a caption
    good = run(worker, request())
    assert good.success and good.finish_reason == "length"
    assert good.text == reference_text(model_dir)  # the KV cache did not leak into it
    assert worker.published == [good.text]
    t = good.timings
    assert t.generated_tokens == 16 and t.prompt_tokens > 256
    assert 0 < t.ttft_s <= t.total_s and t.vit_s > 0 and t.decode_tokens_per_s > 0


def test_max_new_tokens_is_clamped_to_the_context(make_worker):
    """A uint32 from a request (4294967295) must not size buffers: clamped to the context."""
    worker = make_worker()
    out = run(worker, request(tokens=2**32 - 1, image=Img()), timeout=120)
    assert out.success, out.message
    assert out.timings.generated_tokens <= worker.pipeline.max_context


def test_queue_bound_refuses_at_once_and_every_job_gets_one_outcome(make_worker):
    gate = threading.Event()
    worker = make_worker(max_queue=1)
    jobs = [worker.job(request(tokens=4, image=Img(lambda: gate.wait(10)))) for _ in range(4)]
    assert worker.submit(jobs[0]) is None
    wait_until(lambda: worker.state() == ("generating", 0), what="the worker to pick it up")
    assert worker.submit(jobs[1]) is None  # waits
    t0 = time.monotonic()
    refused = [worker.submit(j) for j in jobs[2:]]
    assert time.monotonic() - t0 < 0.05
    assert all(r.refused and r.message.startswith("busy:") and "max_queue 1" in r.message
               for r in refused)
    assert worker.state() == ("generating", 1)
    gate.set()
    for j in jobs[:2]:
        assert j.wait(30) and j.outcome.success
    assert not jobs[0].finish(Outcome.fail("late"))  # first outcome wins
    assert jobs[0].outcome.success


def test_request_errors_and_cancel(make_worker):
    def stale():
        raise RequestError("the latest frame is stale")

    worker = make_worker()
    out = run(worker, request(prompt="stale", image=Img(stale)))
    assert not out.success and out.message == "the latest frame is stale"
    out = run(worker, request(prompt="x" * 20000))
    assert not out.success and out.message.startswith("PromptTooLongError")

    seen = []
    job = worker.job(request(tokens=1500, on_delta=lambda text, delta, n: seen.append(n)))
    assert worker.submit(job) is None
    wait_until(lambda: seen, what="the first token")
    job.cancel.set()
    assert job.wait(30)
    assert job.outcome.success and job.outcome.finish_reason == "cancelled"
    assert 1 <= job.outcome.timings.generated_tokens < 1500
    assert worker.published == []  # partial text is not published as a caption
    assert run(worker, request()).success  # and the pipeline is free again


def test_stop_answers_queued_jobs_and_cancels_the_running_one(make_worker):
    worker = make_worker(max_queue=4)
    first = worker.job(request(tokens=1500, on_delta=lambda *a: time.sleep(0.001)))
    queued = [worker.job(request()) for _ in range(3)]
    for j in (first, *queued):
        assert worker.submit(j) is None
    wait_until(lambda: worker.state() == ("generating", 3), what="one running, three waiting")
    t0 = time.monotonic()
    worker.stop()  # answers everything at once, without waiting for the worker
    assert time.monotonic() - t0 < 0.1
    for j in (first, *queued):
        assert j.done and not j.outcome.success
        assert j.outcome.message == "the node is shutting down"
    assert worker.join(10)  # the running generation stopped at a token
    assert not worker.pipeline.busy
    refusal = worker.submit(worker.job(request()))
    assert refusal.message == "the node is shutting down" and not refusal.refused  # not busy


def test_stop_does_not_wait_for_a_model_run_that_cannot_be_interrupted(make_worker):
    """A long ViT pass or prefill has no token boundary: stop() answers, join() is bounded."""
    inside, release = threading.Event(), threading.Event()

    def long_vit():
        inside.set()
        release.wait(10)

    worker = make_worker()
    job = worker.job(request(image=Img(long_vit)))
    assert worker.submit(job) is None
    assert inside.wait(10)
    worker.stop()
    assert job.done and job.outcome.message == "the node is shutting down"
    assert not worker.join(0.2) and worker.alive  # still "inside the model"
    release.set()
    assert worker.join(10) and not worker.pipeline.busy


def test_a_request_pre_empts_continuous_mode(make_worker):
    """With max_queue 0, a request during a continuous caption is served, not refused."""
    worker = make_worker(max_queue=0)
    started = threading.Event()
    cont = worker.job(request(tokens=1500, source=CONTINUOUS,
                              on_delta=lambda *a: started.set()))
    assert worker.submit(cont, only_if_idle=True) is None
    assert started.wait(10)
    refusal = worker.submit(worker.job(request(source=CONTINUOUS)), only_if_idle=True)
    assert refusal is not None and refusal.refused  # continuous never queues behind anything
    req = worker.job(request())
    assert worker.submit(req) is None  # the continuous caption gives way
    busy = worker.submit(worker.job(request()))  # but the bound holds for requests
    assert busy is not None and busy.refused and "max_queue 0" in busy.message
    assert cont.wait(30) and cont.outcome.finish_reason == "cancelled"
    assert req.wait(30) and req.outcome.success and req.outcome.finish_reason == "length"
    assert worker.published == [req.outcome.text]  # the cut-off continuous text is not


def test_an_internal_error_answers_the_job_and_the_worker_keeps_serving(make_worker, model_dir):
    class BrokenOnce:
        """The real pipeline, except that the first result's timings cannot be read."""

        def __init__(self, pipe):
            self.pipe, self.broken = pipe, True

        def generate(self, *args, **kwargs):
            gen = self.pipe.generate(*args, **kwargs)
            if self.broken:
                self.broken = False
                real = type(gen).result

                class Gen(type(gen)):
                    @property
                    def result(self):
                        res = real.fget(self)
                        res.timings = object()  # timings_dict() fails outside _run's try
                        return res

                gen.__class__ = Gen
            return gen

        def __getattr__(self, name):
            return getattr(self.pipe, name)

    worker = make_worker(pipeline=BrokenOnce(Pipeline.from_model_dir(model_dir)))
    bad = run(worker, request())
    assert not bad.success and bad.message.startswith("internal error: AttributeError")
    assert worker.alive
    good = run(worker, request())
    assert good.success and good.text == reference_text(model_dir)


def test_a_published_caption_is_not_failed_by_a_racing_timeout(make_worker):
    publishing, release = threading.Event(), threading.Event()

    def slow_publish(job, outcome):
        publishing.set()
        release.wait(10)

    worker = make_worker(on_caption=slow_publish)
    job = worker.job(request())
    assert worker.submit(job) is None
    assert publishing.wait(30)  # the worker claimed the job and is publishing its caption
    assert not job.finish(Outcome.fail("timed out after 1 s"))  # the handler's timeout loses
    release.set()
    assert job.wait(10) and job.outcome.success and worker.published == [job.outcome.text]


def test_job_claim_is_exclusive():
    job = Job(request())
    assert job.claim() and not job.claim()
    assert not job.finish(Outcome.fail("other"))
    assert job.finish(Outcome(True, "ok"), claimed=True) and job.outcome.message == "ok"
    late = Job(request())
    assert late.finish(Outcome.fail("timed out")) and not late.claim()  # too late to claim


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


def test_mixed_reliabilities_are_warned_about():
    from types import SimpleNamespace as NS

    from rclpy.qos import DurabilityPolicy
    from rclpy.qos import ReliabilityPolicy as R

    from internvl_ros.ros.qos import mixed_reliability_warning

    def pub(name, rel):
        return NS(node_namespace="/", node_name=name,
                  qos_profile=NS(reliability=rel, durability=DurabilityPolicy.VOLATILE))

    assert mixed_reliability_warning([]) is None
    assert mixed_reliability_warning([pub("a", R.RELIABLE), pub("b", R.RELIABLE)]) is None
    assert mixed_reliability_warning([pub("a", R.BEST_EFFORT)]) is None
    w = mixed_reliability_warning([pub("cam", R.RELIABLE), pub("bag", R.BEST_EFFORT)])
    assert "/cam (reliable, volatile)" in w and "/bag (best_effort, volatile)" in w
    assert "fastdds_large_data.xml" in w and "docs/NODE.md" in w


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
    t._last["size"] -= 0.25  # the period has passed (no sleep)
    assert t("size") == 2


# ---------------------------------------------------------------------------------------------
# vision_msgs (not installable here): the mapping, against stand-ins of both message layouts


def _vision_msgs_standin(humble: bool):
    """Plain classes with the fields of vision_msgs 4.x (Humble) or 3.x."""
    from types import SimpleNamespace as NS

    class Detection2D:
        def __init__(self):
            centre = NS(position=NS(x=0.0, y=0.0), theta=0.0) if humble else NS(x=0.0, y=0.0)
            self.header, self.results = None, []
            self.bbox = NS(center=centre, size_x=0.0, size_y=0.0)
            if humble:
                self.id = ""

    class ObjectHypothesisWithPose:
        def __init__(self):
            if humble:
                self.hypothesis = NS(class_id="", score=0.0)
            else:
                self.id, self.score = "", 0.0

    class Detection2DArray:
        def __init__(self):
            self.header, self.detections = None, []

    return NS(Detection2D=Detection2D, Detection2DArray=Detection2DArray,
              ObjectHypothesisWithPose=ObjectHypothesisWithPose)


@pytest.mark.parametrize("humble", [True, False])
def test_detections_map_to_vision_msgs_centre_and_size(humble):
    from internvl_ros.core.grounding import Box
    from internvl_ros.ros.outputs import detection2d_array

    header = object()
    arr = detection2d_array(header, (Box("cup", 10.0, 20.0, 50.0, 100.0), Box("", 0, 0, 4, 2)),
                            _vision_msgs_standin(humble))
    assert arr.header is header and len(arr.detections) == 2
    det = arr.detections[0]
    centre = det.bbox.center.position if humble else det.bbox.center
    assert (centre.x, centre.y, det.bbox.size_x, det.bbox.size_y) == (30.0, 60.0, 40.0, 80.0)
    assert det.header is header
    (hyp,) = det.results
    if humble:
        assert (hyp.hypothesis.class_id, hyp.hypothesis.score, det.id) == ("cup", 1.0, "cup")
    else:
        assert (hyp.id, hyp.score) == ("cup", 1.0)


def test_when_idle_runs_once_the_queue_is_empty_and_cannot_stop_the_worker(model_dir):
    """The worker's housekeeping hook (the node's malloc_trim): after the last waiting job, not
    between queued ones; an exception in it is logged and the next request is served."""
    calls = []

    def when_idle():
        calls.append(worker.state())
        if len(calls) == 1:
            raise RuntimeError("housekeeping failed")

    worker = InferenceWorker(Pipeline.from_model_dir(model_dir), LOG, when_idle=when_idle)
    try:
        gate = threading.Event()
        jobs = [Job(request(tokens=2, image=Img(hook=gate.wait)))]
        jobs += [Job(request(tokens=2)) for _ in range(2)]
        for job in jobs:
            assert worker.submit(job, 2) is None
        gate.set()
        for job in jobs:
            assert job.wait(30) and job.outcome.success, job.outcome
        wait_until(lambda: calls, what="the idle hook")
        time.sleep(0.2)
        assert calls == [("idle", 0)]  # once, after the third job
        job = Job(request(tokens=2))
        assert worker.submit(job, 2) is None
        assert job.wait(30) and job.outcome.success, job.outcome
        wait_until(lambda: len(calls) == 2, what="the idle hook again")
        assert worker.alive
    finally:
        worker.stop()
        assert worker.join(30)
        worker.pipeline.close()
