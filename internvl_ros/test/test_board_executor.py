"""NodeExecutor survives an entity destroyed while it builds its wait set (seen on Jazzy).

The node re-subscribes (auto QoS) under the spinning executor. On Jazzy's rclpy 7.1.6 the old
subscription's QoS event handler, a waitable collected a moment before, then raised InvalidHandle
("destruction was requested") in add_to_wait_set, out of spin_once, and the node stopped with a
FATAL log (test_node.py's mixed-publisher test, in the board leg). Here a waitable does that
deterministically, on whichever rclpy is installed.
"""

from __future__ import annotations

from rclpy.exceptions import InvalidHandle
from rclpy.waitable import NumberOfEntities, Waitable

from internvl_ros.ros.compat import NodeExecutor


class DestroyedOnce(Waitable):
    """Like a QoS event handler whose subscription was destroyed after the executor collected it."""

    def __init__(self, callback_group):
        super().__init__(callback_group)
        self.raised = 0

    def __enter__(self):  # Kilted's Waitable wants it (the entities' handles); none here
        return None

    def __exit__(self, *exc):
        return None

    def get_num_entities(self):
        return NumberOfEntities()

    def add_to_wait_set(self, wait_set):
        if not self.raised:
            self.raised += 1
            raise InvalidHandle("cannot use Destroyable because destruction was requested")

    def is_ready(self, wait_set):
        return False

    def take_data(self):
        return None

    async def execute(self, taken_data):
        return None


def test_spin_once_survives_a_waitable_destroyed_while_building_the_wait_set(rclpy_context):
    import rclpy

    node = rclpy.create_node("executor_probe")
    executor = NodeExecutor(num_threads=2)
    try:
        ticks = []
        node.create_timer(0.01, lambda: ticks.append(1))
        waitable = DestroyedOnce(node.default_callback_group)
        node.add_waitable(waitable)
        executor.add_node(node)
        for _ in range(20):
            executor.spin_once(timeout_sec=0.1)
            if ticks:
                break
        assert waitable.raised == 1
        assert ticks, "the executor stopped serving the node's timer"
    finally:
        node.remove_waitable(waitable)
        executor.shutdown()
        node.destroy_node()
