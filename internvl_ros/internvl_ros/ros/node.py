"""The ``internvl`` node: camera in, Describe service and streaming action, captions out.

Run: ``internvl_node --ros-args --params-file config/internvl.yaml`` (docs/NODE.md has the rest).

Threads: a MultiThreadedExecutor runs image intake (and the QoS/graph check) in one mutually
exclusive callback group, and the service/action handlers in a reentrant group. Handlers never
run the model: they queue a ``Job`` for the single ``InferenceWorker`` thread that owns the
pipeline, and wait for it, so frames keep arriving during a generation. The main thread spins
and owns shutdown (see ``main``).
"""

from __future__ import annotations

import array
import inspect
import math
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import rclpy
import rclpy.logging
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from rclpy.qos import ReliabilityPolicy
from rclpy.serialization import deserialize_message
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header, String

from internvl_ros.core.errors import ConfigError, InternVLError
from internvl_ros.ros import cdr, image_conv, params, qos
from internvl_ros.ros.diagnostics import Stats, Throttle, build_array, build_status
from internvl_ros.ros.worker import (
    CONTINUOUS,
    SHUTTING_DOWN,
    InferenceWorker,
    Job,
    Outcome,
    Request,
    RequestError,
)
from internvl_ros_interfaces.action import Describe as DescribeAction
from internvl_ros_interfaces.msg import Caption, Timings
from internvl_ros_interfaces.srv import Describe as DescribeSrv

try:
    from rclpy.exceptions import InvalidHandle
except ImportError:  # older rclpy: only the C extension names it
    from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy

    InvalidHandle = _rclpy.InvalidHandle

NODE_NAME = "internvl"
WAIT_SLICE_S = 0.05  # how often a waiting handler looks at cancel requests and its deadline
WARN_PERIOD_S = 5.0  # bad-frame warnings: at most one per kind per period
FEEDBACK_PERIOD_S = 0.02  # action feedback: at most 50 messages a second
CLAIM_WAIT_S = 5.0  # a handler whose job the worker claimed waits this long for the caption

# Shutdown (SIGINT/SIGTERM): all within ros2 launch's 5 s between SIGINT and SIGTERM.
SPIN_SLICE_S = 0.1  # the main thread's spin_once timeout: how fast it notices the stop
ANSWER_WAIT_S = 1.5  # for the answers (service responses, action results) to go out
EXECUTOR_SHUTDOWN_S = 0.5  # for callbacks still running to end (the answers are out by then)
STOP_BUDGET_S = 4.5  # first signal to exit; the worker's join gets what is left of it
MIN_WORKER_JOIN_S = 0.5

# How long the action server keeps a finished goal (its request and result) for a late client.
RESULT_KEEP_S = 30


def _rclpy_default_result_timeout() -> float:
    try:
        p = inspect.signature(ActionServer.__init__).parameters["result_timeout"]
        return float(p.default)
    except (KeyError, TypeError, ValueError):
        return 10.0


# rclpy's own default tells the distribution apart: 900 s on Humble, 10 s from Jazzy on
# (rclpy#1171), where rcl also counts result_timeout from the goal's *end* (rcl#1121). Humble's
# rcl counts it from the goal's *acceptance*: a goal that outlives it is expired as it finishes,
# which can lose its result or raise inside rclpy. There we keep 900 s and end an action goal
# before it (``ACTION_MAX_S``); the request images are dropped after every goal either way.
RESULT_TIMEOUT_FROM_ACCEPTANCE = _rclpy_default_result_timeout() >= 900
ACTION_RESULT_TIMEOUT_S = 900 if RESULT_TIMEOUT_FROM_ACCEPTANCE else RESULT_KEEP_S
ACTION_MAX_S = ACTION_RESULT_TIMEOUT_S - RESULT_KEEP_S if RESULT_TIMEOUT_FROM_ACCEPTANCE else None


class ModelLoadError(Exception):
    """The model could not be loaded; the message names the file and what to do."""


@dataclass
class Frame:
    """The latest frame as it arrived: serialized, deserialized and converted only when a
    request needs it. ``error`` marks a frame that failed to decode (its data is dropped)."""

    raw: bytes | None  # the serialized message (CDR)
    msg: object | None  # or the message itself (when the CDR fast path did not apply)
    info: image_conv.FrameInfo
    arrival: float  # time.monotonic() at receipt
    error: str | None = None


class NodeExecutor(MultiThreadedExecutor):
    """A MultiThreadedExecutor that skips a subscription destroyed after it was found ready.

    The node re-subscribes (auto QoS) while spinning. Humble's executor then races: a take
    scheduled for the old subscription can run after it was destroyed, and raises InvalidHandle
    before the callback group is released, so the exception ends spin() and the group stays
    locked. rclpy#1150 fixed it from Jazzy on (catching it there); the Humble backport (#1610) is
    open. Same signature on both: Humble returns the message, newer rclpy a coroutine; None means
    "nothing to do" to both.
    """

    def _take_subscription(self, sub):
        try:
            return super()._take_subscription(sub)
        except InvalidHandle:
            return None

    def wait_for_ready_callbacks(self, *args, **kwargs):
        """Jazzy (rclpy 7.1.6): building the wait set, a destroyed subscription's QoS event
        handler (a waitable collected just before) raises InvalidHandle in add_to_wait_set, out of
        spin_once, which ended the node. Nothing was started then: wait again on a new wait set."""
        while True:
            try:
                return super().wait_for_ready_callbacks(*args, **kwargs)
            except InvalidHandle:
                continue  # the failed generator is done; the next call builds a new one

    def collect_late_errors(self) -> list:
        """After shutdown: fetch the errors of callbacks that ended after the last spin_once.

        Kilted's shutdown destroys its guard condition without waiting for running callbacks
        (it ignores timeout_sec), and a callback that triggers the guard afterwards fails with
        InvalidHandle. Harmless, but rclpy prints every error nobody fetched when it is garbage
        collected ("The following exception was never retrieved"); fetch them instead.
        """
        errors = []
        for f in list(getattr(self, "_futures", ())):
            if f.done() and f.exception() is not None:
                errors.append(f.exception())
        return errors


class Answers:
    """Counts answers not yet sent, so shutdown can wait until they are out.

    A service request counts until its response was sent; an action goal while its execute
    callback runs, and its result from the client's result request until rclpy sent it.
    """

    def __init__(self):
        self._n = 0
        self._cond = threading.Condition()

    def add(self) -> None:
        with self._cond:
            self._n += 1

    def done(self) -> None:
        with self._cond:
            self._n = max(0, self._n - 1)
            self._cond.notify_all()

    @contextmanager
    def pending(self):
        self.add()
        try:
            yield
        finally:
            self.done()

    def wait_idle(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._n == 0, timeout)

    @property
    def count(self) -> int:
        with self._cond:
            return self._n


class DescribeActionServer(ActionServer):
    """ActionServer that reports result responses it still has to send to ``answers``.

    rclpy sends a result from a task the executor runs *after* the goal's execute callback
    returned; shutdown must keep spinning until then. The two hooks are private methods with
    the same signature on Humble and newer rclpy; if a future rclpy renames them, nothing is
    counted and shutdown just does not wait for results.
    """

    def __init__(self, *args, answers: Answers, **kwargs):
        self._answers = answers
        super().__init__(*args, **kwargs)

    async def _execute_get_result_request(self, request_header_and_message):
        goal_uuid = bytes(request_header_and_message[1].goal_id.uuid)
        counted = goal_uuid in getattr(self, "_goal_handles", {})  # else answered at once
        if counted:
            self._answers.add()
        try:
            await super()._execute_get_result_request(request_header_and_message)
        except BaseException:
            if counted:
                self._answers.done()
            raise

    def _send_result_response(self, request_header, future):
        try:
            super()._send_result_response(request_header, future)
        finally:
            self._answers.done()


def load_pipeline(model_dir: str, backend: str, provider: str, num_threads: int, max_tiles: int):
    """Pipeline.from_model_dir, with errors turned into one actionable ModelLoadError."""
    if not model_dir:
        raise ModelLoadError(
            "parameter model_dir is empty: set it to the model directory (docs/MODEL_DIR.md), "
            "e.g. --ros-args -p model_dir:=/path/to/model"
        )
    try:
        from internvl_ros.core import Pipeline

        return Pipeline.from_model_dir(
            model_dir,
            backend=backend,
            provider=provider or None,
            num_threads=num_threads or None,
            max_tiles=max_tiles,
        )
    except InternVLError as e:  # the core's messages name the file and the fix
        raise ModelLoadError(f"cannot load the model from model_dir '{model_dir}': {e}") from e
    except (OSError, ImportError, RuntimeError, ValueError) as e:
        raise ModelLoadError(
            f"cannot load the model from model_dir '{model_dir}' with backend '{backend}': "
            f"{type(e).__name__}: {e}"
        ) from e


class InternVLNode(Node):
    """See the module docstring and docs/NODE.md."""

    def __init__(self, pipeline_loader=None, **node_kwargs):
        super().__init__(NODE_NAME, **node_kwargs)
        log = self.get_logger()
        params.declare_all(self)
        problems = params.check_values({n: self._p(n) for n in params.PARAM_NAMES})
        if problems:
            raise ConfigError("invalid parameters: " + "; ".join(problems))
        self.add_on_set_parameters_callback(self._on_set_parameters)

        self.stats = Stats()
        self._warn = Throttle(WARN_PERIOD_S)
        self._frame_lock = threading.Lock()
        self._latest: Frame | None = None
        self._last_continuous_frame: Frame | None = None
        self._last_continuous_t = 0.0
        self._answers = Answers()
        self._close_lock = threading.Lock()
        self._closed = False  # no new requests; every pending one answered
        self._closing = False  # close() under way (the worker's join, the sessions' release)
        self._close_done = threading.Event()
        self._released = False

        # --- the model (fatal on failure: main() logs it and exits non-zero)
        self._backend = self._p("backend")
        self._model_dir = self._p("model_dir")
        converters = image_conv.available_converters()  # imports them now, not at a request
        t0 = time.monotonic()
        self.pipeline = (pipeline_loader or load_pipeline)(
            self._model_dir,
            self._backend,
            self._p("provider"),
            self._p("num_threads"),
            self._p("max_tiles"),
        )
        log.info(f"model loaded from {self._model_dir} ({self._backend}) in "
                 f"{time.monotonic() - t0:.1f} s; raw images convert with {converters[0]}")
        self.worker = InferenceWorker(
            self.pipeline,
            prepare=self._prepare,
            make_config=self._make_config,
            on_caption=self._on_caption,
            logger=log,
            max_queue_fn=lambda: self._p("max_queue"),
        )

        # --- callback groups: intake never waits behind inference
        self._image_group = MutuallyExclusiveCallbackGroup()
        self._request_group = ReentrantCallbackGroup()
        self._timer_group = MutuallyExclusiveCallbackGroup()

        # --- outputs
        self._caption_pub = self.create_publisher(String, "~/caption", 10)
        self._stamped_pub = self.create_publisher(Caption, "~/caption_stamped", 10)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)

        # --- image intake
        self._transport = self._p("image_transport")
        self._msg_type = CompressedImage if self._transport == "compressed" else Image
        self._topic = self._image_topic_name()
        self._sub = None
        self._sub_reliability: ReliabilityPolicy | None = None
        self._pub_key: tuple | None = None
        self._starve_pubs: tuple = ()
        self._pubs_seen_since = 0.0
        self._no_frame_warned = False
        self._mixed_warning: str | None = None
        self._last_msg_t: float | None = None
        self._parse = cdr.parse_compressed if self._transport == "compressed" else cdr.parse_image
        self._check_publishers()  # subscribes
        self.create_timer(1.0, self._check_publishers, callback_group=self._image_group)

        # --- requests
        self._service = self.create_service(DescribeSrv, "~/describe", self._on_describe_srv,
                                            callback_group=self._request_group)
        self._service.send_response = self._counted_send(self._service.send_response)
        self._action = DescribeActionServer(
            self,
            DescribeAction,
            "~/describe",
            execute_callback=self._on_describe_action,
            goal_callback=lambda goal: GoalResponse.ACCEPT,
            cancel_callback=lambda goal_handle: CancelResponse.ACCEPT,
            callback_group=self._request_group,
            result_timeout=ACTION_RESULT_TIMEOUT_S,
            answers=self._answers,
        )
        self.create_timer(1.0, self._publish_diagnostics, callback_group=self._timer_group)
        self.create_timer(0.1, self._continuous_tick, callback_group=self._timer_group)
        log.info(
            f"ready: {self._transport} images on {self._topic}; service and action "
            f"{self._resolve('~/describe')}; captions on {self._resolve('~/caption')}"
        )

    def _p(self, name: str):
        return self.get_parameter(name).value

    # ------------------------------------------------------------------------------------------
    # parameters

    def _on_set_parameters(self, changes):
        from rcl_interfaces.msg import SetParametersResult

        problems = params.check_values({c.name: c.value for c in changes})
        return SetParametersResult(successful=not problems, reason="; ".join(problems))

    # ------------------------------------------------------------------------------------------
    # image intake

    def _image_topic_name(self) -> str:
        """Resolved topic; 'image/compressed' follows a remap of 'image' like image_transport."""
        if self._transport == "raw":
            return self._resolve("image")
        remapped = self._resolve("image/compressed")
        if remapped != self._resolve("image/compressed", only_expand=True):
            return remapped  # image/compressed itself was remapped
        return self._resolve("image").rstrip("/") + "/compressed"

    def _resolve(self, name: str, only_expand: bool = False) -> str:
        """Node.resolve_topic_name (expansion + remapping), or plain expansion without it."""
        resolve = getattr(self, "resolve_topic_name", None)
        if resolve is not None:
            return resolve(name, only_expand=only_expand)
        from rclpy.expand_topic_name import expand_topic_name

        return expand_topic_name(name, self.get_name(), self.get_namespace())

    def _subscribe(self, reliability: ReliabilityPolicy, why: str) -> None:
        if self._sub is not None:
            self.destroy_subscription(self._sub)
        profile = qos.image_qos(reliability, int(self._p("qos_depth")))
        # raw: the callback gets the serialized bytes; a frame is deserialized only if a request
        # describes it (a 1080p rgb8 frame is 6 MB, and at 30 Hz only the latest is used)
        self._sub = self.create_subscription(
            self._msg_type, self._topic, self._on_image, profile,
            callback_group=self._image_group, raw=True,
        )
        self._sub_reliability = reliability
        self.get_logger().info(
            f"subscribed to {self._topic} ({self._msg_type.__name__}, "
            f"{qos.reliability_name(reliability)}, depth {profile.depth}): {why}"
        )

    def _check_publishers(self) -> None:
        """Match the publishers' reliability (auto), and warn when they send us nothing."""
        try:
            infos = self.get_publishers_info_by_topic(self._topic)
        except Exception:  # the context is going down
            return
        mode = self._p("qos_reliability")
        if mode != "auto":
            if self._sub is None:
                self._subscribe(ReliabilityPolicy[mode.upper()], f"qos_reliability is {mode}")
        else:
            key = tuple(sorted(int(i.qos_profile.reliability) for i in infos))
            if key != self._pub_key or self._sub is None:
                self._pub_key = key
                want, why = qos.choose_reliability(key)
                if want != self._sub_reliability:
                    self._subscribe(want, f"auto: {why}")
                self._mixed_warning = qos.mixed_reliability_warning(infos)
                if self._mixed_warning:
                    self.get_logger().warning(f"{self._topic}: {self._mixed_warning}")
        self._warn_if_starved(infos)

    def _warn_if_starved(self, infos) -> None:
        """Publishers present for a while, but nothing arrives: name their QoS, point to docs.

        Warns once per episode; a frame arriving, or a change of publishers, starts a new one.
        """
        limit = float(self._p("no_frame_warn_after"))
        now = time.monotonic()
        pubs = tuple(sorted((i.node_namespace, i.node_name, int(i.qos_profile.reliability))
                            for i in infos))
        if pubs != self._starve_pubs:
            self._starve_pubs, self._pubs_seen_since, self._no_frame_warned = pubs, now, False
        if not pubs:
            return
        last = self._last_msg_t
        if last is not None and now - last < max(limit, 1.0):
            self._no_frame_warned = False
            return
        since = max(self._pubs_seen_since, last or 0.0)
        if limit > 0 and now - since > limit and not self._no_frame_warned:
            self._no_frame_warned = True
            self.get_logger().warning(
                f"{len(infos)} publisher(s) on {self._topic} but no frame received for "
                f"{now - since:.1f} s. Publishers: {qos.describe_publishers(infos)}; this "
                f"subscription: {qos.reliability_name(self._sub_reliability)}. Large frames "
                f"over best-effort Fast DDS are lost unless both sides use "
                f"config/fastdds_large_data.xml, or use reliable QoS: see {qos.DOC_HINT}."
            )

    def _on_image(self, raw: bytes) -> None:
        """Validate cheaply and keep the serialized frame; decode only when a request needs it."""
        self.stats.bump("frames_received")
        now = time.monotonic()
        self._last_msg_t = now
        msg = None
        try:
            view = self._parse(raw)  # header fields in O(1); data is a view, not a copy
        except cdr.CdrError as e:  # an RMW that serializes differently: deserialize (slower)
            if self._warn("cdr") is not None:
                self.get_logger().info(f"frames on {self._topic} are not plain CDR ({e}); "
                                       f"deserializing each one instead")
            try:
                view = msg = deserialize_message(raw, self._msg_type)
            except Exception as e2:
                self._drop_frame(image_conv.BadFrameError(
                    "corrupt", f"cannot deserialize the message: {e2}"), self._topic)
                return
        try:
            info = image_conv.check_frame(view, int(self._p("max_image_dim")))
        except image_conv.BadFrameError as e:
            self._drop_frame(e, self._topic)
            return
        frame = Frame(None if msg is not None else raw, msg, info, now)
        with self._frame_lock:
            self._latest = frame

    def _drop_frame(self, e: image_conv.BadFrameError, where: str) -> None:
        self.stats.drop(e.kind, f"bad frame on {where}: {e}")
        held = self._warn(e.kind)
        if held is not None:
            more = f" ({held} more since the last warning)" if held else ""
            self.get_logger().warning(f"dropped a bad frame on {where} [{e.kind}]: {e}{more}")

    # ------------------------------------------------------------------------------------------
    # requests

    def _build_request(self, req, source: str, on_delta=None) -> Request:
        """Defaults applied; a request image validated now (so a bad one fails at once)."""
        prompt = req.prompt.strip() or self._p("default_prompt")
        age = float(req.max_frame_age) or float(self._p("max_frame_age"))
        image = None
        if len(req.image.data) > 0:
            image = req.image
        elif len(req.compressed_image.data) > 0:
            image = req.compressed_image
        if image is not None:
            try:
                image_conv.check_frame(image, int(self._p("max_image_dim")))
            except image_conv.BadFrameError as e:
                raise RequestError(f"bad image in the request [{e.kind}]: {e}") from e
        else:
            with self._frame_lock:
                have = self._latest is not None
            if not have:
                raise RequestError(
                    f"no frame received yet on {self._topic} ({self._msg_type.__name__}): is "
                    f"the camera publishing there? Remap 'image' to its topic, or send an image "
                    f"in the request"
                )
        return Request(
            prompt=prompt,
            system_prompt=req.system_prompt or self._p("system_prompt") or None,
            max_new_tokens=int(req.max_new_tokens) or int(self._p("max_new_tokens")),
            max_frame_age=age if age > 0 else math.inf,
            source=source,
            image=image,
            on_delta=on_delta,
        )

    def _serve(self, req, source: str, on_delta=None, cancel_requested=None,
               max_s: float | None = None) -> Outcome:
        """Queue one request and wait for its single outcome (busy, timeout, result...).

        ``max_s`` bounds the request below ``request_timeout`` (action goals on Humble).
        """
        if self._closed:
            return self._count(Outcome.fail(SHUTTING_DOWN))
        try:
            request = self._build_request(req, source, on_delta)
        except RequestError as e:
            return self._count(Outcome.fail(str(e)))
        job = Job(request)
        refused = self.worker.submit(job)
        if refused is not None:
            return self._count(refused)
        timeout = float(self._p("request_timeout"))
        why = "raise request_timeout"
        if max_s is not None and (timeout <= 0 or timeout > max_s):
            timeout, why = max_s, "the most an action goal may take on this ROS distribution"
        deadline = request.arrival + timeout if timeout > 0 else math.inf
        while not job.wait(WAIT_SLICE_S):
            if time.monotonic() > deadline or self._closed:
                job.cancel.set()  # the worker stops at the next token, or skips the job
                where = "generating" if job.started else "waiting in the queue"
                self.worker.withdraw(job)
                # loses if the worker finished the job meanwhile, or is publishing its caption
                job.finish(Outcome.fail(
                    SHUTTING_DOWN if self._closed else
                    f"timed out after {timeout:g} s ({where}); {why}"))
                break
            if cancel_requested is not None and cancel_requested():
                job.cancel.set()  # generating: the worker ends it with the partial text
                if self.worker.withdraw(job):
                    job.finish(Outcome.fail("cancelled before generation started",
                                            finish_reason="cancelled"))
                    break
        if not job.wait(CLAIM_WAIT_S):  # the worker claimed it: its caption is on the way
            job.finish(Outcome.fail("internal error: the caption was not delivered"),
                       claimed=True)
        return self._count(job.outcome)

    def wait_answers_sent(self, timeout: float) -> bool:
        """Wait until every request handler has returned and every action result went out."""
        return self._answers.wait_idle(timeout)

    def _count(self, outcome: Outcome) -> Outcome:
        if outcome.refused:
            self.stats.bump("requests_refused")
        elif outcome.finish_reason == "cancelled":
            self.stats.bump("requests_cancelled")
        elif outcome.success:
            self.stats.bump("requests_served")
        else:
            self.stats.bump("requests_failed")
            self.stats.set(last_error=outcome.message)
        return outcome

    def _fill(self, dst, outcome: Outcome):
        """Copy an outcome into a Describe response / action result."""
        dst.success = outcome.success
        dst.caption = outcome.text
        dst.message = outcome.message
        dst.finish_reason = outcome.finish_reason
        if outcome.header is not None:
            dst.image_header = outcome.header
        dst.timings = timings_msg(outcome.timings)
        return dst

    def _counted_send(self, send):
        """The service's send_response, reporting each response sent to ``_answers``.

        The executor sends a service response after the callback returned; counting until then
        lets shutdown wait for the send itself rather than rely on Executor.shutdown (which
        does not wait for running callbacks on every distribution).
        """

        def send_response(response, header):
            try:
                return send(response, header)
            finally:
                self._answers.done()

        return send_response

    def _on_describe_srv(self, req, resp):
        self._answers.add()  # done when the response has been sent (see _counted_send)
        try:
            outcome = self._serve(req, "service")
            if not outcome.success:
                held = self._warn("busy") if outcome.refused else 0  # a burst logs once
                if held is not None:
                    more = f" ({held} more refused since the last warning)" if held else ""
                    self.get_logger().warning(f"describe failed: {outcome.message}{more}")
            return self._fill(resp, outcome)
        except BaseException:
            self._answers.done()  # no response will be sent
            raise

    def _on_describe_action(self, goal_handle):
        with self._answers.pending():
            try:
                return self._describe_action(goal_handle)
            finally:
                drop_request_images(goal_handle.request)

    def _describe_action(self, goal_handle):
        sent = {"t": -math.inf, "text": "", "n": 0}

        def feedback(text: str, delta: str, n: int) -> None:
            """At most one feedback per FEEDBACK_PERIOD_S; delta is new since the last one."""
            now = time.monotonic()
            if now - sent["t"] < FEEDBACK_PERIOD_S:
                return
            fb = DescribeAction.Feedback(
                text=text, delta=text[len(sent["text"]):], generated_tokens=n
            )
            sent.update(t=now, text=text, n=n)
            goal_handle.publish_feedback(fb)

        outcome = self._serve(
            goal_handle.request,
            "action",
            on_delta=feedback,
            cancel_requested=lambda: goal_handle.is_cancel_requested,
            max_s=ACTION_MAX_S,
        )
        n_final = int(outcome.timings.get("generated_tokens", 0))
        if outcome.success and (outcome.text, n_final) != (sent["text"], sent["n"]):
            # the throttle held the end back (text, or only the token count): the last
            # feedback always matches the result
            goal_handle.publish_feedback(DescribeAction.Feedback(
                text=outcome.text, delta=outcome.text[len(sent["text"]):],
                generated_tokens=n_final,
            ))
        result = self._fill(DescribeAction.Result(), outcome)
        if outcome.finish_reason == "cancelled" and goal_handle.is_cancel_requested:
            goal_handle.canceled()
        elif outcome.success:
            goal_handle.succeed()
        else:
            goal_handle.abort()
        return result

    # ------------------------------------------------------------------------------------------
    # the worker's callbacks (worker thread)

    def _prepare(self, job: Job):
        """The image for a job: the request's, or the latest frame if fresh. RGB (h, w, 3)."""
        req = job.request
        t0 = time.monotonic()
        max_dim = int(self._p("max_image_dim"))
        frame = None
        if req.image is not None:
            msg, where = req.image, "the request"
        else:
            with self._frame_lock:
                frame = self._latest
            if frame is None:
                raise RequestError(f"no frame received yet on {self._topic}")
            if frame.error is not None:
                raise RequestError(
                    f"the latest frame on {self._topic} could not be decoded and was dropped "
                    f"({frame.error}); the next valid frame will be used: is the camera sending "
                    f"valid images?"
                )
            age = time.monotonic() - frame.arrival
            if age > req.max_frame_age:
                raise RequestError(
                    f"the latest frame on {self._topic} is stale: it arrived {age:.1f} s ago "
                    f"(max_frame_age {req.max_frame_age:g} s); is the camera still publishing? "
                    f"A request may pass max_frame_age < 0 to accept any age"
                )
            msg, where = frame.msg, self._topic
        try:
            if msg is None:  # kept serialized: deserialize it now, once
                try:
                    msg = deserialize_message(frame.raw, self._msg_type)
                except Exception as e:
                    raise image_conv.BadFrameError("corrupt", f"cannot deserialize: {e}") from e
            rgb = image_conv.frame_to_rgb(msg, max_dim)
        except image_conv.BadFrameError as e:
            if frame is not None:
                self._drop_frame(e, where)
                self._mark_corrupt(frame, f"{e.kind}: {e}")
            raise RequestError(f"could not decode the image from {where} [{e.kind}]: {e}") from e
        return rgb, copy_header(msg.header), time.monotonic() - t0

    def _mark_corrupt(self, frame: Frame, error: str) -> None:
        """Never try this frame again, and say so to the next request (until a new frame)."""
        with self._frame_lock:
            if self._latest is frame:
                self._latest = Frame(None, None, frame.info, frame.arrival, error=error)

    def _make_config(self, job: Job):
        from internvl_ros.core import GenerationConfig

        seed = int(self._p("seed"))
        return GenerationConfig(
            max_new_tokens=job.request.max_new_tokens,
            temperature=float(self._p("temperature")),
            top_k=int(self._p("top_k")),
            top_p=float(self._p("top_p")),
            repetition_penalty=float(self._p("repetition_penalty")),
            seed=None if seed < 0 else seed,
        )

    def _on_caption(self, job: Job, outcome: Outcome) -> None:
        """Publish every finished caption (the worker skips failures and cancelled text)."""
        timings = outcome.timings
        self.stats.set(
            last_ttft_s=float(timings.get("ttft", 0.0)),
            last_tokens_per_s=float(timings.get("tokens_per_second", 0.0)),
        )
        if job.request.source == "continuous":
            self.stats.bump("continuous_captions")
        self._caption_pub.publish(String(data=outcome.text))
        stamped = Caption(
            prompt=job.request.prompt,
            text=outcome.text,
            finish_reason=outcome.finish_reason,
            source=job.request.source,
            timings=timings_msg(timings),
        )
        if outcome.header is not None:
            stamped.header = outcome.header
        self._stamped_pub.publish(stamped)

    # ------------------------------------------------------------------------------------------
    # timers

    def _continuous_tick(self) -> None:
        """Continuous mode: caption the latest new, fresh frame when the worker is idle."""
        rate = float(self._p("caption_rate_hz"))
        now = time.monotonic()
        if rate <= 0 or now - self._last_continuous_t < 1.0 / rate or not self.worker.idle():
            return
        with self._frame_lock:
            frame = self._latest
        if frame is None or frame.error is not None or frame is self._last_continuous_frame:
            return
        max_age = float(self._p("max_frame_age")) or math.inf
        if now - frame.arrival > max_age:
            return
        self._last_continuous_t, self._last_continuous_frame = now, frame
        request = Request(
            prompt=self._p("default_prompt"),
            system_prompt=self._p("system_prompt") or None,
            max_new_tokens=int(self._p("max_new_tokens")),
            max_frame_age=math.inf,
            source=CONTINUOUS,
        )
        self.worker.submit(Job(request), only_if_idle=True)  # a request raced in: skip the tick

    def _publish_diagnostics(self) -> None:
        state, waiting = self.worker.state()
        with self._frame_lock:
            frame = self._latest
        info = {
            "state": state,
            "backend": self._backend,
            "model": self._model_dir,
            "image_topic": self._topic,
            "image_transport": self._transport,
            "image_reliability": qos.reliability_name(self._sub_reliability),
            "queue_waiting": waiting,
            "latest_frame": (f"{frame.info.width}x{frame.info.height} {frame.info.encoding}"
                             + (" (corrupt, dropped)" if frame.error else "")
                             if frame else "none"),
            "latest_frame_age_s": (time.monotonic() - frame.arrival) if frame else -1.0,
            "warnings": [],
        }
        if self._no_frame_warned:
            info["warnings"].append(f"publishers on {self._topic} but no frames ({qos.DOC_HINT})")
        if self._mixed_warning:
            info["warnings"].append(f"reliable and best-effort publishers on {self._topic} "
                                    f"({qos.DOC_HINT})")
        status = build_status(
            f"{self.get_name()}: {self.get_fully_qualified_name()}", self._backend, info,
            self.stats.snapshot(),
        )
        try:
            self._diag_pub.publish(build_array(self.get_clock().now().to_msg(), [status]))
        except Exception:  # context shutting down
            pass

    # ------------------------------------------------------------------------------------------

    def stop_serving(self) -> None:
        """Refuse new requests and answer every pending one ("the node is shutting down"): the
        running generation stops at its next token. Returns at once; idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.stop()

    def close(self, timeout: float = STOP_BUDGET_S) -> bool:
        """``stop_serving``, wait for the worker thread (up to ``timeout``), release the model.

        The sessions are released only once the worker has exited: a ViT pass or a prefill
        cannot be interrupted, and closing sessions under a running model fails it (or worse,
        with native NPU sessions); if it is still running they are left to the process exit.
        Thread-safe: a second call waits (up to ``timeout``) for the first. True if released.
        """
        if not hasattr(self, "_close_lock"):  # __init__ failed before any state existed
            return False
        self.stop_serving()
        with self._close_lock:
            first, self._closing = not self._closing, True
        if not first:
            self._close_done.wait(timeout)
            return self._released
        try:
            worker = getattr(self, "worker", None)
            if worker is not None and not worker.join(timeout):
                self.get_logger().warning(
                    f"the model is still running {timeout:.1f} s after the stop (a ViT pass or "
                    f"prefill cannot be interrupted): its sessions are not released under it; "
                    f"the process exit frees them"
                )
                return False
            close = getattr(getattr(self, "pipeline", None), "close", None)
            if callable(close):
                close()
            self._released = True
            return True
        finally:
            self._close_done.set()

    def destroy_node(self):
        # also called by rclpy's context cleanup on a node whose __init__ failed half way
        action, self._action = getattr(self, "_action", None), None
        if action is not None:
            action.destroy()  # not a plain entity of the node: destroy it explicitly
        return super().destroy_node()


def drop_request_images(goal) -> None:
    """Free the image data of a finished goal: rclpy keeps the goal request until the action
    server's result_timeout (15 min on Humble), and a 1080p rgb8 image is 6 MB."""
    for img in (getattr(goal, "image", None), getattr(goal, "compressed_image", None)):
        if img is not None and len(img.data) > 0:
            img.data = array.array("B")


def copy_header(h) -> Header:
    out = Header(frame_id=h.frame_id)
    out.stamp.sec, out.stamp.nanosec = h.stamp.sec, h.stamp.nanosec
    return out


def timings_msg(t: dict) -> Timings:
    msg = Timings()
    for key, value in t.items():
        if hasattr(msg, key):
            setattr(msg, key, int(value) if key.endswith("_tokens") else float(value))
    return msg


def _graceful_stop(node: InternVLNode, stopped: threading.Event) -> None:
    """On SIGINT/SIGTERM (own thread): answer every request, wait until the answers are out
    (the main thread keeps spinning to send them), then let the main thread stop spinning."""
    node.stop_serving()  # waiting requests get "the node is shutting down"; generation cancelled
    if not node.wait_answers_sent(ANSWER_WAIT_S):
        node.get_logger().warning(f"some answers were not sent within {ANSWER_WAIT_S:g} s")
    stopped.set()


def _init_rclpy(args) -> None:
    """rclpy.init without rclpy's own signal handlers (main installs graceful ones)."""
    try:
        from rclpy.signals import SignalHandlerOptions

        rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    except (ImportError, TypeError):  # an rclpy without the option: its handlers stay
        rclpy.init(args=args)


def main(args=None) -> int:
    """Console script ``internvl_node``. Exit 0 on Ctrl-C/SIGTERM, 1 on a fatal start-up error.

    The main thread spins and owns the shutdown: a signal starts ``_graceful_stop`` on its own
    thread, which answers every request and, once the answers are out, sets ``stopped``; the
    main thread then leaves the loop, shuts the executor down (it waits for callbacks still
    sending), destroys the node and releases the model once the worker has exited. A second
    signal skips the wait for the answers. All of it stays within STOP_BUDGET_S.
    """
    _init_rclpy(args)
    node = None
    executor = None
    code = 0
    stopping = threading.Event()  # a signal arrived
    stopped = threading.Event()  # the answers are out (or a second signal): stop spinning
    t_signal = [math.inf]

    def on_signal(signum, frame):
        if node is None:
            raise KeyboardInterrupt  # still loading: stop now
        if stopping.is_set():
            stopped.set()  # a second signal: do not wait for the answers any longer
            return
        t_signal[0] = time.monotonic()
        stopping.set()
        threading.Thread(target=_graceful_stop, args=(node, stopped), name="internvl-stop",
                         daemon=True).start()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        node = InternVLNode()
        # each waiting request holds a thread: room for a full queue, the running request, the
        # image callback, the timers, and one more to refuse new requests as busy
        executor = NodeExecutor(num_threads=params.MAX_QUEUE_LIMIT + 6)
        executor.add_node(node)
        while not stopped.is_set() and rclpy.ok():
            try:
                executor.spin_once(timeout_sec=SPIN_SLICE_S)
            except Exception as e:
                if not stopping.is_set():
                    raise
                # entities going away while we stop: not a failure, keep sending the answers
                node.get_logger().debug(f"while stopping: {type(e).__name__}: {e}")
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (ModelLoadError, ConfigError) as e:
        rclpy.logging.get_logger(NODE_NAME).fatal(str(e))
        code = 1
    except Exception as e:  # rclpy rejected a parameter file value, etc.
        if node is not None or type(e).__module__.startswith("rclpy"):
            hint = ""
            if type(e).__name__ == "InvalidParameterTypeException":
                hint = " (in YAML, write a double with a decimal point: 5.0, not 5)"
            rclpy.logging.get_logger(NODE_NAME).fatal(f"{type(e).__name__}: {e}{hint}")
            code = 1
        else:
            raise
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # cleanup is bounded: don't interrupt it
            signal.signal(sig, signal.SIG_IGN)
        if node is not None:
            node.stop_serving()  # (a fatal error: answer what is pending)
        if executor is not None:
            executor.shutdown(timeout_sec=EXECUTOR_SHUTDOWN_S)
            executor.collect_late_errors()
        if node is not None:
            left = t_signal[0] + STOP_BUDGET_S - time.monotonic()
            released = node.close(timeout=max(MIN_WORKER_JOIN_S, min(left, STOP_BUDGET_S)))
            node.destroy_node()
            # after destroy_node: this logger no longer publishes to the (closed) /rosout
            rclpy.logging.get_logger(NODE_NAME).info(
                "stopped; released the model sessions" if released else
                "stopped; the model sessions are freed by the process exit")
        rclpy.try_shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
