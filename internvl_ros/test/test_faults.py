"""Backend fault injection: each request gets exactly one answer with a clear reason, and the
next request is served. Four faults (``backends/faulty.py``): a session run that raises at a
random step, NaN or +inf logits, a run that hangs longer than the request timeout, a model file
that fails to load. Both backends: onnxruntime and the axengine double, on the tiny model.

Three levels: the core Pipeline, the node's InferenceWorker, and the node itself in-process
(its real service handler, no spinning). The node-level hang recovery is xfail(strict): see
test_node_hang_is_answered_reported_and_recovered.
"""

from __future__ import annotations

import array
import random
import threading
import time

import numpy as np
import pytest

from internvl_ros.backends import fake_axengine, faulty
from internvl_ros.core import GenerationConfig, Pipeline
from internvl_ros.core.errors import BackendError

PROMPT = "What is in front of the robot?"
TOKENS = 6
BACKENDS = ["onnxruntime", "axengine"]


def picture() -> np.ndarray:
    yy, xx = np.mgrid[0:96, 0:128]
    return np.stack([xx * 2, yy * 2, (xx + yy)], -1).astype(np.uint8)  # (96, 128, 3)


@pytest.fixture(params=BACKENDS)
def backend(request, host_dir, axera_dir):
    """(backend name, model dir), with the axengine double importable for the test."""
    if request.param == "axengine":
        with fake_axengine.installed():
            yield "axengine", axera_dir
    else:
        yield "onnxruntime", host_dir


def load(backend, fault: faulty.Fault) -> tuple[Pipeline, faulty.FaultyBackend]:
    name, model_dir = backend
    with faulty.installed(fault) as handle:
        pipe = Pipeline.from_model_dir(model_dir, backend=name)
    return pipe, handle.backends[0]


def caption(pipe: Pipeline) -> str:
    gen = pipe.generate(PROMPT, images=[picture()], config=GenerationConfig(max_new_tokens=TOKENS))
    return gen.result.text


_REFERENCE: dict[str, tuple[str, int, int]] = {}


@pytest.fixture
def reference(backend):
    """(caption, session runs, tokens) of one healthy request on this backend."""
    name = backend[0]
    if name not in _REFERENCE:
        pipe, fb = load(backend, faulty.Fault("raise", at=10**9))  # never fires: counts
        gen = pipe.generate(PROMPT, images=[picture()],
                            config=GenerationConfig(max_new_tokens=TOKENS))
        res = gen.result
        pipe.close()
        _REFERENCE[name] = (res.text, fb.calls, len(res.token_ids))
    return _REFERENCE[name]


# ---------------------------------------------------------------------------------------------
# the core Pipeline


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pipeline_raise_at_a_random_step_then_serves(backend, reference, seed):
    text, runs, _ = reference
    fault = faulty.Fault.random("raise", random.Random(seed), runs)
    pipe, fb = load(backend, fault)
    try:
        gen = pipe.generate(PROMPT, images=[picture()],
                            config=GenerationConfig(max_new_tokens=TOKENS))
        with pytest.raises(BackendError, match="injected fault") as e:
            _ = gen.result
        assert fb.hits == 1 and any(ext in str(e.value) for ext in (".onnx", ".axmodel"))
        assert not pipe.busy  # the failed generation freed the pipeline
        assert caption(pipe) == text  # and the KV state it left did not leak into the next
    finally:
        pipe.close()
    assert not fb.open_sessions


@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("at", [1, 3])  # the prefill's logits, or a decode step's
def test_pipeline_non_finite_logits_fail_the_request_then_serves(backend, reference, kind, at):
    text, _, tokens = reference
    assert tokens >= at  # the post model runs once per token: the at-th run is reached
    pipe, fb = load(backend, faulty.Fault(kind, at=at))
    try:
        gen = pipe.generate(PROMPT, images=[picture()],
                            config=GenerationConfig(max_new_tokens=TOKENS))
        with pytest.raises(BackendError, match="non-finite logits"):
            _ = gen.result
        assert fb.hits == 1
        assert len(gen.token_ids) == at - 1  # no token was drawn from the bad logits
        assert caption(pipe) == text
        # sampling too: NaN must not reach the sampler's weights
        pipe2, _ = load(backend, faulty.Fault(kind, at=1))
        try:
            gen = pipe2.generate(PROMPT, images=[picture()], config=GenerationConfig(
                max_new_tokens=TOKENS, temperature=0.8, top_p=0.9, seed=1))
            with pytest.raises(BackendError, match="non-finite logits"):
                _ = gen.result
        finally:
            pipe2.close()
    finally:
        pipe.close()


def test_pipeline_hang_is_slow_not_wrong_and_cancel_waits_for_the_run(backend, reference):
    """A run that blocks (then returns) delays the answer but does not change it; a cancel
    during the hang ends the generation before its next token."""
    text, _, _ = reference
    fault = faulty.Fault("hang", at=5, hang_s=0.5)
    pipe, fb = load(backend, fault)
    try:
        t0 = time.monotonic()
        assert caption(pipe) == text
        assert time.monotonic() - t0 >= 0.5 and fb.hits == 1
        fault2 = faulty.Fault("hang", at=fb.calls + 5, hang_s=30)
        fb.fault = fault2
        gen = pipe.generate(PROMPT, images=[picture()],
                            config=GenerationConfig(max_new_tokens=TOKENS))
        out = {}
        th = threading.Thread(target=lambda: out.update(r=gen.result), daemon=True)
        th.start()
        assert fb.hanging.wait(10)
        gen.cancel()
        fault2.release()
        th.join(10)
        assert out["r"].finish_reason == "cancelled"
        assert caption(pipe) == text
    finally:
        pipe.close()


def test_pipeline_load_failure_names_the_file_and_closes_what_it_opened(backend, reference):
    text, _, _ = reference
    name, model_dir = backend
    for at in (1, 3, 10**9):
        fault = faulty.Fault("load", at=at)
        with faulty.installed(fault) as handle:
            if at == 10**9:  # opens fine: fails only at load, runs are healthy
                pipe = Pipeline.from_model_dir(model_dir, backend=name)
                assert caption(pipe) == text
                pipe.close()
            else:
                with pytest.raises(BackendError, match="could not load .*injected load"):
                    Pipeline.from_model_dir(model_dir, backend=name)
        fb = handle.backends[0]
        assert not fb.open_sessions, "sessions opened before the failure were not closed"


# ---------------------------------------------------------------------------------------------
# the node's worker (no rclpy): one outcome per job, then the next job is served


class _Log:
    def __init__(self):
        self.lines = []

    def error(self, m):
        self.lines.append(m)

    debug = info = warning = error


class _Frame:
    """An ImageSource: the picture, already decoded (what a request's image gives the worker)."""

    def decode(self, max_dim: int) -> tuple:
        return picture(), None


def _worker(pipe):
    from internvl_ros.ros.worker import InferenceWorker

    return InferenceWorker(pipe, _Log())


def _job():
    from internvl_ros.ros.worker import Job, Request

    return Job(Request(prompt=PROMPT, system_prompt=None,
                       config=GenerationConfig(max_new_tokens=TOKENS), image=_Frame(),
                       source="service"))


def _serve(worker, timeout: float):
    """What the node's handler does: submit, wait up to the timeout, then cancel and fail."""
    from internvl_ros.ros.worker import Outcome

    job = _job()
    assert worker.submit(job, 2) is None
    if not job.wait(timeout):
        job.cancel.set()
        where = "generating" if job.started else "waiting in the queue"
        worker.withdraw(job)
        job.finish(Outcome.fail(f"timed out after {timeout:g} s ({where})"))
    assert job.wait(5)
    return job


@pytest.mark.parametrize("kind", ["raise", "nan", "inf"])
def test_worker_answers_a_faulty_step_once_then_serves(backend, reference, kind):
    text, runs, _ = reference
    fault = (faulty.Fault.random("raise", random.Random(7), runs) if kind == "raise"
             else faulty.Fault(kind, at=2))
    pipe, fb = load(backend, fault)
    worker = _worker(pipe)
    try:
        job = _serve(worker, 60)
        o = job.outcome
        assert not o.success and o.message, o
        assert ("injected fault" if kind == "raise" else "non-finite logits") in o.message
        assert not job.finish(o)  # first wins: exactly one outcome
        o2 = _serve(worker, 60).outcome
        assert o2.success and o2.text == text, o2
    finally:
        worker.stop()
        worker.join(10)
        pipe.close()


def test_worker_hang_longer_than_the_timeout_answers_at_the_timeout(backend, reference):
    """The job is answered at its timeout, and once the stuck run returns the worker serves
    the next job (the worker cannot interrupt a run: see the node-level test)."""
    text, _, _ = reference
    fault = faulty.Fault("hang", at=3, hang_s=2.0)
    pipe, fb = load(backend, fault)
    worker = _worker(pipe)
    try:
        t0 = time.monotonic()
        job = _serve(worker, 0.5)
        assert job.outcome.message == "timed out after 0.5 s (generating)"
        assert time.monotonic() - t0 < 2.0
        o2 = _serve(worker, 30).outcome  # queued behind the stuck run until it returns
        assert o2.success and o2.text == text, o2
    finally:
        fault.release()
        worker.stop()
        worker.join(10)
        pipe.close()


# ---------------------------------------------------------------------------------------------
# the node, in-process (its own rclpy context, no spinning): the real service handler


@pytest.fixture
def make_node(rclpy_context, backend):
    from rclpy.parameter import Parameter

    from internvl_ros.ros import node as node_mod
    from internvl_ros.ros.main import autostart

    made = []

    def make(pipeline=None, **params):
        name, model_dir = backend
        overrides = [Parameter("model_dir", value=str(model_dir)),
                     Parameter("backend", value=name),
                     Parameter("max_new_tokens", value=TOKENS)]
        overrides += [Parameter(k, value=v) for k, v in params.items()]
        loader = (lambda *a: pipeline) if pipeline is not None else None
        n = node_mod.InternVLNode(pipeline_loader=loader, context=rclpy_context,
                                  parameter_overrides=overrides)
        made.append(n)
        autostart(n)  # configure (loads the model) + activate, as main() does
        return n

    yield make
    for n in made:
        n.close(timeout=5)
        n.destroy_node()


def _describe(node):
    from sensor_msgs.msg import Image

    from internvl_ros_interfaces.srv import Describe

    rgb = picture()
    img = Image(height=rgb.shape[0], width=rgb.shape[1], encoding="rgb8", step=rgb.shape[1] * 3)
    img.data = array.array("B", rgb.tobytes())
    return node.describer._on_service(Describe.Request(prompt=PROMPT, image=img),
                                      Describe.Response())


@pytest.mark.parametrize("kind", ["raise", "nan", "inf"])
def test_node_answers_a_faulty_step_once_then_serves(make_node, backend, reference, kind):
    text, runs, _ = reference
    fault = (faulty.Fault.random("raise", random.Random(3), runs) if kind == "raise"
             else faulty.Fault(kind, at=1))
    pipe, fb = load(backend, fault)
    node = make_node(pipe)
    r = _describe(node)
    assert not r.success and ("injected fault" if kind == "raise" else "non-finite logits") \
        in r.message, r.message
    r2 = _describe(node)
    assert r2.success and r2.caption == text, r2.message
    stats = node.stats.snapshot()
    assert (stats["requests_failed"], stats["requests_served"]) == (1, 1)


def test_node_load_failure_is_a_model_load_error_naming_the_file(make_node, backend):
    from internvl_ros.ros import node as node_mod

    with faulty.installed(faulty.Fault("load", at=2)) as handle:
        with pytest.raises(node_mod.ModelLoadError, match="could not load .*injected") as e:
            make_node()  # the node's own loader (main() logs it FATAL and exits 1)
    assert backend[0] in str(e.value) or "model_dir" in str(e.value)
    assert not handle.backends[0].open_sessions


def _diagnostics(node) -> tuple[int, str, dict]:
    """(level, message, values) of the node's next /diagnostics status."""
    published = []
    original = node._diag_pub.publish
    node._diag_pub.publish = published.append
    try:
        node._publish_diagnostics()
    finally:
        node._diag_pub.publish = original
    (status,) = published[0].status
    return status.level, status.message, {kv.key: kv.value for kv in status.values}


def test_node_hang_is_answered_reported_and_recovered(make_node, backend, reference):
    from diagnostic_msgs.msg import DiagnosticStatus

    text, _, _ = reference
    fault = faulty.Fault("hang", at=4, hang_s=120.0)
    pipe, fb = load(backend, fault)
    node = make_node(pipe, request_timeout=1.0, stuck_after=0.5)
    try:
        t0 = time.monotonic()
        r = _describe(node)
        assert not r.success and r.message.startswith("timed out after 1 s (generating)")
        assert time.monotonic() - t0 < 3.0
        # /diagnostics says that the backend is stuck
        level, message, values = _diagnostics(node)
        assert level >= DiagnosticStatus.WARN and "stuck" in message.lower(), (message, values)
        # and the next request is served (the node recovered: e.g. pipeline reloaded), or is
        # refused at once saying that the node cannot recover (never a queue timeout)
        t1 = time.monotonic()
        r2 = _describe(node)
        if r2.success:
            assert r2.caption == text
        else:
            assert "stuck" in r2.message and time.monotonic() - t1 < 0.5, r2.message
            level, _, _ = _diagnostics(node)
            assert level == DiagnosticStatus.ERROR
        # once the hung step returns, the node serves again and is no longer reported stuck
        fault.release()
        deadline = time.monotonic() + 10
        while not node.worker.idle() and time.monotonic() < deadline:
            time.sleep(0.01)  # the cancelled job ends at the step after the hung one
        r3 = _describe(node)
        assert r3.success and r3.caption == text, r3.message
        level, message, values = _diagnostics(node)
        assert "stuck" not in message.lower() and values["state"] != "stuck", (message, values)
    finally:
        fault.release()
