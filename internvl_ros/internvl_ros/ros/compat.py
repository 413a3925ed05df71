"""The one door to rclpy differences: Humble, Jazzy and Kilted, and every private rclpy hook.

No other module of the package touches a private rclpy name or asks which distribution it runs
on. Each private hook is listed in ``HOOKS`` with the guarantee it gives; ``check(logger)`` runs
at start-up and logs one warning per missing hook, naming the guarantee that is lost (the node
still runs). ``missing_hooks()`` is what test_node_units.py asserts is empty on the installed
rclpy, so a rename in a new rclpy fails a test instead of silently weakening shutdown.

docs/NODE.md ("rclpy versions") lists each difference and how it was verified.
"""

from __future__ import annotations

import inspect
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import rclpy
from rclpy.action import ActionServer
from rclpy.executors import MultiThreadedExecutor
from rclpy.service import Service

try:  # public from Jazzy on
    from rclpy.exceptions import InvalidHandle
except ImportError:  # Humble: only the C extension names it
    from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy

    InvalidHandle = _rclpy.InvalidHandle


# ---------------------------------------------------------------------------------------------
# the private hooks, checked at start-up


@dataclass(frozen=True)
class Hook:
    owner: type
    name: str
    lost: str  # the guarantee that is lost without it
    instance: bool = False  # an attribute __init__ sets, rather than a method of the class

    @property
    def present(self) -> bool:
        if not self.instance:
            return callable(getattr(self.owner, self.name, None))
        assigned = re.compile(rf"self\.{self.name}\s*(:[^=\n]*)?=[^=]")
        for cls in self.owner.__mro__:  # "self.<name> = ..." in some __init__ of the hierarchy
            try:
                if assigned.search(inspect.getsource(vars(cls)["__init__"])):
                    return True
            except (KeyError, OSError, TypeError):
                continue
        return False

    def __str__(self) -> str:
        return f"{self.owner.__module__}.{self.owner.__name__}.{self.name}"


_RESULT_WAIT = ("shutdown does not wait for action results to be sent (a client may miss the "
                "result of a goal that ended as the node stopped)")
HOOKS: tuple[Hook, ...] = (
    Hook(MultiThreadedExecutor, "_take_subscription",
         "on Humble, a take racing a re-subscription (auto QoS, deactivate) can end spin() "
         "with InvalidHandle (rclpy#1150, fixed from Jazzy on)"),
    Hook(MultiThreadedExecutor, "_futures",
         "errors of callbacks that end after shutdown are printed as 'never retrieved'",
         instance=True),
    Hook(ActionServer, "_execute_get_result_request", _RESULT_WAIT),
    Hook(ActionServer, "_send_result_response", _RESULT_WAIT),
    Hook(ActionServer, "_goal_handles", _RESULT_WAIT, instance=True),
    Hook(Service, "send_response", "shutdown does not wait for service responses to be sent"),
)


def missing_hooks() -> list[Hook]:
    """The private hooks this rclpy lacks."""
    return [h for h in HOOKS if not h.present]


def check(logger) -> list[Hook]:
    """Log one warning per missing hook (what is lost); returns them. Call once at start-up."""
    missing = missing_hooks()
    for hook in missing:
        logger.warning(f"this rclpy has no {hook}: {hook.lost}")
    return missing


# ---------------------------------------------------------------------------------------------
# public API that differs between distributions


def init(args=None) -> None:
    """rclpy.init without rclpy's signal handlers (main installs its own graceful ones).

    ``SignalHandlerOptions`` exists on Humble, Jazzy and Kilted; an older rclpy keeps its own.
    """
    try:
        from rclpy.signals import SignalHandlerOptions

        rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    except (ImportError, TypeError):
        rclpy.init(args=args)


def _rclpy_default_result_timeout() -> float:
    try:
        p = inspect.signature(ActionServer.__init__).parameters["result_timeout"]
        return float(p.default)
    except (KeyError, TypeError, ValueError):
        return 10.0


# How long the action server keeps a finished goal (its request and result) for a late client.
RESULT_KEEP_S = 30
# rclpy's own default tells the distribution apart: 900 s on Humble, 10 s from Jazzy on
# (rclpy#1171), where rcl also counts result_timeout from the goal's *end* (rcl#1121). Humble's
# rcl counts it from the goal's *acceptance*: a goal that outlives it is expired as it finishes,
# which can lose its result or raise inside rclpy. There we keep 900 s and end an action goal
# before it (``ACTION_MAX_S``); the request images are dropped after every goal either way.
RESULT_TIMEOUT_FROM_ACCEPTANCE = _rclpy_default_result_timeout() >= 900
ACTION_RESULT_TIMEOUT_S = 900 if RESULT_TIMEOUT_FROM_ACCEPTANCE else RESULT_KEEP_S
ACTION_MAX_S = ACTION_RESULT_TIMEOUT_S - RESULT_KEEP_S if RESULT_TIMEOUT_FROM_ACCEPTANCE else None


def resolve_topic(node, name: str, only_expand: bool = False) -> str:
    """Node.resolve_topic_name (expansion + remapping; Humble has it too), or plain expansion
    on an rclpy without it."""
    resolve = getattr(node, "resolve_topic_name", None)
    if resolve is not None:
        return resolve(name, only_expand=only_expand)
    from rclpy.expand_topic_name import expand_topic_name

    return expand_topic_name(name, node.get_name(), node.get_namespace())


# ---------------------------------------------------------------------------------------------
# the hooks themselves


class NodeExecutor(MultiThreadedExecutor):
    """A MultiThreadedExecutor that skips a subscription destroyed after it was found ready.

    The node re-subscribes (auto QoS, lifecycle deactivate) while spinning. Humble's executor
    then races: a take scheduled for the old subscription can run after it was destroyed, and
    raises InvalidHandle before the callback group is released, so the exception ends spin()
    and the group stays locked. rclpy#1150 fixed it from Jazzy on (catching it there); the
    Humble backport (#1610) is open. Same signature on both: Humble returns the message, newer
    rclpy a coroutine; None means "nothing to do" to both.
    """

    def _take_subscription(self, sub):
        try:
            return super()._take_subscription(sub)
        except InvalidHandle:
            return None

    def wait_for_ready_callbacks(self, *args, **kwargs):
        """Jazzy (rclpy 7.1.6): building the wait set, a destroyed subscription's QoS event
        handler (a waitable collected just before) raises InvalidHandle in add_to_wait_set, out
        of spin_once, which ended the node. Nothing was started then: wait again on a new wait
        set."""
        while True:
            try:
                return super().wait_for_ready_callbacks(*args, **kwargs)
            except InvalidHandle:
                continue  # the failed generator is done; the next call builds a new one

    def collect_late_errors(self) -> list:
        """After shutdown: fetch the errors of callbacks that ended after the last spin_once.

        Kilted's shutdown destroys its guard condition without waiting for running callbacks
        (it ignores timeout_sec), and a callback that triggers the guard afterwards fails with
        InvalidHandle. Harmless, but rclpy prints every error nobody fetched when it is garbage
        collected ("The following exception was never retrieved"); fetch them instead.
        """
        errors = []
        for f in list(getattr(self, "_futures", ())):
            if f.done() and f.exception() is not None:
                errors.append(f.exception())
        return errors


class Pending:
    """Counts answers not yet sent, so shutdown can wait until they are out.

    A service request counts until its response was sent; an action goal while its execute
    callback runs, and its result from the client's result request until rclpy sent it.
    """

    def __init__(self):
        self._n = 0
        self._cond = threading.Condition()

    def add(self) -> None:
        with self._cond:
            self._n += 1

    def done(self) -> None:
        with self._cond:
            self._n = max(0, self._n - 1)
            self._cond.notify_all()

    @contextmanager
    def held(self):
        self.add()
        try:
            yield
        finally:
            self.done()

    def wait_idle(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._n == 0, timeout)

    @property
    def count(self) -> int:
        with self._cond:
            return self._n


class CountingActionServer(ActionServer):
    """ActionServer that reports result responses it still has to send to ``pending``.

    rclpy sends a result from a task the executor runs *after* the goal's execute callback
    returned; shutdown must keep spinning until then. The two hooks are private methods with
    the same signature on Humble and newer rclpy (HOOKS; checked at start-up).
    """

    def __init__(self, *args, pending: Pending, **kwargs):
        self._pending = pending
        super().__init__(*args, **kwargs)

    async def _execute_get_result_request(self, request_header_and_message):
        goal_uuid = bytes(request_header_and_message[1].goal_id.uuid)
        counted = goal_uuid in getattr(self, "_goal_handles", {})  # else answered at once
        if counted:
            self._pending.add()
        try:
            await super()._execute_get_result_request(request_header_and_message)
        except BaseException:
            if counted:
                self._pending.done()
            raise

    def _send_result_response(self, request_header, future):
        try:
            super()._send_result_response(request_header, future)
        finally:
            self._pending.done()


def create_counting_service(node, srv_type, name: str, callback, pending: Pending,
                            callback_group=None):
    """``node.create_service`` whose requests count in ``pending`` from the start of
    ``callback`` until their response has been sent, or until ``callback`` raised (then no
    response is sent); the service's counterpart of CountingActionServer."""

    def counted(request, response):
        pending.add()
        try:
            return callback(request, response)
        except BaseException:
            pending.done()  # no response will be sent
            raise

    service = node.create_service(srv_type, name, counted, callback_group=callback_group)
    count_service_responses(service, pending)
    return service


def count_service_responses(service, pending: Pending) -> None:
    """Report each response ``service`` sends to ``pending`` (its callback called add()).

    The executor sends a service response after the callback returned (Humble to Kilted call
    ``Service.send_response``); counting until then lets shutdown wait for the send itself
    rather than rely on Executor.shutdown, which does not wait for running callbacks on every
    distribution.
    """
    send = service.send_response

    def send_response(response, header):
        try:
            return send(response, header)
        finally:
            pending.done()

    service.send_response = send_response
