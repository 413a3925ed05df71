"""Stopping: every pending request answered exactly once, then the model released.

Two paths lead here: the lifecycle (cleanup releases the pipeline, shutdown answers everything
pending), and a signal (``main``: SIGINT/SIGTERM answer everything, wait until the answers went
out, stop spinning, release). Both are bounded so that ``ros2 launch``'s 5 s between SIGINT and
SIGTERM suffice.
"""

from __future__ import annotations

import threading

# Shutdown (SIGINT/SIGTERM): all within ros2 launch's 5 s between SIGINT and SIGTERM.
SPIN_SLICE_S = 0.1  # the main thread's spin_once timeout: how fast it notices the stop
ANSWER_WAIT_S = 1.5  # for the answers (service responses, action results) to go out
EXECUTOR_SHUTDOWN_S = 0.5  # for callbacks still running to end (the answers are out by then)
STOP_BUDGET_S = 4.5  # first signal to exit; the worker's join gets what is left of it
MIN_WORKER_JOIN_S = 0.5


class Release:
    """Stop one worker and release its pipeline once the worker has left it. Once; thread-safe.

    A ViT pass or a prefill cannot be interrupted, and closing sessions under a running model
    fails it (or worse, with native NPU sessions): if the worker is still running after the
    timeout, the sessions are left to the process exit.
    """

    def __init__(self, worker, logger):
        self.worker = worker
        self._log = logger
        self._lock = threading.Lock()
        self.started = False  # release() under way
        self._done = threading.Event()
        self.released = False

    def stop(self, reason: str | None = None) -> None:
        """Answer every queued and running job now (``reason``); returns at once."""
        if reason is None:
            self.worker.stop()
        else:
            self.worker.stop(reason)

    def __call__(self, timeout: float, reason: str | None = None) -> bool:
        """``stop``, wait for the worker thread (up to ``timeout``), close the pipeline.
        A second call waits (up to ``timeout``) for the first. True if released."""
        self.stop(reason)
        with self._lock:
            first, self.started = not self.started, True
        if not first:
            self._done.wait(timeout)
            return self.released
        try:
            if not self.worker.join(timeout):
                self._log.warning(
                    f"the model is still running {timeout:.1f} s after the stop (a ViT pass or "
                    f"prefill cannot be interrupted): its sessions are not released under it; "
                    f"the process exit frees them")
                return False
            close = getattr(self.worker.pipeline, "close", None)
            if callable(close):
                close()
            self.released = True
            return True
        finally:
            self._done.set()


def graceful_stop(node, stopped: threading.Event) -> None:
    """On SIGINT/SIGTERM (own thread): answer every request, wait until the answers are out
    (the main thread keeps spinning to send them), then let the main thread stop spinning."""
    node.stop_serving()  # waiting requests get "the node is shutting down"; generation cancelled
    if not node.wait_answers_sent(ANSWER_WAIT_S):
        node.get_logger().warning(f"some answers were not sent within {ANSWER_WAIT_S:g} s")
    stopped.set()
