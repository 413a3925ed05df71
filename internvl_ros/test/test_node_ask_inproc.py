"""``~/ask`` and the model parameters in-process: a real InternVLNode (own rclpy context, nothing
on the wire) on the real tiny pipeline, slowed down where a test needs a long generation.

A timeout or the shutdown stops a running Ask before its next token (the worker is free at
once, nothing is published); kv_feed and device_id reach the pipeline (through the axengine
double) and the mode shows in the node's diagnostics values.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from rclpy.parameter import Parameter
from sensor_msgs.msg import Image

from internvl_ros.backends import fake_axengine
from internvl_ros.core import Pipeline
from internvl_ros.export.testing import tiny_model_dirs
from internvl_ros.ros import node as node_mod
from internvl_ros_interfaces.msg import Question
from internvl_ros_interfaces.srv import Ask


class SlowSession:
    """A session whose every run takes at least `delay` seconds more."""

    def __init__(self, inner, delay: float):
        self.inner, self.delay, self.runs = inner, delay, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run(self, *args, **kwargs):
        self.runs += 1
        time.sleep(self.delay)
        return self.inner.run(*args, **kwargs)


@pytest.fixture
def make_node(own_context):
    made = []

    def make(loader=None, start=True, **params):
        overrides = [Parameter(k, value=v) for k, v in params.items()]
        n = node_mod.InternVLNode(pipeline_loader=loader, context=own_context,
                                  parameter_overrides=overrides)
        made.append(n)
        if start:
            assert n.trigger_configure() == node_mod.SUCCESS, n.load_error
            assert n.trigger_activate() == node_mod.SUCCESS
        return n

    yield make
    for n in made:
        n.close()
        n.destroy_node()


def rgb_image() -> Image:
    rgb = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    msg = Image(height=48, width=64, encoding="rgb8", step=64 * 3)
    msg.data = rgb.tobytes()
    return msg


def slow_tiny_pipeline():
    pipe = Pipeline.from_model_dir(tiny_model_dirs("a")[1], num_threads=1)
    pipe.llm.post = SlowSession(pipe.llm.post, 0.02)  # one post run per token
    return pipe


def long_ask() -> Ask.Request:
    return Ask.Request(questions=[Question(prompt="Describe it.", max_new_tokens=500)] * 3,
                       image=rgb_image())


def serve_ask(node, req):
    """What the ~/ask handler does, without the wire."""
    return node.describer.serve(req, "ask", build=node.asker.build,
                                on_caption=node.asker.publish)


def published(node) -> list:
    out = []
    node.asker._on_caption = lambda job, outcome: out.append((job.request.prompt, outcome.text))
    return out


def test_a_timeout_stops_the_running_ask_at_once_and_publishes_nothing(make_node):
    pipe = slow_tiny_pipeline()
    node = make_node(loader=lambda *a: pipe, model_dir="/tiny", request_timeout=0.5,
                     max_new_tokens=16)
    captions = published(node)
    t0 = time.monotonic()
    out = serve_ask(node, long_ask())
    assert not out.success and "timed out after 0.5 s (generating)" in out.message
    assert time.monotonic() - t0 < 2.0
    # the cancel reaches the question running inside the core: the worker is free at once,
    # not after 3 x 500 tokens
    deadline = time.monotonic() + 1.0
    while not node.worker.idle():
        assert time.monotonic() < deadline, "the Ask kept running after its timeout"
        time.sleep(0.01)
    assert pipe.llm.post.runs < 100 and not pipe.busy
    assert captions == []
    # and the next request is served
    node.set_parameters([Parameter("request_timeout", value=30.0)])
    ok = serve_ask(node, Ask.Request(questions=[Question(prompt="a"), Question(prompt="b")],
                                     image=rgb_image()))
    assert ok.success and [a.success for a in ok.answers] == [True, True]
    assert [p for p, _ in captions] == ["a", "b"]
    assert [t for _, t in captions] == [a.text for a in ok.answers]


def test_stopping_answers_a_running_ask_once(make_node):
    pipe = slow_tiny_pipeline()
    node = make_node(loader=lambda *a: pipe, model_dir="/tiny")
    captions = published(node)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("out", serve_ask(node, long_ask())))
    t.start()
    deadline = time.monotonic() + 10
    while pipe.llm.post.runs < 3:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    node.stop_serving()
    t.join(3.0)
    assert not t.is_alive()
    assert result["out"].message == "the node is shutting down" and not result["out"].success
    assert node.worker.join(1.0)  # left the model at the next token
    assert captions == []


def test_kv_feed_and_device_id_reach_the_pipeline_and_diagnostics(make_node, tmp_path, capfd):
    axera = tmp_path / "axera"
    fake_axengine.make_fake_axera_dir(tiny_model_dirs("a")[1], axera)
    with fake_axengine.installed(devices=2):
        node = make_node(model_dir=str(axera), backend="axengine", kv_feed="rows", device_id=1,
                         frame_cache_mb=1)
        status = node.pipeline.kv_feed
        assert status.mode == "rows" and status.requested == "rows"
        assert node.pipeline.frames.max_bytes == 1 << 20
        assert node.pipeline.frames.max_frames == node_mod.CACHED_FRAMES_PER_CAMERA  # 1 camera
        info = node_mod.pipeline_info(node.pipeline)
        assert info["kv_feed"] == "rows" and info["kv_feed_reason"] == status.reason
        assert f"kv_feed: rows ({status.reason})" in capfd.readouterr().err
        out = serve_ask(node, Ask.Request(questions=[Question(prompt="a")], image=rgb_image()))
        assert out.success and out.answers[0].success, out.message
        full = make_node(model_dir=str(axera), backend="axengine", kv_feed="full")
        assert node_mod.pipeline_info(full.pipeline)["kv_feed"] == "full"
    with fake_axengine.installed(devices=1):  # card 1 does not exist: the id reached pyaxengine
        bad = make_node(model_dir=str(axera), backend="axengine", device_id=1, start=False)
        assert bad.trigger_configure() == node_mod.FAILURE
        assert "Device index 1 is out of range" in bad.load_error, bad.load_error


def test_frame_cache_holds_the_latest_frames_of_each_camera(make_node):
    """The frame cache is bounded by cameras, not only by frame_cache_mb: a request can only
    take a camera's newest frame, so older frames are never kept (issue 16's soak: the tiny
    model's small embeddings filled 64 MiB with a thousand unreachable frames)."""
    node = make_node(model_dir=str(tiny_model_dirs("a")[1]), cameras=["front", "rear", "top"])
    cache = node.pipeline.frames
    assert cache.max_frames == 3 * node_mod.CACHED_FRAMES_PER_CAMERA
    assert cache.max_bytes == 64 << 20
    assert node_mod.pipeline_info(node.pipeline)["frame_cache_frames"] == 0
