"""internvl_node's handlers in-process, without spinning: a real InternVLNode (its own rclpy
context, nothing on the wire) with a scripted pipeline, so each behaviour is deterministic.

Action goals drop their images and end with feedback that matches the result, and no feedback
follows a result; a corrupt latest frame is reported as such; a refusal while stopping is not
"busy"; close() releases the model only once the worker has left it, and a second close() waits
for the first; lifecycle transitions; continuous mode captions the frame it chose, once;
diagnostics warn; the executor survives a subscription destroyed under it the way Humble's
executor fails; every private rclpy hook exists.
"""

from __future__ import annotations

import array
import threading
import time
from dataclasses import dataclass, field

import cv2
import numpy as np
import pytest
import rclpy
from rclpy.parameter import Parameter
from rclpy.serialization import serialize_message
from sensor_msgs.msg import CompressedImage, Image

from internvl_ros.core.errors import BackendError, ConfigError
from internvl_ros.core.pipeline import Timings
from internvl_ros.ros import compat
from internvl_ros.ros import node as node_mod
from internvl_ros_interfaces.action import Describe as DescribeAction
from internvl_ros_interfaces.srv import Describe

# ---------------------------------------------------------------------------------------------
# a scripted pipeline


@dataclass
class Step:
    text_delta: str


@dataclass
class Result:
    text: str
    token_ids: list
    prompt_token_ids: list = field(default_factory=lambda: [1, 2, 3])
    finish_reason: str = "length"
    timings: Timings = field(default_factory=lambda: Timings(vit_s=0.001, decode_s=0.001))
    choice_index: int = -1


class ScriptedGeneration:
    def __init__(self, deltas, step_s=0.0, fail_at=None):
        self.deltas, self._i, self._cancel = list(deltas), 0, False
        self.finished = False
        self.step_s, self.fail_at = step_s, fail_at

    def __iter__(self):
        return self

    def __next__(self):
        if self._cancel or self._i == len(self.deltas):
            self.finished = True
            raise StopIteration
        time.sleep(self.step_s)
        if self._i == self.fail_at:
            self.finished = True
            raise BackendError("decode (layer0.onnx, shape group 0) failed: RuntimeError: boom")
        self._i += 1
        return Step(self.deltas[self._i - 1])

    def cancel(self):
        self._cancel = True

    def close(self):
        self.finished = True

    @property
    def result(self):
        reason = "cancelled" if self._cancel else "length"
        return Result("".join(self.deltas[: self._i]), list(range(self._i)), finish_reason=reason)


class ScriptedPipeline:
    """generate() yields `deltas`; with `block` set it first waits on it (a long ViT pass)."""

    def __init__(self, deltas=("a", " b"), step_s=0.0, fail_at=None):
        self.deltas, self.step_s, self.fail_at = deltas, step_s, fail_at
        self.block: threading.Event | None = None
        self.inside = threading.Event()
        self.closed = False
        self.images = []
        self.frame_keys = []

    def generate(self, prompt, images=(), system_prompt=None, config=None, frame_key=None):
        self.images.append(images[0])
        self.frame_keys.append(frame_key)
        self.inside.set()
        if self.block is not None:
            self.block.wait(30)
        return ScriptedGeneration(self.deltas, self.step_s, self.fail_at)

    def close(self):
        self.closed = True

    def reset(self):
        self.resets = getattr(self, "resets", 0) + 1


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture
def make_node(own_context):
    made = []

    def make(pipeline=None, loader=None, start=True, **params):
        pipe = pipeline or ScriptedPipeline()
        overrides = [Parameter("model_dir", value="/scripted"), Parameter("max_new_tokens",
                                                                          value=16)]
        overrides += [Parameter(k, value=v) for k, v in params.items()]
        n = node_mod.InternVLNode(pipeline_loader=loader or (lambda *a: pipe),
                                  context=own_context, parameter_overrides=overrides)
        made.append((n, pipe))
        if start:
            assert n.trigger_configure() == node_mod.SUCCESS
            assert n.trigger_activate() == node_mod.SUCCESS
        return n, pipe

    yield make
    for n, pipe in made:
        if pipe.block is not None:
            pipe.block.set()
        n.close(timeout=5)
        n.destroy_node()


def put(node, msg) -> None:
    """A frame arriving on the image subscription (serialized, as rclpy hands it over)."""
    node.intake._on_image(serialize_message(msg))


def rgb_image(h=8, w=8) -> Image:
    msg = Image(height=h, width=w, encoding="rgb8", step=w * 3)
    msg.data = array.array("B", bytes((i * 7) % 256 for i in range(h * w * 3)))
    return msg


def png_bytes() -> bytes:
    ok, buf = cv2.imencode(".png", np.full((8, 8, 3), 77, np.uint8))
    return buf.tobytes()


def broken_jpeg() -> bytes:
    """A JPEG whose header is sound (passes intake) but whose scan is broken."""
    ok, buf = cv2.imencode(".jpg", np.full((16, 16, 3), 99, np.uint8))
    jpg = bytearray(buf.tobytes())
    jpg[jpg.index(b"\xff\xda") + 5] = 0x77
    return bytes(jpg)


class FakeGoalHandle:
    """What the action server hands the execute callback."""

    def __init__(self, goal):
        self.request = goal
        self.is_cancel_requested = False
        self.feedback = []
        self.events = []
        self.state = None

    def publish_feedback(self, fb):
        self.feedback.append(fb)
        self.events.append("feedback")

    def _end(self, state):
        self.state = state
        self.events.append(state)

    def succeed(self):
        self._end("succeeded")

    def abort(self):
        self._end("aborted")

    def canceled(self):
        self._end("canceled")


# ---------------------------------------------------------------------------------------------
# scenarios


def test_action_goal_drops_its_image_and_last_feedback_matches_the_result(make_node):
    """The last two tokens add no text: the final feedback still carries their count."""
    node, pipe = make_node(ScriptedPipeline(deltas=("a cat", "", "")))
    goal = DescribeAction.Goal(prompt="what?", image=rgb_image())
    gh = FakeGoalHandle(goal)
    result = node.describer._on_action(gh)
    assert gh.state == "succeeded" and result.success and result.caption == "a cat"
    assert result.timings.generated_tokens == 3
    last = gh.feedback[-1]
    assert (last.text, last.generated_tokens) == ("a cat", 3)
    assert "".join(f.delta for f in gh.feedback) == "a cat"
    assert pipe.images[0].shape == (8, 8, 3)  # the request image was described
    assert len(goal.image.data) == 0  # and then dropped: rclpy keeps the goal for a while
    assert compat.ACTION_RESULT_TIMEOUT_S <= 900


def test_action_goals_end_before_the_result_timeout_where_it_counts_from_acceptance(
        make_node, monkeypatch):
    """On Humble a goal must end before result_timeout (counted from its acceptance there):
    ACTION_MAX_S caps it below request_timeout (0 = forever here). Emulated with 0.3 s."""
    monkeypatch.setattr(compat, "ACTION_MAX_S", 0.3)
    node, pipe = make_node(request_timeout=0.0)
    pipe.block = threading.Event()  # the model never finishes on its own
    gh = FakeGoalHandle(DescribeAction.Goal(prompt="what?", image=rgb_image()))
    t0 = time.monotonic()
    result = node.describer._on_action(gh)
    assert time.monotonic() - t0 < 2
    assert gh.state == "aborted" and result.message.startswith("timed out after 0.3 s")
    assert "the most an action goal may take" in result.message
    pipe.block.set()


def test_corrupt_latest_frame_is_reported_as_corrupt_not_missing(make_node):
    node, pipe = make_node(image_transport="compressed")
    put(node, CompressedImage(format="jpeg", data=array.array("B", broken_jpeg())))
    assert node.frames.latest() is not None and node.frames.latest().kept_serialized
    first = node.describer.serve(Describe.Request(prompt="x"), "service")
    assert not first.success and "could not decode" in first.message
    assert "[corrupt]" in first.message
    second = node.describer.serve(Describe.Request(prompt="x"), "service")
    assert not second.success and "no frame received yet" not in second.message
    assert "latest frame" in second.message and "could not be decoded and was dropped" in \
        second.message
    put(node, CompressedImage(format="png", data=array.array("B", png_bytes())))
    ok = node.describer.serve(Describe.Request(prompt="x"), "service")
    assert ok.success and ok.text == "a b" and pipe.images[-1][0, 0].tolist() == [77, 77, 77]


def test_raw_intake_keeps_bytes_and_validates_them(make_node):
    node, pipe = make_node()
    msg = rgb_image(4, 6)
    msg.header.frame_id = "cam"
    put(node, msg)
    frame = node.frames.latest()
    assert frame.kept_serialized
    assert (frame.info.width, frame.info.height, frame.info.encoding) == (6, 4, "rgb8")
    short = rgb_image(4, 6)
    short.data = short.data[:-1]
    put(node, short)
    assert node.frames.latest() is frame and node.stats.snapshot()["dropped_by_kind"] == {"size": 1}
    out = node.describer.serve(Describe.Request(prompt="x", max_frame_age=-1.0), "service")
    assert out.success and out.header.frame_id == "cam"
    np.testing.assert_array_equal(
        pipe.images[-1], np.frombuffer(msg.data.tobytes(), np.uint8).reshape(4, 6, 3))


def test_a_refusal_while_stopping_is_not_counted_as_busy(make_node):
    node, _ = make_node()
    node.stop_serving()
    out = node.describer.serve(Describe.Request(prompt="x", image=rgb_image()), "service")
    assert not out.success and out.message == "the node is shutting down" and not out.refused
    snap = node.stats.snapshot()
    assert snap["requests_refused"] == 0 and snap["requests_failed"] == 1


def test_close_releases_the_model_only_after_the_worker_left_it(make_node):
    node, pipe = make_node()
    pipe.block = threading.Event()  # the model is "inside a long ViT pass"
    answers = []
    t = threading.Thread(target=lambda: answers.append(
        node.describer.serve(Describe.Request(prompt="x", image=rgb_image()), "service")))
    t.start()
    assert pipe.inside.wait(10)
    second = []
    t0 = time.monotonic()
    first = threading.Thread(target=lambda: second.append(("first", node.close(timeout=0.5))))
    first.start()
    while not node._release.started:  # the first close() is under way
        time.sleep(0.001)
    released = node.close(timeout=5)  # a second close waits for the first, bounded
    took = time.monotonic() - t0
    first.join()
    t.join(5)
    assert answers and answers[0].message == "the node is shutting down"  # answered at once
    assert second == [("first", False)] and released is False
    assert 0.4 < took < 3, took
    assert not pipe.closed  # not released under the running model
    pipe.block.set()
    assert node.worker.join(5)


def test_close_releases_the_model_when_the_worker_is_idle(make_node):
    node, pipe = make_node()
    assert node.close(timeout=2) is True and pipe.closed
    assert node.close(timeout=2) is True  # idempotent


def test_executor_skips_a_subscription_destroyed_before_its_take(own_context, monkeypatch):
    """Humble's executor takes without catching InvalidHandle (rclpy#1150 is not in Humble):
    emulate that in the base class, and NodeExecutor must still return "nothing to do"."""
    from rclpy.executors import MultiThreadedExecutor
    from std_msgs.msg import String

    def humble_take(self, sub):
        with sub.handle:  # raises InvalidHandle once the subscription is destroyed
            msg_info = sub.handle.take_message(sub.msg_type, sub.raw)
            return msg_info[0] if msg_info is not None else None

    monkeypatch.setattr(MultiThreadedExecutor, "_take_subscription", humble_take)
    n = rclpy.create_node("take_race", context=own_context)
    try:
        sub = n.create_subscription(String, "take_race", lambda m: None, 1)
        n.destroy_subscription(sub)
        executor = compat.NodeExecutor(num_threads=2, context=own_context)
        with pytest.raises(compat.InvalidHandle):
            humble_take(executor, sub)
        assert executor._take_subscription(sub) is None
        executor.shutdown()
    finally:
        n.destroy_node()


# ---------------------------------------------------------------------------------------------
# lifecycle


def test_configure_failure_keeps_the_node_unconfigured_and_alive(make_node):
    attempts = []

    def loader(*args):
        attempts.append(args)
        if len(attempts) == 1:
            raise node_mod.ModelLoadError("cannot load the model from model_dir '/x': no file")
        return ScriptedPipeline()

    node, _ = make_node(loader=loader, start=False)
    out = node.describer.serve(Describe.Request(prompt="x", image=rgb_image()), "service")
    assert not out.success and "inactive" in out.message and "unconfigured" in out.message
    assert node.trigger_configure() == node_mod.FAILURE
    assert node.lifecycle_state == "unconfigured" and "no file" in node.load_error
    assert node.worker is None
    assert node.trigger_configure() == node_mod.SUCCESS  # the node stayed alive: try again
    out = node.describer.serve(Describe.Request(prompt="x", image=rgb_image()), "service")
    assert not out.success and "inactive" in out.message  # configured, not yet active
    assert node.trigger_activate() == node_mod.SUCCESS
    out = node.describer.serve(Describe.Request(prompt="x", image=rgb_image()), "service")
    assert out.success and out.text == "a b"


def test_deactivate_answers_running_requests_then_refuses_and_cleanup_releases(make_node):
    node, pipe = make_node()
    pipe.block = threading.Event()
    answers = []
    t = threading.Thread(target=lambda: answers.append(node.describer.serve(
        Describe.Request(prompt="x", image=rgb_image()), "service")))
    t.start()
    assert pipe.inside.wait(10)
    assert node.trigger_deactivate() == node_mod.SUCCESS
    out = node.describer.serve(Describe.Request(prompt="x", image=rgb_image()), "service")
    assert not out.success and "inactive" in out.message
    pipe.block.set()
    t.join(10)
    assert answers and answers[0].success and answers[0].text == "a b"  # the running one
    assert node.trigger_cleanup() == node_mod.SUCCESS
    assert pipe.closed and node.pipeline is None and node.lifecycle_state == "unconfigured"
    assert node.trigger_configure() == node_mod.SUCCESS  # and it can load again
    assert node.trigger_activate() == node_mod.SUCCESS


def test_shutdown_transition_answers_everything_pending(make_node):
    node, pipe = make_node()
    pipe.block = threading.Event()
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(node.describer.serve(
        Describe.Request(prompt="x", image=rgb_image()), "service"))) for _ in range(2)]
    for t in threads:
        t.start()
    assert pipe.inside.wait(10)
    while node.worker.state()[1] < 1:  # one running, one queued
        time.sleep(0.005)
    done = threading.Thread(target=node.trigger_shutdown)
    done.start()
    for t in threads:
        t.join(5)
    assert [a.message for a in answers] == ["the node is shutting down"] * 2
    pipe.block.set()
    done.join(10)
    assert node.lifecycle_state == "finalized" and pipe.closed


# ---------------------------------------------------------------------------------------------
# continuous mode, feedback, backend failures, diagnostics


def test_continuous_mode_captions_the_frame_it_chose_once(make_node):
    import gc
    import weakref

    node, pipe = make_node(caption_rate_hz=10.0, max_frame_age=0.0)
    published = []
    node._stamped_pub.publish = lambda m: published.append(m.header.frame_id)
    a, b = rgb_image(), rgb_image()
    a.header.frame_id, b.header.frame_id = "A", "B"
    put(node, a)
    node._continuous_tick()  # chooses A
    put(node, b)  # B arrives before the worker got to A
    second = weakref.ref(node.frames.latest())
    deadline = time.monotonic() + 10
    while len(published) < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    while not node.worker.idle():
        time.sleep(0.005)
    for _ in range(3):  # B once, however often the timer fires
        node._last_continuous_t = 0.0
        node._continuous_tick()
        while not node.worker.idle():
            time.sleep(0.005)
    assert published == ["A", "B"]
    put(node, rgb_image())  # C replaces B as the latest frame
    gc.collect()
    assert second() is None  # nothing keeps the captioned frame alive to compare identities


def test_no_feedback_after_the_result_of_an_aborted_goal(make_node):
    node, pipe = make_node(ScriptedPipeline(deltas=("a",) * 40, step_s=0.05),
                           request_timeout=0.3)
    gh = FakeGoalHandle(DescribeAction.Goal(prompt="what?", image=rgb_image()))
    result = node.describer._on_action(gh)
    assert gh.state == "aborted" and result.message.startswith("timed out")
    time.sleep(0.3)  # the worker reaches its next tokens
    assert gh.events[-1] == "aborted", gh.events  # nothing after the result


def test_backend_failure_in_an_action_is_logged_with_its_traceback_and_resets(make_node):
    node, pipe = make_node(ScriptedPipeline(deltas=("a", "b", "c"), fail_at=1))
    lines = []

    class Log:
        def error(self, msg):
            lines.append(msg)

        def __getattr__(self, name):
            return lambda *a, **k: None

    node.worker._log = Log()
    gh = FakeGoalHandle(DescribeAction.Goal(prompt="what?", image=rgb_image()))
    result = node.describer._on_action(gh)
    assert gh.state == "aborted" and not result.success
    assert result.message == ("backend error: decode (layer0.onnx, shape group 0) failed: "
                              "RuntimeError: boom")
    assert lines and "Traceback" in lines[0] and "boom" in lines[0]
    assert pipe.resets == 1


def test_diagnostics_warn_on_dropped_frames_and_failed_requests(make_node):
    from diagnostic_msgs.msg import DiagnosticStatus

    node, _ = make_node()
    sent = []
    node._diag_pub.publish = lambda arr: sent.append(arr.status[0])
    node._publish_diagnostics()
    assert sent[-1].level == DiagnosticStatus.OK
    short = rgb_image()
    short.data = short.data[:-1]
    put(node, short)
    node._publish_diagnostics()
    assert sent[-1].level == DiagnosticStatus.WARN and "dropped" in sent[-1].message
    node._publish_diagnostics()
    assert sent[-1].level == DiagnosticStatus.OK  # nothing new in this period
    out = node.describer.serve(Describe.Request(prompt="x"), "service")  # no frame yet
    assert not out.success
    node._publish_diagnostics()
    assert sent[-1].level == DiagnosticStatus.WARN and "failed" in sent[-1].message


# ---------------------------------------------------------------------------------------------
# the private rclpy hooks


def test_single_camera_node_refuses_a_camera_name_and_a_blank_locate(make_node):
    node, pipe = make_node()
    put(node, rgb_image())
    out = node.describer.serve(Describe.Request(prompt="x", camera="front"), "service")
    assert not out.success
    assert out.message == ("unknown camera 'front'; this node has one camera (parameter cameras "
                           "is empty): leave camera empty")
    out = node.describer.serve(Describe.Request(locate="   "), "service")
    assert not out.success and out.message.startswith("locate: the phrase is empty")
    assert pipe.images == []  # neither was queued
    out = node.describer.serve(Describe.Request(prompt="x"), "service")
    assert out.success and out.camera == ""


def test_markup_in_a_text_answer_becomes_detections_in_request_image_pixels(make_node):
    """A pipeline without a tokenizer: the text itself is parsed (8x8 request image)."""
    node, pipe = make_node(ScriptedPipeline(
        deltas=("a <ref>cup</ref>", "<box>[[0, 0, 500, 1000]]</box>", " <box>[[1, 2]]</box>")))
    resp = node.describer._on_service(Describe.Request(prompt="x", image=rgb_image()),
                                      Describe.Response())
    assert resp.success and resp.caption == "a cup"
    assert [(d.label, d.x_min, d.y_min, d.x_max, d.y_max) for d in resp.detections] == [
        ("cup", 0.0, 0.0, 4.0, 8.0)]
    assert node.stats.snapshot()["grounding_malformed"] == 1


def test_annotated_image_topics_single_and_named_cameras(make_node):
    single, _ = make_node(publish_annotated=True)
    assert {c: p.topic_name for c, p in single.outputs._pubs.items()} == {
        "": "/internvl/annotated_image"}
    named, _ = make_node(publish_annotated=True, cameras=["front", "rear"])
    assert {c: p.topic_name for c, p in named.outputs._pubs.items()} == {
        "front": "/internvl/front/annotated_image", "rear": "/internvl/rear/annotated_image"}
    off, _ = make_node()
    assert off.outputs._pubs == {}


def test_named_cameras_read_name_image_compressed_and_follow_their_remaps(own_context, make_node):
    node, _ = make_node(cameras=["front", "rear"], image_transport="compressed", start=False)
    assert {n: s.topic for n, s in node.cameras.stores.items()} == {
        "front": "/front/image/compressed", "rear": "/rear/image/compressed"}
    remapped = node_mod.InternVLNode(
        pipeline_loader=lambda *a: None, context=own_context,
        parameter_overrides=[Parameter("cameras", value=["front"]),
                             Parameter("image_transport", value="compressed")],
        cli_args=["--ros-args", "-r", "front/image:=/cam/f"])
    try:
        assert remapped.cameras.stores["front"].topic == "/cam/f/compressed"
        assert remapped.cameras.stores["front"].msg_type is CompressedImage
    finally:
        remapped.destroy_node()


@pytest.mark.parametrize("names, why", [(["front", "front"], "distinct"),
                                        (["front/left"], "not a valid name"),
                                        ([""], "not a valid name"),
                                        ([1, 2], "not a valid name")])
def test_bad_camera_names_fail_at_start_up(own_context, names, why):
    with pytest.raises(ConfigError, match=why):
        node_mod.InternVLNode(pipeline_loader=lambda *a: None, context=own_context,
                              parameter_overrides=[Parameter("cameras", value=names)])


def test_counting_service_counts_a_request_until_its_response_is_sent(own_context):
    """compat.create_counting_service: a request counts in `pending` from the start of its
    callback until the executor has sent the response; one whose callback raises (nothing is
    sent) stops counting at once. Shutdown waits on this count."""
    from rclpy.executors import SingleThreadedExecutor

    pending = compat.Pending()
    seen = []

    def callback(req, resp):
        seen.append(pending.count)
        if req.prompt == "boom":
            raise RuntimeError("boom")
        resp.success = True
        return resp

    n = rclpy.create_node("counting_service", context=own_context)
    executor = SingleThreadedExecutor(context=own_context)
    try:
        srv = compat.create_counting_service(n, Describe, "~/counted", callback, pending)
        cli = n.create_client(Describe, "~/counted")
        executor.add_node(n)
        assert cli.wait_for_service(timeout_sec=10)
        fut = cli.call_async(Describe.Request(prompt="x"))
        executor.spin_until_future_complete(fut, timeout_sec=30)
        assert fut.done() and fut.result().success
        assert seen == [1] and pending.count == 0
        with pytest.raises(RuntimeError, match="boom"):
            srv.callback(Describe.Request(prompt="boom"), Describe.Response())
        assert seen == [1, 1] and pending.count == 0
    finally:
        executor.shutdown(timeout_sec=2.0)
        n.destroy_node()


def test_every_private_rclpy_hook_exists_on_this_rclpy():
    """Fails when an rclpy update renames a private hook compat.py relies on."""
    assert compat.missing_hooks() == []


def test_a_missing_hook_is_detected_and_warned_once(monkeypatch):
    from rclpy.action import ActionServer

    monkeypatch.delattr(ActionServer, "_send_result_response")
    warnings = []

    class Log:
        def warning(self, msg):
            warnings.append(msg)

    missing = compat.check(Log())
    assert [h.name for h in missing] == ["_send_result_response"]
    assert len(warnings) == 1 and "action results" in warnings[0]
    fake = compat.Hook(ActionServer, "_no_such_attribute", "x", instance=True)
    assert not fake.present
