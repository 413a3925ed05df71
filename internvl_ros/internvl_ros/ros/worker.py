"""One thread that owns the pipeline and runs one generation at a time from a bounded queue.

No rclpy here. A ``Job`` carries everything its generation needs: the chosen image (a source
that decodes itself), the GenerationConfig, and the callback that publishes a finished caption.
The worker never reaches back into the node. Handlers ``submit`` a job (refused at once when
the queue is full) and wait on it; the worker (or the handler, on timeout or cancel) finishes it
exactly once. Continuous-mode jobs never hold a slot a request wants: a request cancels a
running continuous caption and replaces a queued one.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from internvl_ros.core.errors import BackendError, InternVLError
from internvl_ros.core.grounding import (
    GROUNDING_TOKENS,
    Box,
    Grounding,
    decode_with_markup,
    has_markup,
    parse_grounding,
)
from internvl_ros.core.pipeline import Timings
from internvl_ros.core.prompt import locate_question

CONTINUOUS = "continuous"  # Request.source of continuous-mode jobs
SHUTTING_DOWN = "the node is shutting down"


class RequestError(Exception):
    """A request that cannot be served (no frame, stale frame, bad image); the message says why."""


@dataclass
class Outcome:
    """What a request gets back. Exactly one per job."""

    success: bool
    message: str
    text: str = ""
    finish_reason: str = ""
    header: object = None  # std_msgs/Header of the described image
    timings: Timings = field(default_factory=Timings)  # the core's, end to end (see _run)
    refused: bool = False  # busy: never queued
    detections: tuple[Box, ...] = ()  # grounded boxes in source pixels (text has no markup)
    malformed: int = 0  # grounding spans that could not be read
    camera: str = ""  # the camera the frame came from ("" for a request's own image)
    #: the described frame (rgb), kept for the caption callback only (annotated image); the
    #: worker drops it once the caption is published
    image: object = field(default=None, repr=False)
    choice_index: int = -1  # with choices: the index of the chosen one

    @classmethod
    def fail(cls, message: str, header=None, **kw) -> Outcome:
        return cls(False, message, header=header, **kw)


class ImageSource(Protocol):
    """The image a job describes: a frame the node received, or the request's own image."""

    def decode(self, max_dim: int) -> tuple:
        """(rgb (h, w, 3) uint8, std_msgs/Header); raises RequestError saying why not."""

    camera: str  # the camera it came from; "" for a request's own image


@dataclass
class Request:
    """A generation to run, with everything it needs (nothing is looked up later)."""

    prompt: str
    system_prompt: str | None
    config: object  # core GenerationConfig (max_new_tokens already within the parameter range)
    image: ImageSource
    source: str  # "service", "action" or "continuous"
    max_image_dim: int = 4096
    on_delta: Callable[[str, str, int], None] | None = None  # (text so far, delta, n tokens)
    arrival: float = field(default_factory=time.monotonic)
    locate: str = ""  # a checked phrase: the question is InternVL's grounding prompt for it
    frame_key: object = None  # a received frame's identity (the pipeline's frame cache), or None
    # another kind of job than one caption (ros/ask.py): (pipeline, job, rgb, header, convert_s,
    # logger) -> Outcome, run by the worker on the decoded image
    run: Callable[..., Outcome] | None = None


class CancelFlag(threading.Event):
    """A job's cancel flag: an Event whose ``set()`` also calls the ``on_set`` callbacks (a job
    that blocks in the model between tokens, like an Ask, stops through one)."""

    def __init__(self):
        super().__init__()
        self._callbacks: list[Callable[[], None]] = []
        self._callbacks_lock = threading.Lock()

    def on_set(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when the flag is set (now, if it is set already)."""
        with self._callbacks_lock:
            self._callbacks.append(callback)
        if self.is_set():
            callback()

    def set(self) -> None:
        super().set()
        with self._callbacks_lock:
            callbacks = list(self._callbacks)
        for callback in callbacks:
            callback()


class Job:
    """A submitted request. ``finish`` is first-wins, so every job gets exactly one outcome.

    The worker ``claim``s a job before publishing its caption: from then on only the worker's
    ``finish(..., claimed=True)`` counts, so a timeout cannot fail a job whose caption went out.
    """

    def __init__(self, request: Request, on_caption: Callable[[Job, Outcome], None] | None = None):
        self.request = request
        self.on_caption = on_caption  # publishes a finished caption (worker thread)
        self.cancel = CancelFlag()
        self.started = False
        self.outcome: Outcome | None = None
        self._claimed = False
        self._done = threading.Event()
        self._lock = threading.Lock()

    def claim(self) -> bool:
        """Reserve the outcome for the caller (the worker); False if it is set or reserved."""
        with self._lock:
            if self.outcome is not None or self._claimed:
                return False
            self._claimed = True
            return True

    def finish(self, outcome: Outcome, claimed: bool = False) -> bool:
        """Set the outcome unless one is set (or claimed by someone else); True when set."""
        with self._lock:
            if self.outcome is not None or (self._claimed and not claimed):
                return False
            self.outcome = outcome
        self._done.set()
        return True

    def wait(self, timeout: float | None) -> bool:
        return self._done.wait(timeout)

    @property
    def done(self) -> bool:
        return self._done.is_set()


def clamp_to_context(pipeline, config):
    """max_new_tokens within the context: a uint32 from a request must not size buffers.

    The generation still ends with finish_reason "context" when the prompt leaves less.
    """
    limit = getattr(pipeline, "max_context", None)
    if isinstance(limit, int) and config.max_new_tokens > limit:
        return replace(config, max_new_tokens=limit)
    return config


class InferenceWorker:
    """Runs jobs one at a time on its own thread.

    ``job.on_caption(job, outcome)`` is called on the worker thread for every finished caption
    (not for failures or cancelled generations), before the job is finished: it publishes.
    ``when_idle()``, if given, is called on the worker thread each time a job has ended and no
    other waits (the node gives glibc's free memory back there: ``allocator.Trimmer``).
    """

    def __init__(self, pipeline, logger, when_idle: Callable[[], None] | None = None):
        self.pipeline = pipeline
        self._log = logger
        self._when_idle = when_idle
        self._queue: deque[Job] = deque()
        self._current: Job | None = None
        self._cond = threading.Condition()
        self._stopping = False
        self._stop_reason = SHUTTING_DOWN
        self._beat: float | None = None  # last progress of the running job (None: idle)
        self._thread = threading.Thread(target=self._loop, name="internvl-worker", daemon=True)
        self._thread.start()

    # --- called from handlers and timers

    def submit(self, job: Job, max_queue: int, only_if_idle: bool = False) -> Outcome | None:
        """Queue ``job``; None, or the outcome that refuses it (busy, or shutting down).

        ``max_queue`` requests may wait while one generation runs.

        A request (any source but continuous) first pre-empts continuous mode: a running
        continuous caption is cancelled (it stops before its next token) and does not count
        toward the bound; a queued one is dropped. ``only_if_idle`` refuses unless nothing runs
        or waits (continuous mode uses it, so it never takes a slot from a request).
        """
        with self._cond:
            if self._stopping:
                return Outcome.fail(self._stop_reason)
            if only_if_idle and (self._current is not None or self._queue):
                return Outcome.fail("busy: not idle", refused=True)
            if job.request.source != CONTINUOUS:
                self._preempt_continuous()
            cur = self._current
            running = cur is not None and cur.request.source != CONTINUOUS  # that one stops
            if len(self._queue) + running >= 1 + max_queue:
                return Outcome.fail(
                    f"busy: {int(running)} generation running and {len(self._queue)} request(s) "
                    f"waiting (max_queue {max_queue}); try again later",
                    refused=True,
                )
            self._queue.append(job)
            self._cond.notify()
            return None

    def _preempt_continuous(self) -> None:
        """Cancel continuous-mode work so a request gets the pipeline (called under the lock)."""
        for queued in [j for j in self._queue if j.request.source == CONTINUOUS]:
            self._queue.remove(queued)
            queued.finish(Outcome.fail("pre-empted by a request", finish_reason="cancelled"))
        cur = self._current
        if cur is not None and cur.request.source == CONTINUOUS and not cur.cancel.is_set():
            cur.cancel.set()  # stops before its next token; a cancelled caption is not published
            self._log.debug("a request pre-empted the running continuous caption")

    def withdraw(self, job: Job) -> bool:
        """Take a job out of the queue if it has not started; True when it was withdrawn."""
        with self._cond:
            try:
                self._queue.remove(job)
                return True
            except ValueError:
                return False

    def beat(self) -> None:
        """The running job made progress (a token, a model step)."""
        self._beat = time.monotonic()

    def stuck_for(self) -> float:
        """Seconds the running job has made no progress (its start, or the pipeline's last
        generation step, whichever is later); 0 when idle. A step that hangs in the backend
        cannot be interrupted from Python: this is how the node notices one."""
        beat = self._beat
        if beat is None:
            return 0.0
        step = getattr(self.pipeline, "last_step", None)
        if isinstance(step, float) and step > beat:
            beat = step
        return max(0.0, time.monotonic() - beat)

    def idle(self) -> bool:
        with self._cond:
            return self._current is None and not self._queue

    def state(self) -> tuple[str, int]:
        """('idle' | 'generating' | 'stopped', number waiting)."""
        with self._cond:
            if self._stopping:
                return "stopped", len(self._queue)
            return ("generating" if self._current else "idle"), len(self._queue)

    def stop(self, reason: str = SHUTTING_DOWN) -> None:
        """Fail everything queued and cancel the running generation; does not wait (see join).

        Every job gets its outcome now (``reason``), except one whose caption the worker is
        publishing at this moment (it keeps its caption).
        """
        with self._cond:
            self._stopping = True
            self._stop_reason = reason
            pending = list(self._queue)
            self._queue.clear()
            if self._current is not None:
                pending.append(self._current)
                self._current.cancel.set()  # stops before the next token
            self._cond.notify_all()
        for job in pending:
            job.finish(Outcome.fail(reason))

    def join(self, timeout: float | None) -> bool:
        """Wait for the worker thread to exit (after stop); True when it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # --- the worker thread

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._queue.popleft()
                self._current = job
                job.started = True
                self.beat()
            try:
                self._serve(job)
            except BaseException as e:  # a bug must not kill the worker: every job is answered
                self._log.error(f"internal error serving a request: {e!r}\n"
                                f"{traceback.format_exc()}")
                job.finish(Outcome.fail(f"internal error: {type(e).__name__}: {e}"),
                           claimed=True)
            finally:
                job = None  # don't keep the last job (and its frame) alive while idle
                with self._cond:
                    self._current = None
                    self._beat = None
                    idle = not self._queue and not self._stopping
            if idle and self._when_idle is not None:
                try:
                    self._when_idle()
                except Exception as e:  # housekeeping must not stop the worker
                    self._log.warning(f"after a request: {e!r}")

    def _serve(self, job: Job) -> None:
        if job.cancel.is_set() or job.done:
            job.finish(Outcome.fail("cancelled before generation started",
                                    finish_reason="cancelled"))
            return
        outcome = self._run(job)
        is_caption = outcome.success and outcome.finish_reason != "cancelled"
        if is_caption and job.claim():  # not timed out meanwhile, and now it cannot be
            try:
                if job.on_caption is not None:
                    job.on_caption(job, outcome)
            except Exception as e:  # publishing must not fail the request
                self._log.error(f"publishing a caption failed: {e}")
            outcome.image = None  # the frame is not kept beyond its caption
            job.finish(outcome, claimed=True)
        else:
            outcome.image = None
            job.finish(outcome)

    def _run(self, job: Job) -> Outcome:
        req = job.request
        header = None
        t_first = None
        try:
            t0 = time.monotonic()
            rgb, header = req.image.decode(req.max_image_dim)
            convert_s = time.monotonic() - t0
            if req.run is not None:
                return req.run(self.pipeline, job, rgb, header, convert_s, self._log)
            question = (locate_question(getattr(self.pipeline, "tokenizer", None), req.locate)
                        if req.locate else req.prompt)
            gen = self.pipeline.generate(question, images=[rgb], system_prompt=req.system_prompt,
                                         config=clamp_to_context(self.pipeline, req.config),
                                         frame_key=req.frame_key)
            try:
                text, n = "", 0
                for step in gen:
                    if t_first is None:
                        t_first = time.monotonic()
                    n += 1
                    text += step.text_delta
                    if req.on_delta is not None and not job.cancel.is_set():
                        req.on_delta(text, step.text_delta, n)
                    if job.cancel.is_set():
                        gen.cancel()  # takes effect before the next token
                res = gen.result
            finally:
                if not gen.finished:  # never leave the pipeline busy (e.g. feedback failed)
                    gen.close()
        except RequestError as e:
            return Outcome.fail(str(e), header=header)
        except BackendError as e:  # the core wrapped the backend's failure (and reset its cache)
            return self._backend_failed(e, str(e), header)
        except InternVLError as e:  # prompt too long, bad image, model contract...
            return Outcome.fail(f"{type(e).__name__}: {e}", header=header)
        except Exception as e:  # a backend error the core did not wrap
            return self._backend_failed(e, f"{type(e).__name__}: {e}", header)
        t_end = time.monotonic()
        # end to end, as the caller sees it: from the request's arrival (queue wait included)
        timings = replace(
            res.timings,
            preprocess_s=res.timings.preprocess_s + convert_s,
            ttft_s=(t_first - req.arrival) if t_first is not None else 0.0,
            total_s=t_end - req.arrival,
            generated_tokens=len(res.token_ids),
            prompt_tokens=len(res.prompt_token_ids),
        )
        cancelled = res.finish_reason == "cancelled"
        grounding = self._ground(res, rgb)
        return Outcome(
            success=True,
            message="cancelled" if cancelled else "ok",
            text=grounding.text,
            finish_reason=res.finish_reason,
            header=header,
            timings=timings,
            detections=grounding.boxes,
            malformed=grounding.malformed,
            camera=getattr(req.image, "camera", ""),
            image=rgb,
            choice_index=res.choice_index,
        )

    def _ground(self, res, rgb) -> Grounding:
        """The answer split into text and boxes in pixels of ``rgb`` (the source frame): the
        tags are decoded from the token ids when the tokenizer's plain decoding drops them. An
        answer without markup is left exactly as generated."""
        text = res.text
        tokenizer = getattr(self.pipeline, "tokenizer", None)
        if tokenizer is not None and has_markup(tokenizer, res.token_ids):
            text = decode_with_markup(tokenizer, res.token_ids)
        if not any(tag in text for tag in GROUNDING_TOKENS):
            return Grounding(res.text, (), 0)
        h, w = rgb.shape[:2]
        return parse_grounding(text, w, h)

    def _backend_failed(self, e: BaseException, what: str, header) -> Outcome:
        self._log.error(f"generation failed: {what}\n{traceback.format_exc()}")
        self._reset()
        return Outcome.fail(f"backend error: {what}", header=header)

    def _reset(self) -> None:
        """Drop any state a failed generation left behind. The core's Generation already resets
        the KV cache when a step fails; a pipeline-level reset() is called too if it has one."""
        reset = getattr(self.pipeline, "reset", None)
        if callable(reset):
            try:
                reset()
            except Exception as e:
                self._log.error(f"resetting the pipeline failed: {e!r}")
