"""The web console: the camera view, a prompt box with the streaming answer, the recent captions
and the node's health, on one page served from the standard library (docs/CONSOLE.md).

    internvl-console [--host 127.0.0.1] [--port 8080] [--node /internvl]   # a running node
    internvl-console --model-dir DIR                                       # offline, no ROS

``server`` is the HTTP side and knows nothing of ROS or the model; it drives a *backend*
(``ros_backend.RosBackend`` or ``offline_backend.OfflineBackend``) through the small interface
described in ``server.Backend``.
"""
