"""internvl-console without a browser: the HTTP server's routes and safety rules (against a
scripted backend), offline mode on the tiny model over HTTP, the CLI, and the ROS client's graph
logic. The page in a real browser, and ROS mode against a running node, are in
browser_console.py (`make test-browser`).
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from internvl_ros.console import cli
from internvl_ros.console.ros_backend import image_sources, level_name, resolve_node
from internvl_ros.console.server import Ask, ConsoleServer, History

STATIC = Path(__file__).resolve().parents[1] / "internvl_ros" / "console" / "static"
TESTIDS = ("frame", "prompt", "send", "cancel", "answer", "ttft", "history", "status")


# ---------------------------------------------------------------------------------------------
# a scripted backend and an in-process server


class ScriptedBackend:
    """Answers with ``answer``, one word per delta, ``delay`` s apart; counts cancels."""

    mode = "ros"

    def __init__(self, answer: str = "a <b>bold</b> <script>window.pwned=1</script> answer",
                 delay: float = 0.0):
        self.answer, self.delay = answer, delay
        self.cancelled = threading.Event()
        self.asked: list[tuple] = []
        self.hist = History()

    def info(self):
        return {"title": "scripted", "uploads": True}

    def sources(self):
        return {"sources": [{"id": "cam", "label": "cam", "kind": "camera"}], "default": "cam"}

    def frame(self, source):
        ok, buf = cv2.imencode(".jpg", np.zeros((48, 64, 3), np.uint8))
        return buf.tobytes(), {"label": source, "width": 64, "height": 48}

    def start_ask(self, prompt, source, max_new_tokens=0):
        self.asked.append((prompt, source, max_new_tokens))
        ask = Ask(prompt)
        stop = threading.Event()

        def cancel():
            stop.set()
            self.cancelled.set()

        ask.set_canceller(cancel)

        def run():
            words, text = self.answer.split(" "), ""
            for i, w in enumerate(words):
                if stop.wait(self.delay):
                    ask.finish(True, "cancelled", text=text, finish_reason="cancelled", tokens=i)
                    return
                text = f"{text} {w}" if text else w
                ask.delta(text, i + 1)
            self.hist.add(prompt=prompt, text=text, source="action", finish_reason="eos",
                          stamp=1.0, frame_id="cam", ttft=0.01, tokens_per_second=100.0)
            ask.finish(True, "ok", text=text, finish_reason="eos", ttft=0.01,
                       tokens_per_second=100.0, tokens=len(words))

        threading.Thread(target=run, daemon=True).start()
        return ask

    def history(self, after):
        return self.hist.after(after)

    def status(self):
        return {"level": "OK", "message": "idle", "name": "x", "values": [], "age_s": 0.1}

    def upload(self, data, content_type):
        return {"source": "cam"}

    def close(self):
        pass


class Served:
    def __init__(self, backend, max_upload_bytes: int = 10_000_000, host: str = "127.0.0.1"):
        self.backend = backend
        self.server = ConsoleServer(host, 0, backend, max_upload_bytes=max_upload_bytes)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={
            "poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None, timeout: float = 30.0):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        conn.close()
        return r, data

    def get_json(self, path: str):
        r, data = self.request("GET", path)
        assert r.status == 200, data
        return json.loads(data)

    def ask(self, body: dict, headers: dict | None = None) -> list[dict]:
        r, data = self.request("POST", "/api/ask", json.dumps(body).encode(),
                               {"Content-Type": "application/json", **(headers or {})})
        assert r.status == 200, data
        assert r.getheader("Content-Type").startswith("application/x-ndjson")
        return [json.loads(line) for line in data.decode().splitlines()]

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.backend.close()


@pytest.fixture
def served():
    s = Served(ScriptedBackend())
    yield s
    s.close()


# ---------------------------------------------------------------------------------------------
# the page and the safety rules


def test_page_has_the_test_ids_and_a_strict_policy(served):
    r, body = served.request("GET", "/")
    assert r.status == 200 and r.getheader("Content-Type").startswith("text/html")
    html = body.decode()
    for tid in TESTIDS:
        assert f'data-testid="{tid}"' in html, tid
    csp = r.getheader("Content-Security-Policy")
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert r.getheader("X-Content-Type-Options") == "nosniff"
    # no inline script or handler the policy would have to allow
    assert not re.search(r"<script(?![^>]*\bsrc=)", html)
    assert not re.search(r"\son[a-z]+=", html)
    for path, ctype in (("/app.js", "text/javascript"), ("/app.css", "text/css")):
        r, _ = served.request("GET", path)
        assert r.status == 200 and r.getheader("Content-Type").startswith(ctype)


def test_page_script_never_parses_text_as_html():
    js = (STATIC / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "new Function", "DOMParser"):
        assert sink not in js, sink
    assert "textContent" in js


@pytest.mark.parametrize("path", [
    "/../../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/static/../setup.py",
    "/app.js/../../../setup.py", "//etc/passwd", "/static/index.html", "/index.html",
    "/internvl_ros/console/server.py", "/.git/config", "/api/../app.js/..%2f..%2fsetup.py",
    "/app.js%00.png", "/\\..\\..\\etc\\passwd",
])
def test_no_host_file_is_reachable(served, path):
    r, body = served.request("GET", path)
    assert r.status == 404, (path, r.status)
    assert b"root:" not in body and b"setup(" not in body and b"import" not in body


def test_foreign_host_and_cross_origin_posts_are_refused(served):
    r, body = served.request("GET", "/api/info", headers={"Host": "attacker.example:8080"})
    assert r.status == 403 and b"loopback" in body
    r, _ = served.request("GET", "/api/info", headers={"Host": f"localhost:{served.port}"})
    assert r.status == 200
    body = json.dumps({"prompt": "x"}).encode()
    # a form or text/plain POST (no CORS preflight) is refused
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        r, _ = served.request("POST", "/api/ask", body, {"Content-Type": ctype})
        assert r.status == 415, ctype
    r, data = served.request("POST", "/api/ask", body, {
        "Content-Type": "application/json", "Origin": "http://attacker.example"})
    assert r.status == 403 and b"cross-origin" in data
    assert served.backend.asked == []
    r, _ = served.request("POST", "/api/upload", b"x", {"Content-Type": "text/plain"})
    assert r.status == 415


def test_other_interfaces_accept_any_host():
    s = Served(ScriptedBackend(), host="0.0.0.0")
    try:
        assert not s.server.loopback_only
        r, _ = s.request("GET", "/api/info", headers={"Host": "robot.local:8080"})
        assert r.status == 200
    finally:
        s.close()


def test_bad_requests_get_clear_errors(served):
    post = {"Content-Type": "application/json"}
    r, data = served.request("POST", "/api/ask", b"{not json", post)
    assert r.status == 400 and b"not valid JSON" in data
    r, data = served.request("POST", "/api/ask", b"[1]", post)
    assert r.status == 400 and b"JSON object" in data
    r, data = served.request("POST", "/api/ask", json.dumps({"prompt": 3}).encode(), post)
    assert r.status == 400 and b"strings" in data
    r, data = served.request("POST", "/api/ask", json.dumps(
        {"prompt": "x", "max_new_tokens": 10**6}).encode(), post)
    assert r.status == 400 and b"max_new_tokens" in data
    r, data = served.request("POST", "/api/ask", json.dumps({"prompt": "x" * 9000}).encode(),
                             post)
    assert r.status == 400 and b"at most" in data
    r, data = served.request("POST", "/api/ask", b"x" * 100_000, post)
    assert r.status == 413
    r, data = served.request("POST", "/api/cancel", json.dumps({"id": "nope"}).encode(), post)
    assert r.status == 404
    r, data = served.request("GET", "/api/history?after=x")
    assert r.status == 400
    r, _ = served.request("PUT", "/api/ask", b"{}", post)
    assert r.status == 501
    assert served.backend.asked == []


def test_ask_streams_then_finishes_and_html_stays_json_text(served):
    events = served.ask({"prompt": "<img src=x onerror=alert(1)>", "source": "cam",
                         "max_new_tokens": 7})
    assert events[0]["event"] == "started" and events[0]["prompt"] == "<img src=x onerror=alert(1)>"
    deltas = [e for e in events if e["event"] == "delta"]
    done = events[-1]
    assert done["event"] == "done" and done["success"] and done["finish_reason"] == "eos"
    assert len(deltas) == len(served.backend.answer.split(" "))
    assert all(done["text"].startswith(d["text"]) for d in deltas)
    assert done["text"] == served.backend.answer
    assert served.backend.asked == [("<img src=x onerror=alert(1)>", "cam", 7)]
    items = served.get_json("/api/history?after=0")["items"]
    assert items[-1]["text"] == served.backend.answer
    assert served.get_json(f"/api/history?after={items[-1]['seq']}")["items"] == []


def _stream(port: int, body: dict) -> tuple[socket.socket, object]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /api/ask HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                 b"\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    f = sock.makefile("rb")
    while f.readline() not in (b"\r\n", b""):  # headers
        pass
    return sock, f


def test_cancel_stops_the_answer():
    s = Served(ScriptedBackend(answer=" ".join(["word"] * 200), delay=0.02))
    try:
        sock, f = _stream(s.port, {"prompt": "long"})
        started = json.loads(f.readline())
        assert json.loads(f.readline())["event"] == "delta"
        r, _ = s.request("POST", "/api/cancel", json.dumps({"id": started["id"]}).encode(),
                         {"Content-Type": "application/json"})
        assert r.status == 200
        events = [json.loads(line) for line in f]
        assert events[-1]["event"] == "done" and events[-1]["finish_reason"] == "cancelled"
        assert events[-1]["tokens"] < 200
        f.close()
        sock.close()
    finally:
        s.close()


def test_a_closed_page_cancels_its_answer():
    s = Served(ScriptedBackend(answer=" ".join(["word"] * 500), delay=0.01))
    try:
        sock, f = _stream(s.port, {"prompt": "long"})
        f.readline()
        f.close()
        sock.close()
        assert s.backend.cancelled.wait(10), "the answer went on for nobody"
    finally:
        s.close()


def test_ask_cancel_before_the_backend_attached_its_canceller():
    ask = Ask("p")
    ask.cancel()
    called = []
    ask.set_canceller(lambda: called.append(1))
    assert called == [1]
    ask.finish(False, "x")
    ask.finish(True, "second")  # ignored: one answer
    ask.delta("late", 3)  # ignored after the end
    assert [e["message"] for e in ask.events(timeout=1)] == ["x"]


def test_ask_times_out_with_a_failure():
    ask = Ask("p")
    t0 = time.monotonic()
    events = list(ask.events(timeout=0.3))
    assert time.monotonic() - t0 < 3
    assert events[-1]["event"] == "done" and not events[-1]["success"]
    assert "no answer within" in events[-1]["message"] and ask.cancel_requested


# ---------------------------------------------------------------------------------------------
# offline mode on the tiny model


def png_bytes(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    assert ok
    return buf.tobytes()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` (a decompression bomb's shape)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk
            + struct.pack(">I", zlib.crc32(chunk)) + b"\x00\x00\x00\x00IEND\xaeB`\x82")


@pytest.fixture(scope="module")
def offline():
    from internvl_ros.console.offline_backend import OfflineBackend
    from internvl_ros.export.testing import tiny_model_dirs

    model = tiny_model_dirs("a")[1]
    s = Served(OfflineBackend(model, max_new_tokens=24), max_upload_bytes=200_000)
    yield s, model
    s.close()


def test_offline_examples_and_upload_answer_like_the_pipeline(offline):
    from internvl_ros.core import GenerationConfig, Pipeline
    from internvl_ros.tools.demo_bag import render_frame

    s, model = offline
    src = s.get_json("/api/sources")
    assert [x["id"] for x in src["sources"]] == ["example-1", "example-2", "example-3"]
    r, jpeg = s.request("GET", "/api/frame?source=example-2")
    assert r.status == 200 and r.getheader("Content-Type") == "image/jpeg"
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (480, 640, 3)

    rgb = render_frame(7)[::2, ::2].copy()  # 320x240
    r, data = s.request("POST", "/api/upload", png_bytes(rgb), {"Content-Type": "image/png"})
    assert r.status == 200, data
    up = json.loads(data)
    assert up["width"] == 320 and up["height"] == 240
    assert s.get_json("/api/sources")["default"] == up["source"]

    prompt = "What is in front of the robot?"
    events = s.ask({"prompt": prompt, "source": up["source"], "max_new_tokens": 12})
    done = events[-1]
    assert done["success"], done
    with Pipeline.from_model_dir(model) as pipe:
        ref = pipe.generate(prompt, images=[rgb],
                            config=GenerationConfig(max_new_tokens=12)).result
    assert done["text"] == ref.text and done["finish_reason"] == ref.finish_reason
    deltas = [e for e in events if e["event"] == "delta"]
    assert len(deltas) == ref.timings.generated_tokens and deltas[-1]["tokens"] == len(deltas)
    assert done["ttft"] > 0 and done["tokens"] == 12
    hist = s.get_json("/api/history?after=0")["items"]
    assert hist[-1]["prompt"] == prompt and hist[-1]["text"] == ref.text


def test_offline_bad_uploads_get_clear_messages(offline):
    s, _ = offline
    cases = {
        b"GIF89a not supported": "neither JPEG nor PNG",
        b"": "no data",
        png_bytes(np.zeros((8, 8, 3), np.uint8))[:-20]: "truncated",
        png_header_only(100_000, 100_000): "exceeds",
    }
    for data, why in cases.items():
        r, body = s.request("POST", "/api/upload", data, {"Content-Type": "image/png"})
        assert r.status == 400, (why, body)
        msg = json.loads(body)["error"]
        assert msg.startswith("not a usable image") and why in msg, msg
    r, body = s.request("POST", "/api/upload", b"\x89PNG" + bytes(300_000),
                        {"Content-Type": "application/octet-stream"})
    assert r.status == 413 and "at most 0.2 MB" in json.loads(body)["error"]
    r, body = s.request("POST", "/api/ask", json.dumps({"prompt": "x", "source": "nope"}).encode(),
                        {"Content-Type": "application/json"})
    assert r.status == 404 and b"upload one" in body


def test_offline_one_answer_at_a_time(offline):
    s, _ = offline
    sock, f = _stream(s.port, {"prompt": "long", "source": "example-1", "max_new_tokens": 1500})
    assert json.loads(f.readline())["event"] == "started"
    try:
        events = s.ask({"prompt": "second", "source": "example-1"})
        assert not events[-1]["success"] and events[-1]["message"].startswith("busy")
    finally:
        f.close()
        sock.close()  # cancels the long one
    deadline = time.monotonic() + 30
    while s.get_json("/api/status")["message"] != "idle":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert s.ask({"prompt": "third", "source": "example-1"})[-1]["success"]


# ---------------------------------------------------------------------------------------------
# the command line


def test_cli_defaults_to_loopback_and_splits_ros_args():
    args, ros = cli.parse_args([])
    assert (args.host, args.port, args.node, args.model_dir) == ("127.0.0.1", 8080, "/internvl",
                                                                 None)
    args, ros = cli.parse_args(["--node", "/robot", "--ros-args", "-r", "__ns:=/x"])
    assert args.node == "/robot" and ros == ["--ros-args", "-r", "__ns:=/x"]
    with pytest.raises(SystemExit):
        cli.parse_args(["--port", "70000"])


def test_cli_fails_clearly(tmp_path, capsys):
    assert cli.main(["--model-dir", str(tmp_path), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("internvl-console: error: ModelDirError") and str(tmp_path) in err

    from internvl_ros.export.testing import tiny_model_dirs

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["--model-dir", str(tiny_model_dirs("a")[1]),
                         "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the ROS client's graph logic


def test_resolve_node():
    nodes = {"/internvl", "/robot/internvl", "/robot/camera", "/a/b/internvl", "/console"}
    assert resolve_node("/internvl", nodes) == "/internvl"
    assert resolve_node("internvl", nodes) == "/internvl"
    assert resolve_node("/robot", nodes) == "/robot/internvl"
    assert resolve_node("/robot/", nodes) == "/robot/internvl"
    assert resolve_node("/a", nodes) == "/a/b/internvl"
    assert resolve_node("/", {"/robot/internvl"}) == "/robot/internvl"
    assert resolve_node("/robot/camera", nodes) == "/robot/camera"  # a full name wins
    assert resolve_node("/missing", nodes) is None


def test_image_sources_from_the_graph():
    subs = [("/cam/image_raw", ["sensor_msgs/msg/Image"]),
            ("/cam2/image/compressed", ["sensor_msgs/msg/CompressedImage"]),
            ("/parameter_events", ["rcl_interfaces/msg/ParameterEvent"])]
    pubs = [("/internvl/caption", ["std_msgs/msg/String"]),
            ("/internvl/image_annotated", ["sensor_msgs/msg/Image"])]
    got = image_sources(subs, pubs)
    assert [(s["id"], s["kind"], s["type"]) for s in got] == [
        ("/internvl/image_annotated", "annotated", "Image"),
        ("/cam/image_raw", "camera", "Image"),
        ("/cam2/image/compressed", "camera", "CompressedImage"),
    ]
    assert image_sources(subs[2:], pubs[:1]) == []  # no image topic: nothing, no error


def test_diagnostic_level_names():
    assert level_name(b"\x00") == "OK" and level_name(b"\x01") == "WARN"
    assert level_name(2) == "ERROR" and level_name(b"\x03") == "STALE" and level_name(9) == "9"


def test_frames_are_converted_downscaled_and_bad_ones_reported():
    """What the live view does with a received frame: deserialize, convert any encoding the node
    reads (raw or compressed), downscale to the preview width, JPEG; a bad frame is a message."""
    from types import SimpleNamespace

    from rclpy.serialization import serialize_message
    from sensor_msgs.msg import CompressedImage, Image

    from internvl_ros.console.ros_backend import RosBackend, _FrameSub
    from internvl_ros.console.server import ConsoleError

    rgb = np.zeros((960, 1280, 3), np.uint8)
    rgb[:, :640] = (255, 0, 0)  # left half red
    raw = Image(height=960, width=1280, encoding="bgr8", step=1280 * 3)
    raw.data = rgb[..., ::-1].tobytes()
    raw.header.stamp.sec, raw.header.frame_id = 12, "cam"
    ok, jpg = cv2.imencode(".jpg", rgb[..., ::-1])
    comp = CompressedImage(format="jpeg")
    comp.data = jpg.tobytes()
    fake = SimpleNamespace(preview_width=320)
    for msg, cls, enc in ((raw, Image, "bgr8"), (comp, CompressedImage, "jpeg")):
        fs = _FrameSub("/cam", cls, None)
        jpeg, meta = RosBackend._convert(fake, fs, serialize_message(msg))
        img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)  # BGR
        assert img.shape == (240, 320, 3)
        assert img[120, 40, 2] > 200 and img[120, 40, 0] < 60  # still red on the left
        assert (meta["width"], meta["height"], meta["encoding"]) == (1280, 960, enc)
    assert meta["stamp"] == 0 and RosBackend._convert(
        fake, _FrameSub("/cam", Image, None), serialize_message(raw))[1]["stamp"] == 12
    bad = CompressedImage(format="jpeg")
    bad.data = jpg.tobytes()[:-100]  # truncated
    with pytest.raises(ConsoleError, match="cannot be shown.*truncated"):
        RosBackend._convert(fake, _FrameSub("/cam", CompressedImage, None),
                            serialize_message(bad))
