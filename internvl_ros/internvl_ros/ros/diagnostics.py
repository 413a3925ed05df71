"""Counters the node keeps, and the diagnostic_msgs/DiagnosticArray it publishes at 1 Hz."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Stats:
    """Thread-safe counters and last values: ``bump``/``set`` to update, ``snapshot`` to read."""

    frames_received: int = 0
    frames_dropped: int = 0
    requests_served: int = 0
    requests_refused: int = 0
    requests_failed: int = 0
    requests_cancelled: int = 0
    continuous_captions: int = 0
    grounding_malformed: int = 0  # <ref>/<box> spans in answers that could not be read
    last_ttft_s: float = 0.0
    last_tokens_per_s: float = 0.0
    last_error: str = ""
    dropped_by_kind: Counter = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def bump(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def drop(self, kind: str, error: str) -> None:
        with self._lock:
            self.frames_dropped += 1
            self.dropped_by_kind[kind] += 1
            self.last_error = error

    def set(self, **values) -> None:
        with self._lock:
            for k, v in values.items():
                setattr(self, k, v)

    def snapshot(self) -> dict:
        with self._lock:
            out = {k: v for k, v in vars(self).items() if not k.startswith("_")}
            out["dropped_by_kind"] = dict(self.dropped_by_kind)
            return out


class Period:
    """What went wrong since the previous status: frames dropped, requests failed."""

    def __init__(self):
        self._last: dict = {}

    def warnings(self, stats: dict) -> list[str]:
        out = []
        dropped = stats["frames_dropped"] - self._last.get("frames_dropped", 0)
        if dropped > 0:
            kinds = ", ".join(f"{k} {n - self._last.get('dropped_by_kind', {}).get(k, 0)}"
                              for k, n in sorted(stats["dropped_by_kind"].items())
                              if n > self._last.get("dropped_by_kind", {}).get(k, 0))
            out.append(f"{dropped} bad frame(s) dropped since the last status ({kinds})")
        failed = stats["requests_failed"] - self._last.get("requests_failed", 0)
        if failed > 0:
            out.append(f"{failed} request(s) failed since the last status; last: "
                       f"{stats['last_error']}")
        self._last = stats
        return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def build_status(name: str, hardware_id: str, info: dict, stats: dict):
    """One DiagnosticStatus: OK when serving, WARN when the last thing that happened went wrong
    (no frames while publishers exist, dropped frames in the last period, a failed request),
    ERROR when something is broken now (`errors`: a stuck backend)."""
    from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

    level, message = DiagnosticStatus.OK, f"{info.get('state', '?')}"
    warnings = info.get("warnings") or []
    errors = info.get("errors") or []
    if errors:
        level, message = DiagnosticStatus.ERROR, "; ".join(errors + warnings)
    elif warnings:
        level, message = DiagnosticStatus.WARN, "; ".join(warnings)
    values = {**{k: v for k, v in info.items() if k not in ("warnings", "errors")}, **stats}
    dropped = values.pop("dropped_by_kind", {})
    for kind, n in sorted(dropped.items()):
        values[f"frames_dropped_{kind}"] = n
    kvs = [KeyValue(key=k, value=_fmt(v)) for k, v in values.items()]
    return DiagnosticStatus(
        level=level, name=name, message=message, hardware_id=hardware_id, values=kvs
    )


def build_array(stamp, statuses):
    from diagnostic_msgs.msg import DiagnosticArray

    arr = DiagnosticArray(status=list(statuses))
    arr.header.stamp = stamp
    return arr


class Throttle:
    """At most one log per ``period`` seconds per key; counts what it held back."""

    def __init__(self, period: float):
        self.period = period
        self._last: dict[str, float] = {}
        self._held: Counter = Counter()
        self._lock = threading.Lock()

    def __call__(self, key: str) -> int | None:
        """None to stay quiet; else how many logs of this key were suppressed since the last."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.period:
                self._held[key] += 1
                return None
            self._last[key] = now
            return self._held.pop(key, 0)
