"""The ``internvl`` managed node: wiring, parameters, lifecycle, diagnostics, continuous mode.

Run: ``internvl_node --ros-args --params-file config/internvl.yaml`` (``main.py``; docs/NODE.md
has the rest). The parts live beside it, one concern each:

- ``intake.py``: the cameras: per camera, the image subscription (auto QoS) and the
  ``FrameStore`` (latest frame);
- ``describe.py``: the ``~/describe`` service and action, requests and answers;
- ``ask.py``: the ``~/ask`` service (several questions about one frame, one job);
- ``worker.py``: the thread that owns the pipeline and runs one job at a time (no rclpy);
- ``outputs.py``: the annotated images and vision_msgs detections, drawn on their own thread;
- ``shutdown.py``: every pending request answered once, then the model released;
- ``compat.py``: rclpy differences between distributions and the private hooks.

Lifecycle: configure loads the model (a failure fails the transition; the node stays
unconfigured); activate starts intake, the caption publishers and continuous mode; deactivate
pauses them (requests already queued are still answered); cleanup releases the model; shutdown
answers everything pending. ``autostart`` (default true) configures and activates at start-up.

Threads: a MultiThreadedExecutor runs image intake in one mutually exclusive callback group, the
service/action handlers in a reentrant group and the timers in a third; the lifecycle services
run in the node's default group. Handlers never run the model: they queue a ``Job`` for the
``InferenceWorker`` and wait for it, so frames keep arriving during a generation.
"""

from __future__ import annotations

import math
import time
import traceback

from diagnostic_msgs.msg import DiagnosticArray
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
from std_msgs.msg import String

from internvl_ros.core.errors import ConfigError, InternVLError
from internvl_ros.ros import allocator, compat, intake, params, qos
from internvl_ros.ros.ask import AskService
from internvl_ros.ros.describe import Describer, detection_msgs, stuck_message, timings_msg
from internvl_ros.ros.diagnostics import Period, Stats, Throttle, build_array, build_status
from internvl_ros.ros.outputs import Outputs
from internvl_ros.ros.shutdown import STOP_BUDGET_S, Release
from internvl_ros.ros.worker import CONTINUOUS, InferenceWorker, Job, Outcome
from internvl_ros_interfaces.msg import Caption

NODE_NAME = "internvl"
CLEANUP_REASON = "the node is cleaning up (lifecycle cleanup): the model is being released"
SUCCESS, FAILURE = TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.FAILURE


class ModelLoadError(Exception):
    """The model could not be loaded; the message names the file and what to do."""


# The frames a request can name again: the latest of each camera (a request always takes a
# camera's newest frame, and a newer one replaces it for good), with one to spare for a frame
# replaced while a request on it is still queued. More would only fill frame_cache_mb with
# frames nobody can ask about (the soak's memory growth, issue 16).
CACHED_FRAMES_PER_CAMERA = 2


def load_pipeline(model_dir: str, backend: str, provider: str, num_threads: int, max_tiles: int,
                  kv_feed: str = "auto", device_id: int = -1, frame_cache_mb: int = 64,
                  frame_cache_frames: int | None = None):
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
            kv_feed=kv_feed,
            device_id=None if device_id < 0 else device_id,
            frame_cache_bytes=frame_cache_mb << 20,
            frame_cache_frames=frame_cache_frames,
        )
    except InternVLError as e:  # the core's messages name the file and the fix
        raise ModelLoadError(f"cannot load the model from model_dir '{model_dir}': {e}") from e
    except (OSError, ImportError, RuntimeError, ValueError) as e:
        raise ModelLoadError(
            f"cannot load the model from model_dir '{model_dir}' with backend '{backend}': "
            f"{type(e).__name__}: {e}"
        ) from e


def pipeline_info(pipeline) -> dict:
    """Diagnostics values of the loaded pipeline: the KV feed in use and why, the frame cache."""
    out = {}
    status = getattr(pipeline, "kv_feed", None)
    if status is not None:
        d = status.to_dict()
        out.update(kv_feed=d["mode"], kv_feed_requested=d["requested"],
                   kv_feed_reason=d["reason"], kv_feed_verified_steps=d["verified_steps"])
    cache = getattr(pipeline, "frames", None)
    if cache is not None:
        out.update(frame_cache_frames=len(cache), frame_cache_mb=cache.nbytes / (1 << 20),
                   frame_cache_hits=cache.hits)
    return out


class InternVLNode(LifecycleNode):
    """See the module docstring and docs/NODE.md."""

    def __init__(self, pipeline_loader=None, **node_kwargs):
        super().__init__(NODE_NAME, **node_kwargs)
        log = self.get_logger()
        params.declare_all(self)
        problems = params.check_values({n: self._p(n) for n in params.PARAM_NAMES})
        if problems:
            raise ConfigError("invalid parameters: " + "; ".join(problems))
        self.add_on_set_parameters_callback(self._on_set_parameters)
        compat.check(log)

        self.stats = Stats()
        self._period = Period()
        self._pending = compat.Pending()
        self._loader = pipeline_loader or load_pipeline
        self.pipeline = None
        self.worker: InferenceWorker | None = None
        self._release: Release | None = None
        self.load_error: str | None = None  # why the last configure failed
        self.lifecycle_state = "unconfigured"
        self._last_continuous_seq: dict[str, int] = {}  # per camera
        self._last_continuous_t = 0.0
        self._next_camera = 0  # continuous mode: the camera to try first
        self._warn = Throttle(5.0)

        # callback groups: intake never waits behind inference
        self._image_group = MutuallyExclusiveCallbackGroup()
        self._request_group = ReentrantCallbackGroup()
        self._timer_group = MutuallyExclusiveCallbackGroup()

        self.cameras = intake.Cameras(self, self._p("cameras"), self._p("image_transport"),
                                      self.stats, log, self._image_group, self._p)
        first = self.cameras.names[0]
        self.frames, self.intake = self.cameras.stores[first], self.cameras.intakes[first]
        self.describer = Describer(self, self.cameras, self.stats, self._pending, self._p,
                                   self._publish_caption)
        self.outputs = Outputs(self, self.cameras.names if self.cameras.named else [""], log)
        self.asker = AskService(self, self.describer, self._pending, self._p,
                                self._publish_caption)
        self._caption_pub = self._stamped_pub = None  # lifecycle publishers, from configure on
        self._continuous_timer = None
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_timer(1.0, self._publish_diagnostics, callback_group=self._timer_group)

    def _p(self, name: str):
        return params.value(self, name)

    def _on_set_parameters(self, changes):
        from rcl_interfaces.msg import SetParametersResult

        problems = params.check_values({c.name: c.value for c in changes})
        return SetParametersResult(successful=not problems, reason="; ".join(problems))

    def _set_state(self, state: str) -> None:
        self.lifecycle_state = self.describer.state = state

    # ------------------------------------------------------------------------------------------
    # lifecycle

    def on_configure(self, state):
        log = self.get_logger()
        backend, model_dir = self._p("backend"), self._p("model_dir")
        t0 = time.monotonic()
        try:
            pipeline = self._loader(model_dir, backend, self._p("provider"),
                                    self._p("num_threads"), self._p("max_tiles"),
                                    self._p("kv_feed"), self._p("device_id"),
                                    self._p("frame_cache_mb"),
                                    CACHED_FRAMES_PER_CAMERA * len(self.cameras.names))
        except Exception as e:  # ModelLoadError names the file and the fix; anything else is a bug
            why = str(e) if isinstance(e, ModelLoadError) else f"{type(e).__name__}: {e}"
            self.load_error = why
            if not isinstance(e, ModelLoadError):
                log.error(f"loading the model raised:\n{traceback.format_exc()}")
            if not self._p("autostart"):  # (with autostart, main logs it as FATAL and exits)
                log.error(f"configure failed; the node stays unconfigured (configure again once "
                          f"the cause is fixed): {why}")
            return FAILURE
        self.load_error = None
        self.pipeline = pipeline
        self.worker = InferenceWorker(pipeline, log, when_idle=allocator.Trimmer())
        self._release = Release(self.worker, log)
        self.describer.worker = self.worker
        log.info(f"model loaded from {model_dir} ({backend}) in {time.monotonic() - t0:.1f} s")
        kv_feed = getattr(pipeline, "kv_feed", None)
        if kv_feed is not None:  # the core logs it on Python logging, which may not reach ROS
            log.info(f"kv_feed: {kv_feed}")
        if self._caption_pub is None:
            self._caption_pub = self.create_lifecycle_publisher(String, "~/caption", 10)
            self._stamped_pub = self.create_lifecycle_publisher(Caption, "~/caption_stamped", 10)
            self._continuous_timer = self.create_timer(0.1, self._continuous_tick,
                                                       callback_group=self._timer_group)
            self.outputs.create(bool(self._p("publish_annotated")))
        self._continuous_timer.cancel()
        self.describer.create_interfaces(self._request_group)
        self.asker.create_interface(self._request_group)
        self._set_state("inactive")
        return super().on_configure(state)

    def on_activate(self, state):
        self.cameras.start()
        self._continuous_timer.reset()
        self._set_state("active")
        images = ", ".join(f"{name + ': ' if name else ''}{store.topic}"
                           for name, store in self.cameras.stores.items())
        self.get_logger().info(
            f"active: {self.frames.msg_type.__name__} images on {images}; service "
            f"and action {compat.resolve_topic(self, '~/describe')}; captions on "
            f"{compat.resolve_topic(self, '~/caption')}")
        return super().on_activate(state)

    def on_deactivate(self, state):
        self._set_state("inactive")
        self._continuous_timer.cancel()
        self.cameras.stop()
        self.get_logger().info("inactive: intake and continuous mode paused; requests already "
                               "queued are still answered")
        return super().on_deactivate(state)

    def on_cleanup(self, state):
        self._unload(CLEANUP_REASON)
        self._set_state("unconfigured")
        return super().on_cleanup(state)

    def on_shutdown(self, state):
        self.stop_serving()
        if self.lifecycle_state == "active":
            self._continuous_timer.cancel()
            self.cameras.stop()
        self._unload(None)
        self.outputs.stop()
        self._set_state("finalized")
        return super().on_shutdown(state)

    def on_error(self, state):
        self.get_logger().error("a lifecycle transition failed: releasing the model")
        self._unload(CLEANUP_REASON)
        self._set_state("unconfigured")
        return SUCCESS

    def _unload(self, reason: str | None) -> None:
        release = self._release
        if release is None:
            return
        released = release(STOP_BUDGET_S, reason)
        self.describer.worker = self.worker = self.pipeline = self._release = None
        self.get_logger().info("released the model" if released else
                               "the model is still running: the process exit frees it")

    # ------------------------------------------------------------------------------------------
    # captions and continuous mode

    def _publish_caption(self, job: Job, outcome: Outcome) -> None:
        """Publish every finished caption (worker thread; the worker skips failures)."""
        t = outcome.timings
        self.stats.set(last_ttft_s=t.ttft_s, last_tokens_per_s=t.decode_tokens_per_s)
        if job.request.source == CONTINUOUS:
            self.stats.bump("continuous_captions")
        if outcome.malformed:
            self.stats.bump("grounding_malformed", outcome.malformed)
            held = self._warn("malformed")
            if held is not None:
                more = f" ({held} more answers since the last warning)" if held else ""
                self.get_logger().warning(
                    f"{outcome.malformed} grounding span(s) in an answer could not be read and "
                    f"were ignored{more}")
        self._caption_pub.publish(String(data=outcome.text))
        stamped = Caption(prompt=job.request.prompt, text=outcome.text,
                          finish_reason=outcome.finish_reason, source=job.request.source,
                          timings=timings_msg(t), camera=outcome.camera,
                          detections=detection_msgs(outcome.detections))
        if outcome.header is not None:
            stamped.header = outcome.header
        self._stamped_pub.publish(stamped)
        # annotated image (handed to its thread), vision_msgs
        self.outputs.publish(outcome, not isinstance(job.request.image, intake.RequestImage))

    def _continuous_tick(self) -> None:
        """Continuous mode: caption the latest new, fresh frame when the worker is idle, each
        camera in turn. The chosen frame goes in the job; its sequence number (not the frame)
        marks it as done."""
        rate = float(self._p("caption_rate_hz"))
        now = time.monotonic()
        worker = self.worker
        if (rate <= 0 or now - self._last_continuous_t < 1.0 / rate or worker is None
                or self.lifecycle_state != "active" or not worker.idle()):
            return
        names = self.cameras.names
        max_age = float(self._p("max_frame_age")) or math.inf
        for k in range(len(names)):  # round robin, from the camera after the last captioned
            i = (self._next_camera + k) % len(names)
            frame = self.cameras.stores[names[i]].latest()
            if (frame is not None and frame.error is None and now - frame.arrival <= max_age
                    and frame.seq != self._last_continuous_seq.get(names[i])):
                break
        else:
            return
        self._next_camera = (i + 1) % len(names)
        self._last_continuous_t, self._last_continuous_seq[names[i]] = now, frame.seq
        job = Job(self.describer.make_request(frame, CONTINUOUS), on_caption=self._publish_caption)
        worker.submit(job, int(self._p("max_queue")), only_if_idle=True)  # a request raced in

    # ------------------------------------------------------------------------------------------
    # diagnostics

    def _publish_diagnostics(self) -> None:
        worker = self.worker
        work, waiting = worker.state() if worker is not None else ("no model", 0)
        latest, age = self.frames.describe_latest()
        stats = self.stats.snapshot()
        if self._p("publish_annotated"):
            stats.update(self.outputs.counts())
        info = {
            "state": work,
            "lifecycle_state": self.lifecycle_state,
            "backend": self._p("backend"),
            "model": self._p("model_dir"),
            "image_topic": self.frames.topic,
            "image_transport": self._p("image_transport"),
            "image_reliability": qos.reliability_name(self.intake.reliability),
            "queue_waiting": waiting,
            "latest_frame": latest,
            "latest_frame_age_s": age,
            **pipeline_info(self.pipeline),
            "warnings": self.cameras.warnings() + self._period.warnings(stats),
        }
        if self.cameras.named:  # per camera; the values above are the first camera's
            info["cameras"] = ", ".join(self.cameras.names)
            for name, store in self.cameras.stores.items():
                latest, age = store.describe_latest()
                info.update({
                    f"{name}/image_topic": store.topic,
                    f"{name}/image_reliability": qos.reliability_name(
                        self.cameras.intakes[name].reliability),
                    f"{name}/frames_received": store.received,
                    f"{name}/frames_dropped": store.dropped,
                    f"{name}/latest_frame": latest,
                    f"{name}/latest_frame_age_s": age,
                })
        stuck = stuck_message(worker, float(self._p("stuck_after")))
        if stuck:
            info["state"] = "stuck"
            info["errors"] = [stuck]
        if self.load_error:
            info["warnings"].append(f"configure failed: {self.load_error}")
        status = build_status(f"{self.get_name()}: {self.get_fully_qualified_name()}",
                              self._p("backend"), info, stats)
        try:
            self._diag_pub.publish(build_array(self.get_clock().now().to_msg(), [status]))
        except Exception:  # context shutting down
            pass

    # ------------------------------------------------------------------------------------------
    # stopping (main and the lifecycle shutdown)

    def stop_serving(self) -> None:
        """Refuse new requests and answer every pending one ("the node is shutting down"): the
        running generation stops at its next token. Returns at once; idempotent."""
        self.describer.closed = True
        if self._release is not None:
            self._release.stop()

    def close(self, timeout: float = STOP_BUDGET_S) -> bool:
        """``stop_serving``, wait for the worker (up to ``timeout``), release the model.
        True if released (or nothing was loaded)."""
        self.stop_serving()
        release = self._release
        return True if release is None else release(timeout)

    def wait_answers_sent(self, timeout: float) -> bool:
        """Wait until every request handler has returned and every action result went out."""
        return self._pending.wait_idle(timeout)

    def destroy_node(self):
        # also called by rclpy's context cleanup on a node whose __init__ failed half way
        outputs = getattr(self, "outputs", None)
        if outputs is not None:
            outputs.stop()
        describer = getattr(self, "describer", None)
        if describer is not None:
            describer.destroy()
        return super().destroy_node()
