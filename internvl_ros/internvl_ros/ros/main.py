"""Console script ``internvl_node``: start the node, spin it, stop it cleanly on a signal.

Exit 0 on Ctrl-C/SIGTERM, 1 on a fatal start-up error (invalid parameters, and with
``autostart: true`` a model that fails to load: the reason is logged).
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time

import rclpy
import rclpy.logging
from rclpy.executors import ExternalShutdownException

from internvl_ros.core.errors import ConfigError
from internvl_ros.ros import allocator, compat, params
from internvl_ros.ros.node import NODE_NAME, SUCCESS, InternVLNode, ModelLoadError
from internvl_ros.ros.shutdown import (
    EXECUTOR_SHUTDOWN_S,
    MIN_WORKER_JOIN_S,
    SPIN_SLICE_S,
    STOP_BUDGET_S,
    graceful_stop,
)


def autostart(node: InternVLNode) -> None:
    """configure + activate, as a plain node starts; ModelLoadError if configure failed."""
    if node.trigger_configure() != SUCCESS:
        raise ModelLoadError(node.load_error or "the configure transition failed")
    if node.trigger_activate() != SUCCESS:
        raise ModelLoadError("the activate transition failed")


def main(args=None) -> int:
    """The main thread spins and owns the shutdown: a signal starts ``graceful_stop`` on its
    own thread, which answers every request and, once the answers are out, sets ``stopped``;
    the main thread then leaves the loop, shuts the executor down (it waits for callbacks still
    sending), destroys the node and releases the model once the worker has exited. A second
    signal skips the wait for the answers. All of it stays within STOP_BUDGET_S.
    """
    allocator.restart_tuned()  # returns, or runs this process again (same pid)
    malloc_line = allocator.tune()  # before rclpy starts any thread
    compat.init(args)
    node = None
    executor = None
    code = 0
    stopping = threading.Event()  # a signal arrived
    stopped = threading.Event()  # the answers are out (or a second signal): stop spinning
    t_signal = [math.inf]
    spinning = threading.Event()

    def on_signal(signum, frame):
        if not spinning.is_set():
            raise KeyboardInterrupt  # still starting (loading the model): stop now
        if stopping.is_set():
            stopped.set()  # a second signal: do not wait for the answers any longer
            return
        t_signal[0] = time.monotonic()
        stopping.set()
        threading.Thread(target=graceful_stop, args=(node, stopped), name="internvl-stop",
                         daemon=True).start()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        node = InternVLNode()
        node.get_logger().info(malloc_line)
        if node.get_parameter("autostart").value:
            autostart(node)
        else:
            node.get_logger().info("autostart is false: unconfigured, waiting for "
                                   "'ros2 lifecycle set' configure and activate")
        # each waiting request holds a thread: room for a full queue, the running request, the
        # image callback, the timers, the lifecycle services, and one more to refuse requests
        executor = compat.NodeExecutor(num_threads=params.MAX_QUEUE_LIMIT + 7)
        executor.add_node(node)
        spinning.set()
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
