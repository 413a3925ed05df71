"""What the node publishes for a caption besides its text: annotated images and vision_msgs.

- ``~/annotated_image`` (one camera) or ``~/<camera>/annotated_image`` (named cameras), with
  ``publish_annotated``: the described frame with the caption and the boxes drawn
  (``core/annotate.py``), ``sensor_msgs/Image`` bgr8 with the source frame's header. Drawing
  runs on this module's own thread: the worker only hands the outcome over (a one-slot mailbox:
  a caption arriving while the previous one is drawn replaces the one waiting, counted as
  skipped), so neither image intake nor the next generation waits for it. Nothing is drawn
  while nobody subscribes.
- ``~/detections``: ``vision_msgs/Detection2DArray`` of every caption (empty when the answer had
  no boxes), only where ``vision_msgs`` imports (the board's apt; not installable here, so this
  path is untested here).
"""

from __future__ import annotations

import array
import threading
import time

from rclpy.qos import QoSProfile
from sensor_msgs.msg import Image

from internvl_ros.core.annotate import annotate
from internvl_ros.core.grounding import Box

try:  # the board's apt (ros-humble-vision-msgs); no wheel exists
    import vision_msgs.msg as vision_msgs
except ImportError:
    vision_msgs = None

ANNOTATED_QOS = QoSProfile(depth=1)  # reliable: matches rviz2, rqt_image_view and Foxglove


def annotated_topic(camera: str) -> str:
    return f"~/{camera}/annotated_image" if camera else "~/annotated_image"


def image_msg(bgr, header) -> Image:
    """A bgr8 sensor_msgs/Image of ``bgr`` (H, W, 3) uint8, one copy of the pixels."""
    h, w = bgr.shape[:2]
    msg = Image(height=h, width=w, encoding="bgr8", step=w * 3)
    if header is not None:
        msg.header = header
    data = array.array("B")
    data.frombytes(memoryview(bgr).cast("B"))  # (H * W * 3,)
    msg.data = data
    return msg


def detection2d_array(header, boxes: tuple[Box, ...], vm=None):
    """``vision_msgs/Detection2DArray`` of ``boxes`` (pixel corners -> centre and size).

    Humble's vision_msgs (4.x): ``bbox.center.position`` and ``hypothesis.class_id``; older
    ones (3.x): ``bbox.center.x`` and ``id``. Score 1.0: the model gives none."""
    vm = vm or vision_msgs
    out = vm.Detection2DArray()
    if header is not None:
        out.header = header
    for b in boxes:
        det = vm.Detection2D()
        if header is not None:
            det.header = header
        centre = det.bbox.center
        where = centre.position if hasattr(centre, "position") else centre
        where.x, where.y = (b.x_min + b.x_max) / 2.0, (b.y_min + b.y_max) / 2.0
        det.bbox.size_x, det.bbox.size_y = b.x_max - b.x_min, b.y_max - b.y_min
        hyp = vm.ObjectHypothesisWithPose()
        if hasattr(hyp, "hypothesis"):
            hyp.hypothesis.class_id, hyp.hypothesis.score = b.label, 1.0
        else:
            hyp.id, hyp.score = b.label, 1.0
        det.results.append(hyp)
        if hasattr(det, "id"):
            det.id = b.label
        out.detections.append(det)
    return out


class Outputs:
    """The annotated-image publishers (per camera), the detections publisher, and the drawing
    thread. ``create`` at configure (lifecycle publishers); ``publish`` from the worker."""

    def __init__(self, node, cameras: list[str], logger):
        self._node = node
        self._cameras = cameras  # "" for the single camera
        self._log = logger
        self._pubs: dict[str, object] = {}
        self._detections_pub = None
        self._cond = threading.Condition()
        self._waiting = None  # (camera, rgb, header, text, boxes): the next image to draw
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.drawn = self.skipped = 0
        self.last_draw_s = 0.0

    def create(self, annotated: bool) -> None:
        """Create the publishers and start the drawing thread (the node calls it once)."""
        node = self._node
        if vision_msgs is not None:
            self._detections_pub = node.create_lifecycle_publisher(
                vision_msgs.Detection2DArray, "~/detections", 10)
        else:
            self._log.debug("vision_msgs is not installed: ~/detections is not published")
        if annotated:
            for camera in self._cameras:
                self._pubs[camera] = node.create_lifecycle_publisher(
                    Image, annotated_topic(camera), ANNOTATED_QOS)
            self._thread = threading.Thread(target=self._loop, name="internvl-annotate",
                                            daemon=True)
            self._thread.start()

    def publish(self, outcome, from_camera: bool = True) -> None:
        """Hand a finished caption over (worker thread; returns at once). Only camera frames
        are drawn (``from_camera``), not an image sent in a request."""
        if self._detections_pub is not None:
            try:
                self._detections_pub.publish(detection2d_array(outcome.header,
                                                               outcome.detections))
            except Exception as e:  # a vision_msgs we do not know: say so, keep captioning
                self._log.error(f"publishing ~/detections failed: {type(e).__name__}: {e}")
                self._detections_pub = None
        pub = self._pubs.get(outcome.camera) if from_camera else None
        if pub is None or outcome.image is None or pub.get_subscription_count() == 0:
            return
        with self._cond:
            if self._waiting is not None:
                self.skipped += 1
            self._waiting = (pub, outcome.image, outcome.header, outcome.text,
                             outcome.detections)
            self._cond.notify()

    def counts(self) -> dict:
        """For diagnostics."""
        with self._cond:
            return {"annotated_images": self.drawn, "annotated_skipped": self.skipped,
                    "last_annotate_ms": self.last_draw_s * 1000.0}

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._waiting = None
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._waiting is None and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                (pub, rgb, header, text, boxes), self._waiting = self._waiting, None
            try:
                t0 = time.perf_counter()
                msg = image_msg(annotate(rgb, text, boxes), header)
                draw_s = time.perf_counter() - t0
                pub.publish(msg)
                with self._cond:
                    self.drawn += 1
                    self.last_draw_s = draw_s
            except Exception as e:  # a drawing or publishing error must not end the thread
                self._log.error(f"publishing an annotated image failed: {type(e).__name__}: {e}")
            finally:
                rgb = msg = None  # don't keep the last frame alive while idle
