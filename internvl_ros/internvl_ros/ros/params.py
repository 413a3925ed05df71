"""The node's parameters: one table, with descriptions, ranges and whether they can change live.

``PARAMS`` is plain data (no rclpy import at module level), so the static launch/config test and
docs/NODE.md can be checked against it. ``declare_all(node)`` declares every entry with a
``ParameterDescriptor`` (description, range, read-only flag).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BACKENDS = ("onnxruntime", "axengine")
TRANSPORTS = ("raw", "compressed")
RELIABILITIES = ("auto", "reliable", "best_effort")
#: a camera name: one ROS name token, so ``<name>/image`` is a valid relative topic
CAMERA_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
KV_FEEDS = ("auto", "full", "rows")  # core.KV_FEED_MODES (not imported: this table is plain data)


@dataclass(frozen=True)
class Param:
    """One parameter. ``lo``/``hi`` bound numbers; ``choices`` bound strings. A tuple default
    is a string array (its items must be camera names, distinct)."""

    name: str
    default: object
    description: str
    group: str
    read_only: bool = False
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.default, tuple):
            if not all(isinstance(v, str) for v in self.default) or self.lo is not None:
                raise TypeError(f"parameter {self.name}: an array default holds strings only")
            return
        if not isinstance(self.default, (bool, int, float, str)):
            raise TypeError(f"parameter {self.name}: unsupported default {self.default!r}")
        if (self.lo is None) != (self.hi is None):
            raise ValueError(f"parameter {self.name}: give both lo and hi, or neither")
        if isinstance(self.default, bool):
            if self.lo is not None or self.choices:
                raise ValueError(f"parameter {self.name}: a bool has neither range nor choices")
        elif isinstance(self.default, str):
            if self.lo is not None:
                raise ValueError(f"parameter {self.name}: a string has choices, not a range")
            if self.choices and self.default not in self.choices:
                raise ValueError(f"parameter {self.name}: default not in {self.choices}")
        elif self.lo is None or not self.lo <= self.default <= self.hi:
            raise ValueError(f"parameter {self.name}: numbers need a range holding the default")

    def check(self, value) -> str | None:
        """Why ``value`` is not acceptable, or None. (rclpy checks numeric ranges itself.)"""
        if isinstance(self.default, tuple):
            names = list(value or ())
            bad = [n for n in names if not (isinstance(n, str) and CAMERA_NAME.fullmatch(n))]
            if bad:
                return (f"{self.name}: {', '.join(repr(n) for n in bad)} is not a valid name "
                        f"(a letter, then letters, digits or _)")
            if len(set(names)) != len(names):
                return f"{self.name}: names must be distinct; got {names}"
            return None
        if self.choices and value not in self.choices:
            return f"{self.name} must be one of {', '.join(self.choices)}; got '{value}'"
        if self.lo is not None and not self.lo <= value <= self.hi:
            return f"{self.name} must be in [{self.lo}, {self.hi}]; got {value}"
        return None


LIFECYCLE, MODEL, IMAGES, GENERATION, REQUESTS, CONTINUOUS = (
    "lifecycle",
    "model",
    "images",
    "generation",
    "requests",
    "continuous",
)

PARAMS: tuple[Param, ...] = (
    # --- lifecycle
    Param("autostart", True, "Configure (load the model) and activate at start-up, as a plain "
          "node does. false: the node waits, unconfigured, for lifecycle transitions "
          "(ros2 lifecycle set /internvl configure, then activate).", LIFECYCLE,
          read_only=True),
    # --- model and backend: read at start-up only (restart the node to change them)
    Param("model_dir", "", "Model directory (docs/MODEL_DIR.md): the onnxruntime export or the "
          "Axera download. Required.", MODEL, read_only=True),
    Param("backend", "onnxruntime", "Inference backend: onnxruntime (any PC) or axengine "
          "(AX650N NPU).", MODEL, read_only=True, choices=BACKENDS),
    Param("provider", "", "Backend provider; empty picks the default (onnxruntime: "
          "CPUExecutionProvider; axengine: AxEngineExecutionProvider, or "
          "AXCLRTExecutionProvider for an M.2 card).", MODEL, read_only=True),
    Param("num_threads", 0, "onnxruntime intra-op threads; 0 lets onnxruntime choose.", MODEL,
          read_only=True, lo=0, hi=256),
    Param("max_tiles", 1, "Most 448x448 tiles per image (InternVL dynamic tiling, plus a "
          "thumbnail when > 1); each tile costs 256 prompt tokens and one ViT run.", MODEL,
          read_only=True, lo=1, hi=12),
    Param("kv_feed", "auto", "How the NPU layers get the KV cache (axengine): rows writes only "
          "the new rows into pyaxengine's input buffers, self-checked against full; full copies "
          "the whole cache every token; auto uses rows where it works. /diagnostics shows the "
          "mode in use and why.", MODEL, read_only=True, choices=KV_FEEDS),
    Param("device_id", -1, "Axera M.2 card (AXCLRTExecutionProvider) to run on; -1 uses the "
          "default device (the board's NPU, or the first card).", MODEL, read_only=True, lo=-1,
          hi=255),
    Param("frame_cache_mb", 64, "Memory (MiB) for the vision embeddings of recent frames (at "
          "most the latest two of each camera), so a later request on a frame already encoded "
          "skips the ViT (1 MiB per tile for InternVL3.5-1B); 0 turns it off.", MODEL,
          read_only=True, lo=0, hi=4096),
    # --- image intake: read at start-up only
    Param("image_transport", "raw", "raw subscribes to 'image' (sensor_msgs/Image); compressed "
          "to 'image/compressed' (sensor_msgs/CompressedImage, jpeg or png).", IMAGES,
          read_only=True, choices=TRANSPORTS),
    Param("cameras", (), "Camera names, e.g. [front, rear]: one node serves several cameras, "
          "subscribing to <name>/image (or <name>/image/compressed), each with its own latest "
          "frame, staleness and QoS; a request picks one by name (empty: the first). Empty (the "
          "default): one camera on 'image'.", IMAGES, read_only=True),
    Param("qos_reliability", "auto", "Image subscription reliability: auto matches the "
          "publishers on the topic (and re-checks when they change); reliable; best_effort.",
          IMAGES, read_only=True, choices=RELIABILITIES),
    Param("qos_depth", 1, "Image subscription queue depth (only the latest frame is kept).",
          IMAGES, read_only=True, lo=1, hi=100),
    Param("max_image_dim", 4096, "Frames wider or taller than this (pixels) are dropped as "
          "over-large.", IMAGES, lo=16, hi=16384),
    Param("no_frame_warn_after", 5.0, "Seconds with publishers on the image topic but no frame "
          "received before a warning about QoS/transport is logged; 0 disables it.", IMAGES,
          lo=0.0, hi=3600.0),
    Param("publish_annotated", False, "Publish each described frame with its caption and boxes "
          "drawn (sensor_msgs/Image bgr8, the source frame's header) on ~/annotated_image, or "
          "~/<camera>/annotated_image per named camera. Drawn off the intake path, only while "
          "someone subscribes.", IMAGES, read_only=True),
    # --- generation: may change at run time (apply to the next request)
    Param("default_prompt", "Describe what is in front of the robot in one sentence.",
          "Prompt used when a request's prompt is empty, and by continuous mode.", GENERATION),
    Param("system_prompt", "", "System prompt; empty uses the model's default.", GENERATION),
    Param("max_new_tokens", 64, "Most tokens generated per caption (a request may override "
          "it).", GENERATION, lo=1, hi=2048),
    Param("temperature", 0.0, "Sampling temperature; 0 is greedy.", GENERATION, lo=0.0, hi=5.0),
    Param("top_k", 0, "Keep the k most likely tokens; 0 disables.", GENERATION, lo=0,
          hi=1000000),
    Param("top_p", 1.0, "Nucleus sampling mass; 1 disables.", GENERATION, lo=0.001, hi=1.0),
    Param("repetition_penalty", 1.0, "Penalty on tokens already generated; 1 disables.",
          GENERATION, lo=1.0, hi=5.0),
    Param("seed", -1, "Sampling seed; -1 draws a new one per request.", GENERATION, lo=-1,
          hi=2**31 - 1),
    # --- requests: may change at run time
    Param("max_frame_age", 5.0, "Seconds since the latest frame arrived beyond which it is "
          "stale and a request fails; 0 accepts any age. A request may override it.", REQUESTS,
          lo=0.0, hi=86400.0),
    Param("max_queue", 2, "Requests that may wait while one generation runs; past that, "
          "requests are refused at once as busy.", REQUESTS, lo=0, hi=32),
    Param("request_timeout", 60.0, "Seconds a request may take, queueing included, before it "
          "fails (a running generation is cancelled); 0 waits forever.", REQUESTS, lo=0.0,
          hi=3600.0),
    Param("stuck_after", 120.0, "Seconds a generation may go without progress (no token, no "
          "step) before the backend counts as stuck: /diagnostics turns ERROR and requests are "
          "refused at once until it moves again; 0 never.", REQUESTS, lo=0.0, hi=3600.0),
    # --- continuous mode: may change at run time
    Param("caption_rate_hz", 0.0, "Caption the latest frame this many times a second with "
          "default_prompt (only when idle and the frame is new); 0 turns it off.", CONTINUOUS,
          lo=0.0, hi=10.0),
)

BY_NAME: dict[str, Param] = {p.name: p for p in PARAMS}
PARAM_NAMES: tuple[str, ...] = tuple(BY_NAME)
# The queue bound's ceiling sizes the executor's thread pool (each waiting request holds a thread).
MAX_QUEUE_LIMIT = int(BY_NAME["max_queue"].hi)


def descriptor(p: Param):
    """The rcl_interfaces ParameterDescriptor for ``p``."""
    from rcl_interfaces.msg import (
        FloatingPointRange,
        IntegerRange,
        ParameterDescriptor,
        ParameterType,
    )

    kind = {
        tuple: ParameterType.PARAMETER_STRING_ARRAY,
        bool: ParameterType.PARAMETER_BOOL,
        str: ParameterType.PARAMETER_STRING,
        int: ParameterType.PARAMETER_INTEGER,
        float: ParameterType.PARAMETER_DOUBLE,
    }[type(p.default)]
    text = p.description
    if p.choices:
        text += f" One of: {', '.join(p.choices)}."
    if p.read_only:
        text += " Read-only: set at start-up."
    d = ParameterDescriptor(name=p.name, type=kind, description=text, read_only=p.read_only)
    if p.choices:
        d.additional_constraints = "one of: " + ", ".join(p.choices)
    if isinstance(p.default, tuple):
        d.additional_constraints = "distinct names: a letter, then letters, digits or _"
        # rclpy infers an empty list's type as a byte array: typed dynamically, the default []
        # and a string array from a params file are both accepted (check() checks the items)
        d.dynamic_typing = True
    elif isinstance(p.default, bool):
        d.additional_constraints = "true or false"
    elif isinstance(p.default, int):
        d.integer_range = [IntegerRange(from_value=int(p.lo), to_value=int(p.hi), step=0)]
    elif isinstance(p.default, float):
        d.floating_point_range = [
            FloatingPointRange(from_value=float(p.lo), to_value=float(p.hi), step=0.0)
        ]
    else:
        d.additional_constraints = d.additional_constraints or "any string"
    return d


def declare_all(node) -> None:
    """Declare every parameter on ``node`` (values from --params-file override the defaults)."""
    node.declare_parameters("", [
        (p.name, list(p.default) if isinstance(p.default, tuple) else p.default, descriptor(p))
        for p in PARAMS])


def value(node, name: str):
    """The parameter's value (a string array as a tuple)."""
    v = node.get_parameter(name).value
    return tuple(v or ()) if isinstance(BY_NAME[name].default, tuple) else v


def check_values(values: dict) -> list[str]:
    """Problems with a {name: value} mapping (choices and ranges); empty when all are fine."""
    problems = []
    for name, value in values.items():
        p = BY_NAME.get(name)
        if p is not None and (why := p.check(value)) is not None:
            problems.append(why)
    return problems
