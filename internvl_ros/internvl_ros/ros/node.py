"""The ``internvl`` node: camera in, Describe service and streaming action, captions out.

Run: ``internvl_node --ros-args --params-file config/internvl.yaml`` (docs/NODE.md has the rest).

Threads: a MultiThreadedExecutor runs image intake (and the QoS/graph check) in one mutually
exclusive callback group, and the service/action handlers in a reentrant group. Handlers never
run the model: they queue a ``Job`` for the single ``InferenceWorker`` thread that owns the
pipeline, and wait for it, so frames keep arriving during a generation.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from dataclasses import dataclass

import rclpy
import rclpy.logging
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from rclpy.qos import ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header, String

from internvl_ros.core.errors import ConfigError, InternVLError
from internvl_ros.ros import image_conv, params, qos
from internvl_ros.ros.diagnostics import Stats, Throttle, build_array, build_status
from internvl_ros.ros.worker import InferenceWorker, Job, Outcome, Request, RequestError
from internvl_ros_interfaces.action import Describe as DescribeAction
from internvl_ros_interfaces.msg import Caption, Timings
from internvl_ros_interfaces.srv import Describe as DescribeSrv

NODE_NAME = "internvl"
WAIT_SLICE_S = 0.05  # how often a waiting handler looks at cancel requests and its deadline
WARN_PERIOD_S = 5.0  # bad-frame warnings: at most one per kind per period
FEEDBACK_PERIOD_S = 0.02  # action feedback: at most 50 messages a second


class ModelLoadError(Exception):
    """The model could not be loaded; the message names the file and what to do."""


@dataclass
class Frame:
    """The latest frame as it arrived (converted only when a request needs it)."""

    msg: object  # sensor_msgs Image or CompressedImage
    info: image_conv.FrameInfo
    arrival: float  # time.monotonic() at receipt


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
        self._closed = False
        self._active_handlers = 0
        self._handlers_lock = threading.Lock()

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
        self._last_msg_t: float | None = None
        self._check_publishers()  # subscribes
        self.create_timer(1.0, self._check_publishers, callback_group=self._image_group)

        # --- requests
        self.create_service(DescribeSrv, "~/describe", self._on_describe_srv,
                            callback_group=self._request_group)
        self._action = ActionServer(
            self,
            DescribeAction,
            "~/describe",
            execute_callback=self._on_describe_action,
            goal_callback=lambda goal: GoalResponse.ACCEPT,
            cancel_callback=lambda goal_handle: CancelResponse.ACCEPT,
            callback_group=self._request_group,
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
        self._sub = self.create_subscription(
            self._msg_type, self._topic, self._on_image, profile,
            callback_group=self._image_group,
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

    def _on_image(self, msg) -> None:
        """Validate cheaply and keep the frame; convert only when a request needs it."""
        self.stats.bump("frames_received")
        self._last_msg_t = time.monotonic()
        try:
            info = image_conv.check_frame(msg, int(self._p("max_image_dim")))
        except image_conv.BadFrameError as e:
            self._drop_frame(e, self._topic)
            return
        with self._frame_lock:
            self._latest = Frame(msg, info, time.monotonic())

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

    def _serve(self, req, source: str, on_delta=None, cancel_requested=None) -> Outcome:
        """Queue one request and wait for its single outcome (busy, timeout, result...)."""
        with self._handlers_lock:
            self._active_handlers += 1
        try:
            return self._serve_inner(req, source, on_delta, cancel_requested)
        finally:
            with self._handlers_lock:
                self._active_handlers -= 1

    def wait_handlers_done(self, timeout: float) -> bool:
        """Wait until no request handler is running (their answers are being sent)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._handlers_lock:
                if self._active_handlers == 0:
                    return True
            time.sleep(0.02)
        return False

    def _serve_inner(self, req, source, on_delta, cancel_requested) -> Outcome:
        try:
            request = self._build_request(req, source, on_delta)
        except RequestError as e:
            return self._count(Outcome.fail(str(e)))
        job = Job(request)
        refused = self.worker.submit(job)
        if refused is not None:
            return self._count(Outcome.fail(refused, refused=True))
        timeout = float(self._p("request_timeout"))
        deadline = request.arrival + timeout if timeout > 0 else math.inf
        while not job.wait(WAIT_SLICE_S):
            if time.monotonic() > deadline or self._closed:
                job.cancel.set()  # the worker stops at the next token, or skips the job
                where = "generating" if job.started else "waiting in the queue"
                self.worker.withdraw(job)
                job.finish(Outcome.fail(
                    "the node is shutting down" if self._closed else
                    f"timed out after {timeout:g} s ({where}); raise request_timeout"))
                break
            if cancel_requested is not None and cancel_requested():
                job.cancel.set()  # generating: the worker ends it with the partial text
                if self.worker.withdraw(job):
                    job.finish(Outcome.fail("cancelled before generation started",
                                            finish_reason="cancelled"))
                    break
        return self._count(job.outcome)

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

    def _on_describe_srv(self, req, resp):
        outcome = self._serve(req, "service")
        if not outcome.success:
            held = self._warn("busy") if outcome.refused else 0  # a burst logs once
            if held is not None:
                more = f" ({held} more refused since the last warning)" if held else ""
                self.get_logger().warning(f"describe failed: {outcome.message}{more}")
        return self._fill(resp, outcome)

    def _on_describe_action(self, goal_handle):
        sent = {"t": -math.inf, "text": ""}

        def feedback(text: str, delta: str, n: int) -> None:
            """At most one feedback per FEEDBACK_PERIOD_S; delta is new since the last one."""
            now = time.monotonic()
            if now - sent["t"] < FEEDBACK_PERIOD_S:
                return
            fb = DescribeAction.Feedback(
                text=text, delta=text[len(sent["text"]):], generated_tokens=n
            )
            sent["t"], sent["text"] = now, text
            goal_handle.publish_feedback(fb)

        outcome = self._serve(
            goal_handle.request,
            "action",
            on_delta=feedback,
            cancel_requested=lambda: goal_handle.is_cancel_requested,
        )
        if outcome.success and outcome.text != sent["text"]:  # the throttle held the end back
            goal_handle.publish_feedback(DescribeAction.Feedback(
                text=outcome.text, delta=outcome.text[len(sent["text"]):],
                generated_tokens=int(outcome.timings.get("generated_tokens", 0)),
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
        if req.image is not None:
            msg, where = req.image, "the request"
        else:
            with self._frame_lock:
                frame = self._latest
            if frame is None:
                raise RequestError(f"no frame received yet on {self._topic}")
            age = time.monotonic() - frame.arrival
            if age > req.max_frame_age:
                raise RequestError(
                    f"the latest frame on {self._topic} is stale: it arrived {age:.1f} s ago "
                    f"(max_frame_age {req.max_frame_age:g} s); is the camera still publishing? "
                    f"A request may pass max_frame_age < 0 to accept any age"
                )
            msg, where = frame.msg, self._topic
        try:
            rgb = image_conv.frame_to_rgb(msg, max_dim)
        except image_conv.BadFrameError as e:
            if req.image is None:
                self._drop_frame(e, where)
                with self._frame_lock:  # never try this frame again
                    if self._latest is not None and self._latest.msg is msg:
                        self._latest = None
            raise RequestError(f"could not decode the image from {where} [{e.kind}]: {e}") from e
        return rgb, copy_header(msg.header), time.monotonic() - t0

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
        if frame is None or frame is self._last_continuous_frame:
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
            source="continuous",
        )
        self.worker.submit(Job(request))  # refused only if a request raced in: skip this tick

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
                             if frame else "none"),
            "latest_frame_age_s": (time.monotonic() - frame.arrival) if frame else -1.0,
            "warnings": [],
        }
        if self._no_frame_warned:
            info["warnings"].append(f"publishers on {self._topic} but no frames ({qos.DOC_HINT})")
        status = build_status(
            f"{self.get_name()}: {self.get_fully_qualified_name()}", self._backend, info,
            self.stats.snapshot(),
        )
        try:
            self._diag_pub.publish(build_array(self.get_clock().now().to_msg(), [status]))
        except Exception:  # context shutting down
            pass

    # ------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Answer everything pending, stop the worker, release the model sessions."""
        if self._closed or not hasattr(self, "worker"):
            return
        self._closed = True
        self.worker.stop()
        close = getattr(self.pipeline, "close", None)
        if callable(close):
            close()

    def destroy_node(self):
        # also called by rclpy's context cleanup on a node whose __init__ failed half way
        action, self._action = getattr(self, "_action", None), None
        if action is not None:
            action.destroy()  # not a plain entity of the node: destroy it explicitly
        return super().destroy_node()


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


def _graceful_stop(node: InternVLNode) -> None:
    """On SIGINT/SIGTERM: answer every request, let the answers go out, then stop spinning."""
    node.close()  # waiting requests get "the node is shutting down"; generation is cancelled
    node.wait_handlers_done(timeout=2.0)
    time.sleep(0.2)  # the executor sends the last responses / action results
    rclpy.try_shutdown()


def _init_rclpy(args) -> None:
    """rclpy.init without rclpy's own signal handlers (main installs graceful ones)."""
    try:
        from rclpy.signals import SignalHandlerOptions

        rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    except (ImportError, TypeError):  # an rclpy without the option: its handlers stay
        rclpy.init(args=args)


def main(args=None) -> int:
    """Console script ``internvl_node``. Exit 0 on Ctrl-C/SIGTERM, 1 on a fatal start-up error."""
    _init_rclpy(args)
    node = None
    executor = None
    code = 0
    stopping = threading.Event()

    def on_signal(signum, frame):
        if node is None or stopping.is_set():
            raise KeyboardInterrupt  # still loading, or a second signal: stop now
        stopping.set()
        threading.Thread(target=_graceful_stop, args=(node,), name="internvl-stop",
                         daemon=True).start()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        node = InternVLNode()
        # each waiting request holds a thread: room for a full queue, the running request, the
        # image callback, the timers, and one more to refuse new requests as busy
        executor = MultiThreadedExecutor(num_threads=params.MAX_QUEUE_LIMIT + 6)
        executor.add_node(node)
        executor.spin()
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
            node.close()  # answers waiting requests, so the handlers return
        if executor is not None:
            executor.shutdown(timeout_sec=2.0)
        if node is not None:
            node.destroy_node()
            # after destroy_node: this logger no longer publishes to the (closed) /rosout
            rclpy.logging.get_logger(NODE_NAME).info("stopped; released the model sessions")
        rclpy.try_shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
