"""Requests: ``~/describe`` (service and streaming action), building jobs, and the answers.

A handler builds a ``Request`` with everything the worker needs (the chosen frame, the
GenerationConfig, the callback that publishes the caption), submits it and waits for its single
``Outcome``, which it copies into the response or result. Handlers run on the executor's
reentrant group; they never run the model.
"""

from __future__ import annotations

import array
import math
import threading
import time
from collections.abc import Callable

from rclpy.action import CancelResponse, GoalResponse

from internvl_ros.core import GenerationConfig
from internvl_ros.core.errors import ConfigError
from internvl_ros.core.grounding import LOCATE_PREFIX, REF_END, REF_START, Box, check_phrase
from internvl_ros.core.pipeline import Timings
from internvl_ros.ros import compat, image_conv, params
from internvl_ros.ros.diagnostics import Stats, Throttle
from internvl_ros.ros.intake import Cameras, RequestImage
from internvl_ros.ros.worker import SHUTTING_DOWN, Job, Outcome, Request, RequestError
from internvl_ros_interfaces.action import Describe as DescribeAction
from internvl_ros_interfaces.msg import Detection
from internvl_ros_interfaces.msg import Timings as TimingsMsg
from internvl_ros_interfaces.srv import Describe as DescribeSrv

WAIT_SLICE_S = 0.05  # how often a waiting handler looks at cancel requests and its deadline
FEEDBACK_PERIOD_S = 0.02  # action feedback: at most 50 messages a second
CLAIM_WAIT_S = 5.0  # a handler whose job the worker claimed waits this long for the caption
WARN_PERIOD_S = 5.0
MAX_NEW_TOKENS_HI = int(params.BY_NAME["max_new_tokens"].hi)

# Timings.msg field <- the core's Timings field: the one place the two names meet.
_TIMINGS_MSG_FIELDS = {
    "preprocess": "preprocess_s",
    "vit": "vit_s",
    "prefill": "prefill_s",
    "ttft": "ttft_s",
    "decode": "decode_s",
    "total": "total_s",
    "prompt_tokens": "prompt_tokens",
    "generated_tokens": "generated_tokens",
    "tokens_per_second": "decode_tokens_per_s",
    "cached_prompt_tokens": "cached_prompt_tokens",
}


def timings_msg(t: Timings) -> TimingsMsg:
    """The message for the core's Timings (service, action and caption_stamped use it)."""
    msg = TimingsMsg()
    for name, field in _TIMINGS_MSG_FIELDS.items():
        value = getattr(t, field)
        setattr(msg, name, int(value) if name.endswith("_tokens") else float(value))
    return msg


def detection_msgs(boxes: tuple[Box, ...]) -> list[Detection]:
    """Detection messages for the core's boxes (response, result and caption_stamped)."""
    return [Detection(label=b.label, x_min=b.x_min, y_min=b.y_min, x_max=b.x_max,
                      y_max=b.y_max) for b in boxes]


def stuck_message(worker, stuck_after: float) -> str:
    """'backend stuck: ...' when the running generation has made no progress for longer than
    ``stuck_after`` seconds (0: never), else ''. /diagnostics shows the same as an ERROR."""
    stuck = worker.stuck_for() if worker is not None else 0.0
    if stuck_after <= 0 or stuck <= stuck_after:
        return ""
    return (f"backend stuck: no progress for {stuck:.1f} s (a model step hangs in the backend; "
            f"stuck_after is {stuck_after:g} s). Requests are refused until it moves again; if "
            "it does not, restart the node (on the board, also check the NPU driver)")


def drop_request_images(goal) -> None:
    """Free the image data of a finished goal: rclpy keeps the goal request until the action
    server's result_timeout (15 min on Humble), and a 1080p rgb8 image is 6 MB."""
    for img in (getattr(goal, "image", None), getattr(goal, "compressed_image", None)):
        if img is not None and len(img.data) > 0:
            img.data = array.array("B")


def fill(dst, outcome: Outcome):
    """Copy an outcome into a Describe response / action result."""
    dst.success = outcome.success
    dst.caption = outcome.text
    dst.message = outcome.message
    dst.finish_reason = outcome.finish_reason
    dst.choice_index = outcome.choice_index
    if outcome.header is not None:
        dst.image_header = outcome.header
    dst.timings = timings_msg(outcome.timings)
    dst.detections = detection_msgs(outcome.detections)
    return dst


class Describer:
    """The ``~/describe`` service and action, and the requests they (and continuous mode) make.

    The node sets ``worker`` (on configure and cleanup) and ``state`` (its lifecycle state);
    requests are served only while ``state == "active"``; otherwise they are answered at once.
    """

    def __init__(self, node, cameras: Cameras, stats: Stats, pending: compat.Pending,
                 param: Callable[[str], object], on_caption: Callable[[Job, Outcome], None]):
        self._node = node
        self.cameras = cameras
        self.stats = stats
        self._pending = pending
        self._p = param
        self._on_caption = on_caption
        self._warn = Throttle(WARN_PERIOD_S)
        self.worker = None
        self.state = "unconfigured"
        self.closed = False  # shutting down: every request is refused
        self._service = None
        self._action = None

    # ------------------------------------------------------------------------------------------
    # interfaces

    def create_interfaces(self, callback_group) -> None:
        """The service and the action (once: they stay until the node is destroyed)."""
        if self._service is not None:
            return
        self._service = compat.create_counting_service(
            self._node, DescribeSrv, "~/describe", self._on_service, self._pending,
            callback_group)
        self._action = compat.CountingActionServer(
            self._node,
            DescribeAction,
            "~/describe",
            execute_callback=self._on_action,
            goal_callback=lambda goal: GoalResponse.ACCEPT,
            cancel_callback=lambda goal_handle: CancelResponse.ACCEPT,
            callback_group=callback_group,
            result_timeout=compat.ACTION_RESULT_TIMEOUT_S,
            pending=self._pending,
        )

    def destroy(self) -> None:
        action, self._action = self._action, None
        if action is not None:
            action.destroy()  # not a plain entity of the node: destroy it explicitly

    # ------------------------------------------------------------------------------------------
    # requests

    def generation_config(self, max_new_tokens: int, choices=()) -> GenerationConfig:
        """Raises the core's ConfigError for bad ``choices``."""
        seed = int(self._p("seed"))
        return GenerationConfig(
            # a request's uint32 is clamped to the parameter's range (the worker clamps it to
            # the context too)
            max_new_tokens=max(1, min(int(max_new_tokens), MAX_NEW_TOKENS_HI)),
            temperature=float(self._p("temperature")),
            top_k=int(self._p("top_k")),
            top_p=float(self._p("top_p")),
            repetition_penalty=float(self._p("repetition_penalty")),
            seed=None if seed < 0 else seed,
            choices=tuple(choices),
        )

    def make_request(self, image, source: str, prompt: str = "", system_prompt: str = "",
                     max_new_tokens: int = 0, on_delta=None, locate: str = "",
                     choices=()) -> Request:
        """A request with the node's defaults applied (ConfigError for bad choices); with
        ``locate`` (a phrase), the question is InternVL's grounding prompt for it (``prompt``
        shows it as text)."""
        if locate:
            try:
                locate = check_phrase(locate)
            except ConfigError as e:
                raise RequestError(str(e)) from e
            prompt = f"{LOCATE_PREFIX}{REF_START}{locate}{REF_END}"
        return Request(
            locate=locate,
            prompt=prompt.strip() or self._p("default_prompt"),
            system_prompt=system_prompt or self._p("system_prompt") or None,
            config=self.generation_config(max_new_tokens or int(self._p("max_new_tokens")),
                                          choices),
            image=image,
            source=source,
            max_image_dim=int(self._p("max_image_dim")),
            on_delta=on_delta,
            frame_key=getattr(image, "key", None),  # a received frame's; None for the request's
        )

    def _build_request(self, req, source: str, on_delta=None) -> Request:
        return self.make_request(self.choose_image(req), source, req.prompt, req.system_prompt,
                                 int(req.max_new_tokens), on_delta, req.locate,
                                 req.choices)

    def choose_image(self, req):
        """The image a request (Describe, Ask: ``camera``, ``max_frame_age``, ``image``,
        ``compressed_image``) is about, chosen now: the request's own image (validated now, so
        a bad one fails at once), or its camera's latest frame if it is fresh enough. An unknown
        camera fails at once (RequestError naming the known ones), also with an image."""
        store = self.cameras.store(req.camera)
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
            source_image = RequestImage(image)
        else:
            age = float(req.max_frame_age) or float(self._p("max_frame_age"))
            source_image = store.choose(age if age > 0 else math.inf)
        return source_image

    def refusal(self, worker) -> Outcome | None:
        """The answer for a request that cannot be served now, or None."""
        if self.closed:
            return Outcome.fail(SHUTTING_DOWN)
        if self.state != "active" or worker is None:
            return Outcome.fail(
                f"the node is inactive (lifecycle state: {self.state}); activate it with "
                f"'ros2 lifecycle set {self._node.get_fully_qualified_name()} activate'")
        stuck = stuck_message(worker, float(self._p("stuck_after")))
        if stuck:
            return Outcome.fail(stuck)
        return None

    def serve(self, req, source: str, on_delta=None, cancel_requested=None,
              max_s: float | None = None, build=None, on_caption=None) -> Outcome:
        """Queue one request and wait for its single outcome (busy, timeout, result...).

        ``max_s`` bounds the request below ``request_timeout`` (action goals on Humble).
        ``build(req, source, on_delta)`` makes the worker's Request (default: a Describe's)
        and ``on_caption`` publishes its outcome (default: the node's caption publisher).
        """
        worker = self.worker  # cleanup may clear it meanwhile: this request keeps its own
        refused = self.refusal(worker)
        if refused is not None:
            return self._count(refused)
        try:
            request = (build or self._build_request)(req, source, on_delta)
        except RequestError as e:
            return self._count(Outcome.fail(str(e)))
        except ConfigError as e:  # bad choices
            return self._count(Outcome.fail(f"{type(e).__name__}: {e}"))
        job = Job(request, on_caption=on_caption or self._on_caption)
        refused = worker.submit(job, int(self._p("max_queue")))
        if refused is not None:
            return self._count(refused)
        timeout = float(self._p("request_timeout"))
        why = "raise request_timeout"
        if max_s is not None and (timeout <= 0 or timeout > max_s):
            timeout, why = max_s, "the most an action goal may take on this ROS distribution"
        deadline = request.arrival + timeout if timeout > 0 else math.inf
        while not job.wait(WAIT_SLICE_S):
            if time.monotonic() > deadline or self.closed:
                job.cancel.set()  # the worker stops at the next token, or skips the job
                where = "generating" if job.started else "waiting in the queue"
                worker.withdraw(job)
                # loses if the worker finished the job meanwhile, or is publishing its caption
                job.finish(Outcome.fail(
                    SHUTTING_DOWN if self.closed else
                    f"timed out after {timeout:g} s ({where}); {why}"))
                break
            if cancel_requested is not None and cancel_requested():
                job.cancel.set()  # generating: the worker ends it with the partial text
                if worker.withdraw(job):
                    job.finish(Outcome.fail("cancelled before generation started",
                                            finish_reason="cancelled"))
                    break
        if not job.wait(CLAIM_WAIT_S):  # the worker claimed it: its caption is on the way
            job.finish(Outcome.fail("internal error: the caption was not delivered"),
                       claimed=True)
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

    def _log_failure(self, what: str, outcome: Outcome) -> None:
        if outcome.success:
            return
        held = self._warn("busy") if outcome.refused else 0  # a burst logs once
        if held is not None:
            more = f" ({held} more refused since the last warning)" if held else ""
            self._node.get_logger().warning(f"{what} failed: {outcome.message}{more}")

    # ------------------------------------------------------------------------------------------
    # handlers

    def _on_service(self, req, resp):
        outcome = self.serve(req, "service")
        self._log_failure("describe", outcome)
        return fill(resp, outcome)

    def _on_action(self, goal_handle):
        with self._pending.held():
            try:
                return self._describe_action(goal_handle)
            finally:
                drop_request_images(goal_handle.request)

    def _describe_action(self, goal_handle):
        lock = threading.Lock()
        sent = {"t": -math.inf, "text": "", "n": 0, "open": True}

        def feedback(text: str, delta: str, n: int) -> None:
            """At most one feedback per FEEDBACK_PERIOD_S; delta is new since the last one.
            None once the result is decided, nor after a cancel request."""
            now = time.monotonic()
            with lock:
                if (not sent["open"] or goal_handle.is_cancel_requested
                        or now - sent["t"] < FEEDBACK_PERIOD_S):
                    return
                fb = DescribeAction.Feedback(text=text, delta=text[len(sent["text"]):],
                                             generated_tokens=n)
                sent.update(t=now, text=text, n=n)
                goal_handle.publish_feedback(fb)

        outcome = self.serve(
            goal_handle.request,
            "action",
            on_delta=feedback,
            cancel_requested=lambda: goal_handle.is_cancel_requested,
            max_s=compat.ACTION_MAX_S,
        )
        with lock:
            sent["open"] = False  # from here on the worker's feedback is dropped
            n_final = int(outcome.timings.generated_tokens)
            if outcome.success and (outcome.text, n_final) != (sent["text"], sent["n"]):
                # the throttle held the end back (text, or only the token count), or grounding
                # markup was removed: the last feedback always matches the result
                extends = outcome.text.startswith(sent["text"])
                goal_handle.publish_feedback(DescribeAction.Feedback(
                    text=outcome.text,
                    delta=outcome.text[len(sent["text"]):] if extends else outcome.text,
                    generated_tokens=n_final,
                ))
        self._log_failure("describe action", outcome)
        result = fill(DescribeAction.Result(), outcome)
        if outcome.finish_reason == "cancelled" and goal_handle.is_cancel_requested:
            goal_handle.canceled()
        elif outcome.success:
            goal_handle.succeed()
        else:
            goal_handle.abort()
        return result
