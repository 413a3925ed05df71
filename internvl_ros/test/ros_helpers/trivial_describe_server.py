"""A trivial Describe server for the foundation test: it echoes the prompt back.

Runs as its own process; prints READY once the service is up.
"""

import sys

import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node

from internvl_ros_interfaces.srv import Describe


class EchoDescribe(Node):
    def __init__(self) -> None:
        super().__init__("trivial_describe_server")
        self.create_service(Describe, "~/describe", self.on_describe)

    def on_describe(self, request: Describe.Request, response: Describe.Response):
        response.success = True
        response.caption = f"echo: {request.prompt}"
        response.message = "ok"
        response.finish_reason = "eos"
        response.image_header.frame_id = "camera"
        response.timings.generated_tokens = len(request.prompt.split())
        return response


def main() -> None:
    rclpy.init()
    node = EchoDescribe()
    print("READY", flush=True)
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    sys.exit(0)


if __name__ == "__main__":
    main()
