"""The foundation works: venv rclpy, generated interfaces, a service round trip across processes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from conftest import REPO_ROOT, TEST_DIR


def test_generated_interfaces_have_the_contract_fields():
    from internvl_ros_interfaces.action import Describe as DescribeAction
    from internvl_ros_interfaces.msg import Caption, Timings
    from internvl_ros_interfaces.srv import Describe

    req = Describe.Request()
    for field in ("prompt", "system_prompt", "max_new_tokens", "max_frame_age", "image",
                  "compressed_image"):
        assert hasattr(req, field), field
    resp = Describe.Response()
    for field in ("success", "caption", "message", "finish_reason", "image_header", "timings"):
        assert hasattr(resp, field), field
    for field in ("ttft", "generated_tokens", "tokens_per_second", "prompt_tokens"):
        assert hasattr(Timings(), field), field
    assert hasattr(Caption(), "header") and hasattr(Caption(), "text")
    assert hasattr(DescribeAction.Feedback(), "text")
    assert hasattr(DescribeAction.Goal(), "prompt")


def test_service_round_trip_between_two_processes(rclpy_context):
    import rclpy
    from rclpy.node import Node

    from internvl_ros_interfaces.srv import Describe

    server = subprocess.Popen(
        [sys.executable, str(TEST_DIR / "ros_helpers" / "trivial_describe_server.py")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT,
    )
    node = Node("foundation_client")
    try:
        assert server.stdout.readline().strip() == "READY"
        client = node.create_client(Describe, "/trivial_describe_server/describe")
        assert client.wait_for_service(timeout_sec=20.0), "service never appeared"
        request = Describe.Request(prompt="what is in front of the robot")
        future = client.call_async(request)
        deadline = time.monotonic() + 20.0
        while not future.done() and time.monotonic() < deadline:
            rclpy.spin_once(node, timeout_sec=0.1)
        assert future.done(), "no response within 20 s"
        response = future.result()
        assert response.success
        assert response.caption == "echo: what is in front of the robot"
        assert response.image_header.frame_id == "camera"
        assert response.timings.generated_tokens == len(request.prompt.split())
    finally:
        node.destroy_node()
        server.send_signal(signal.SIGINT)
        try:
            rc = server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            rc = server.wait()
    assert rc == 0, server.stdout.read()


def test_discovery_variable_is_the_one_this_distro_reads(ros_domain):
    """Only the installed rcl's spelling is set: Jazzy's rcl warns on stderr about the deprecated
    ROS_LOCALHOST_ONLY (and a child's first line is then that warning, not its own output)."""
    import os

    from conftest import localhost_discovery_env

    expected = localhost_discovery_env()
    for name in ("ROS_AUTOMATIC_DISCOVERY_RANGE", "ROS_LOCALHOST_ONLY"):
        assert os.environ.get(name) == expected.get(name), name
    child = subprocess.run(
        [sys.executable, "-c", "import rclpy; rclpy.init(); rclpy.create_node('quiet'); "
         "rclpy.shutdown(); print('READY')"],
        capture_output=True, text=True, timeout=60,
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout == "READY\n" and child.stderr == "", child.stderr
