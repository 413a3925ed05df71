"""A faulty backend double: wraps any backend's sessions and injects one kind of fault.

For fault-injection tests (test_faults.py): the onnxruntime backend and the axengine double
(`fake_axengine`) are wrapped the same way, so the core, the worker and the node meet the faults
a real NPU or runtime can produce.

    from internvl_ros.backends import faulty
    with faulty.installed(faulty.Fault("raise", at=17)) as handle:  # get_backend() wraps
        pipe = Pipeline.from_model_dir(model_dir)                    # every backend now
    handle.backends[0].calls                                         # session runs so far

Kinds (`Fault.kind`):

- ``raise``: the `at`-th session run (counted over all sessions of the backend, in order: ViT,
  prefill slices, decode layers, post) raises ``FaultInjected`` (a RuntimeError, what native
  runtimes raise);
- ``nan`` / ``inf``: the runs of the sessions whose path contains `where` (default ``post``,
  the final norm + lm_head: the logits) return NaN / +inf from the `at`-th call on;
- ``hang``: the `at`-th run blocks for `hang_s` seconds (``release()`` ends it early), then
  returns the real outputs: a stuck device that comes back, or never does within a test;
- ``load``: opening the `at`-th model file fails as the backends' own load failures do
  (``BackendError: <backend> could not load <path>: ...``); runs never fail.

`times` is how many hits (1: once, then the backend is healthy again; None: every one from `at`
on). ``Fault.random(kind, rng, calls)`` picks `at` at random among `calls` runs.
"""

from __future__ import annotations

import contextlib
import random
import threading
from dataclasses import dataclass, field

import numpy as np

from ..core.errors import BackendError

KINDS = ("raise", "nan", "inf", "hang", "load")


class FaultInjected(RuntimeError):
    """The error the ``raise`` fault injects (a plain RuntimeError to the code under test)."""


@dataclass
class Fault:
    kind: str
    at: int = 1  # 1-based: the run (or, for "load", the model file opened) hit first
    times: int | None = 1  # hits; None = every one from `at` on
    hang_s: float = 3600.0
    where: str | None = None  # nan/inf: sessions whose path contains this (default "post")
    _release: threading.Event = field(default_factory=threading.Event, repr=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {KINDS}")
        if self.at < 1:
            raise ValueError(f"at={self.at} must be >= 1")

    @classmethod
    def random(cls, kind: str, rng: random.Random, calls: int, **kw) -> Fault:
        """A fault at a random run among the first `calls` (a random step of a request)."""
        return cls(kind, at=rng.randint(1, max(1, calls)), **kw)

    def release(self) -> None:
        """End a hang now (and every later one)."""
        self._release.set()

    def hits(self, n: int) -> bool:
        """Whether the n-th counted event (1-based) is hit."""
        return n >= self.at and (self.times is None or n < self.at + self.times)


class FaultySession:
    """A Session that forwards to `inner` and injects the backend's fault into run()."""

    def __init__(self, inner, backend: FaultyBackend):
        self._inner = inner
        self._backend = backend
        self.path = inner.path
        self.dynamic_shapes = inner.dynamic_shapes
        self.num_shape_groups = inner.num_shape_groups
        self.closed = False

    def get_inputs(self, shape_group: int = 0):
        return self._inner.get_inputs(shape_group)

    def get_outputs(self, shape_group: int = 0):
        return self._inner.get_outputs(shape_group)

    def run(self, output_names, feed, shape_group: int = 0):
        fault = self._backend.fault
        kind = fault.kind
        if kind in ("nan", "inf"):
            if (fault.where or "post") not in str(self.path):
                return self._inner.run(output_names, feed, shape_group=shape_group)
            n = self._backend.count_target()
        elif kind == "load":
            return self._inner.run(output_names, feed, shape_group=shape_group)
        else:
            n = self._backend.count_run()
        if not fault.hits(n):
            return self._inner.run(output_names, feed, shape_group=shape_group)
        self._backend.hits += 1
        if kind == "raise":
            raise FaultInjected(f"injected fault at session run {n} ({self.path})")
        if kind == "hang":
            self._backend.hanging.set()
            try:
                fault._release.wait(fault.hang_s)
            finally:
                self._backend.hanging.clear()
            return self._inner.run(output_names, feed, shape_group=shape_group)
        outs = self._inner.run(output_names, feed, shape_group=shape_group)
        bad = np.nan if kind == "nan" else np.inf
        return [np.full_like(o, bad) if np.issubdtype(np.asarray(o).dtype, np.floating)
                else o for o in outs]

    def close(self) -> None:
        self.closed = True
        self._inner.close()


class FaultyBackend:
    """Wraps a Backend: `open` returns FaultySessions; counts opens, runs and hits."""

    def __init__(self, inner, fault: Fault):
        self._inner = inner
        self.fault = fault
        self.name = inner.name
        self.file_extension = inner.file_extension
        self.sessions: list[FaultySession] = []
        self.calls = 0  # session runs (all sessions)
        self.target_calls = 0  # runs of the nan/inf target sessions
        self.opens = 0
        self.hits = 0
        self.hanging = threading.Event()  # set while a run is stuck in a hang
        self._lock = threading.Lock()

    def count_run(self) -> int:
        with self._lock:
            self.calls += 1
            return self.calls

    def count_target(self) -> int:
        with self._lock:
            self.calls += 1
            self.target_calls += 1
            return self.target_calls

    def open(self, path: str, role: str | None = None) -> FaultySession:
        with self._lock:
            self.opens += 1
            n = self.opens
        if self.fault.kind == "load" and self.fault.hits(n):
            self.hits += 1
            raise BackendError(f"{self.name} could not load {path}: injected load failure "
                               "(faulty backend double)")
        session = FaultySession(self._inner.open(path, role=role), self)
        self.sessions.append(session)
        return session

    @property
    def open_sessions(self) -> list[FaultySession]:
        return [s for s in self.sessions if not s.closed]


@dataclass
class Installed:
    """What ``installed`` hands out: every FaultyBackend made while it was active."""

    fault: Fault
    backends: list[FaultyBackend] = field(default_factory=list)


@contextlib.contextmanager
def installed(fault: Fault):
    """Inside, ``internvl_ros.backends.get_backend`` wraps every backend it makes with `fault`
    (Pipeline.from_model_dir and the node's model loading go through it). Sessions opened
    inside keep the fault afterwards: call ``fault.release()`` so that no hang outlives a test."""
    from .. import backends

    original = backends.get_backend
    handle = Installed(fault)

    def get_backend(name: str, **options):
        wrapped = FaultyBackend(original(name, **options), fault)
        handle.backends.append(wrapped)
        return wrapped

    backends.get_backend = get_backend
    try:
        yield handle
    finally:
        backends.get_backend = original  # the sessions made inside keep their fault
