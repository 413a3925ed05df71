"""internvl-bag-replay against a running internvl_node on the tiny model (issue: rosbag replay).

Real processes over DDS: the node, the replay tool, and the offline caption CLI as the reference.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import REPO_ROOT, wait_for

MAX_NEW_TOKENS = 12
PROMPT = "What is in front of the robot?"


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from internvl_ros.export.testing import tiny_model_dirs

    return Path(tiny_model_dirs("a")[1])


def _start_node(model_dir: Path, name: str, extra: list[str] = ()) -> subprocess.Popen:
    cmd = ["internvl_node", "--ros-args", "-r", f"__node:={name}",
           "-p", f"model_dir:={model_dir}", "-p", f"max_new_tokens:={MAX_NEW_TOKENS}",
           *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO_ROOT)


def _stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.stdout.read()


@pytest.fixture(scope="module")
def node(ros_domain, model_dir):
    proc = _start_node(model_dir, "internvl_replay_test")
    yield "/internvl_replay_test"
    log = _stop(proc)
    assert proc.returncode == 0, log


def _replay(bag: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = ["internvl-bag-replay", str(bag), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT,
                          stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def reference(model_dir):
    """The greedy caption of an image, from the core in this process (one pipeline for the
    module: what the offline CLI computes, without a process per frame)."""
    from internvl_ros.core import GenerationConfig, Pipeline

    pipe = Pipeline.from_model_dir(model_dir)
    config = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS)

    def caption(image) -> str:
        return pipe.generate(PROMPT, images=[image], config=config).result.text

    yield caption
    pipe.close()


def _frames_of(bag: Path, topic: str):
    from internvl_ros.tools.bagio import ImageBag

    with ImageBag(bag, topic) as b:
        return list(b.frames())


def _frame_rgb(frame) -> np.ndarray:
    if frame.kind == "compressed":
        bgr = cv2.imdecode(np.frombuffer(frame.data, np.uint8), cv2.IMREAD_COLOR)
        return bgr[..., ::-1]
    arr = np.frombuffer(frame.data, np.uint8).reshape(frame.height, frame.step)
    if frame.encoding == "rgb8":
        return arr[:, : frame.width * 3].reshape(frame.height, frame.width, 3)
    if frame.encoding == "bgr8":
        return arr[:, : frame.width * 3].reshape(frame.height, frame.width, 3)[..., ::-1]
    raise AssertionError(frame.encoding)


def _check_round_trip(tmp_path, bag, topic, every, node, reference):
    out = tmp_path / f"{bag.name}.jsonl"
    res = _replay(bag, "--topic", topic, "--node", node, "--describe-every", str(every),
                  "--prompt", PROMPT, "--rate", "5", "--output", str(out))
    assert res.returncode == 0, res.stderr + res.stdout
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    frames = _frames_of(bag, topic)
    described = [f for f in frames if f.index % every == 0]
    # every described frame yields exactly one line, in order, with the source stamp
    assert [r["frame_index"] for r in lines] == [f.index for f in described]
    for rec, frame in zip(lines, described, strict=True):
        assert rec["success"], rec
        assert rec["stamp"] == {"sec": frame.stamp_sec, "nanosec": frame.stamp_nanosec}
        assert rec["prompt"] == PROMPT
        assert rec["timings"]["generated_tokens"] > 0
        # the greedy text equals the core's on the same image (compressed: the very bytes)
        ref = reference(bytes(frame.data) if frame.kind == "compressed" else _frame_rgb(frame))
        assert rec["text"] == ref, (frame.index, rec["text"], ref)
    # the summary table is printed
    assert "median TTFT" in res.stdout and "p95 TTFT" in res.stdout
    return lines


def test_mcap_compressed_round_trip(tmp_path, node, reference):
    from internvl_ros.tools.demo_bag import COMPRESSED_TOPIC, write_demo_bag

    bag = write_demo_bag(tmp_path / "mcap_bag", frames=5, fps=10, storage="mcap",
                         kinds=("compressed",))
    lines = _check_round_trip(tmp_path, bag, COMPRESSED_TOPIC, 2, node, reference)
    assert len(lines) == 3


def test_sqlite3_raw_two_encodings_round_trip(tmp_path, node, reference):
    from internvl_ros.tools.demo_bag import RAW_TOPIC, write_demo_bag

    bag = write_demo_bag(tmp_path / "sqlite_bag", frames=4, fps=10, storage="sqlite3",
                         kinds=("raw",), raw_encodings=("rgb8", "bgr8"))
    encodings = {f.encoding for f in _frames_of(bag, RAW_TOPIC)}
    assert encodings == {"rgb8", "bgr8"}
    lines = _check_round_trip(tmp_path, bag, RAW_TOPIC, 1, node, reference)
    assert len(lines) == 4
    # rgb8 and bgr8 of the same scene describe the same picture: frames differ, so compare
    # each against its own reference (done above); here just check that texts are non-empty
    assert all(line["text"] for line in lines)


def test_record_writes_images_and_captions(tmp_path, node):
    from rosbags.highlevel import AnyReader

    from internvl_ros.tools.demo_bag import RAW_TOPIC, write_demo_bag

    bag = write_demo_bag(tmp_path / "rec_src", frames=3, fps=10, storage="mcap",
                         kinds=("raw",))
    out_bag = tmp_path / "recorded"
    res = _replay(bag, "--node", node, "--describe-every", "1", "--record", str(out_bag),
                  "--rate", "5")
    assert res.returncode == 0, res.stderr
    with AnyReader([out_bag]) as reader:
        counts = {name: info.msgcount for name, info in reader.topics.items()}
        stamped = [reader.deserialize(raw, c.msgtype) for c, _, raw in
                   reader.messages([c for c in reader.connections
                                    if c.topic.endswith("caption_stamped")])]
    assert counts[RAW_TOPIC] == 3
    assert counts[f"{node}/caption"] == 3
    assert counts[f"{node}/caption_stamped"] == 3
    src = _frames_of(bag, RAW_TOPIC)
    assert sorted((m.header.stamp.sec, m.header.stamp.nanosec) for m in stamped) == \
        [(f.stamp_sec, f.stamp_nanosec) for f in src]


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _start_replay(tmp_path, bag: Path, *args: str, sigint_ignored=False) -> subprocess.Popen:
    """internvl-bag-replay in the background, stdout and stderr to files (see _outputs);
    `sigint_ignored`: started as `internvl-bag-replay ... &` in a script starts it."""
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        return subprocess.Popen(["internvl-bag-replay", str(bag), *args], stdout=out,
                                stderr=err, cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                                preexec_fn=_ignore_sigint if sigint_ignored else None)


def _outputs(tmp_path, proc: subprocess.Popen) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a _start_replay process (killed after 30 s)."""
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return proc.returncode, (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()


@pytest.mark.parametrize("sig, sigint_ignored", [
    (signal.SIGINT, False), (signal.SIGINT, True), (signal.SIGTERM, False)],
    ids=["ctrl-c", "sigint-to-a-background-job", "sigterm"])
def test_interrupting_a_looping_replay_is_a_clean_exit(tmp_path, node, sig, sigint_ignored):
    """Ctrl-C during --loop (the bag replayed a second time, the node answering): one line, exit
    status 130, no traceback; the --record bag is closed and readable, the summary printed.
    Also SIGINT to a replay started with SIGINT ignored (a background job of a script, or of
    `make demo` run that way, which stops its --loop replay with SIGINT), and SIGTERM."""
    from rosbags.highlevel import AnyReader

    from internvl_ros.tools.demo_bag import RAW_TOPIC, write_demo_bag

    bag = write_demo_bag(tmp_path / "loop_src", frames=3, fps=10, storage="mcap",
                         kinds=("raw",))
    out, out_bag = tmp_path / "loop.jsonl", tmp_path / "recorded"
    proc = _start_replay(tmp_path, bag, "--node", node, "--loop", "--describe-every", "1",
                         "--rate", "5", "--output", str(out), "--record", str(out_bag),
                         sigint_ignored=sigint_ignored)
    try:
        # a fourth caption: the replay is in its second pass through the bag
        wait_for(lambda: out.is_file() and len(out.read_text().splitlines()) >= 4
                 or proc.poll() is not None, 120, "the replay to loop")
        assert proc.poll() is None, _outputs(tmp_path, proc)
        proc.send_signal(sig)
    finally:
        status, stdout, stderr = _outputs(tmp_path, proc)
    assert status == 130, stdout + stderr
    assert "Traceback" not in stdout + stderr and "Exception" not in stderr, stderr
    assert "internvl-bag-replay: interrupted" in stderr.splitlines()
    assert "median TTFT" in stdout
    with AnyReader([out_bag]) as reader:
        counts = {name: info.msgcount for name, info in reader.topics.items()}
    assert counts[RAW_TOPIC] >= 4, counts


@pytest.mark.parametrize("sigint_ignored", [False, True], ids=["ctrl-c", "background-job"])
def test_sigint_while_waiting_for_the_node_is_a_clean_exit(tmp_path, ros_domain, sigint_ignored):
    from internvl_ros.tools.demo_bag import RAW_TOPIC, write_demo_bag

    bag = write_demo_bag(tmp_path / "b", frames=2, storage="mcap", kinds=("raw",))
    proc = _start_replay(tmp_path, bag, "--topic", RAW_TOPIC, "--node", "/nobody_here",
                         "--loop", "--timeout", "60", sigint_ignored=sigint_ignored)
    try:
        time.sleep(3)  # started rclpy, waiting for /nobody_here/describe
        assert proc.poll() is None, _outputs(tmp_path, proc)
        proc.send_signal(signal.SIGINT)
    finally:
        status, stdout, stderr = _outputs(tmp_path, proc)
    assert status == 130, stdout + stderr
    assert "Traceback" not in stdout + stderr and "Exception" not in stderr, stderr
    assert "internvl-bag-replay: interrupted" in stderr.splitlines()


def test_missing_bag_is_a_clear_error(tmp_path):
    res = _replay(tmp_path / "no_such_bag", timeout=60)
    assert res.returncode == 2
    assert "bag not found" in res.stderr and "no_such_bag" in res.stderr


def test_wrong_topic_lists_the_topics(tmp_path):
    from internvl_ros.tools.demo_bag import write_demo_bag

    bag = write_demo_bag(tmp_path / "b", frames=1, storage="mcap")
    res = _replay(bag, "--topic", "/front_camera/image", timeout=60)
    assert res.returncode == 2
    assert "/front_camera/image is not in bag" in res.stderr
    assert "/camera/image_raw  [sensor_msgs/msg/Image]" in res.stderr
    assert "/camera/image_raw/compressed  [sensor_msgs/msg/CompressedImage]" in res.stderr


def test_unreachable_node_times_out(tmp_path, ros_domain):
    from internvl_ros.tools.demo_bag import RAW_TOPIC, write_demo_bag

    bag = write_demo_bag(tmp_path / "b", frames=2, storage="mcap", kinds=("raw",))
    t0 = time.monotonic()
    res = _replay(bag, "--topic", RAW_TOPIC, "--node", "/nobody_here", "--timeout", "3",
                  timeout=60)
    assert res.returncode == 3
    assert "did not answer" in res.stderr and "/nobody_here/describe" in res.stderr
    assert time.monotonic() - t0 < 30


def test_demo_script_runs_end_to_end(tmp_path, ros_domain, model_dir):
    """What `make demo` runs, with a short bag: status 0, >= 3 captions and the summary."""
    env = dict(os.environ, INTERNVL_DEMO_CACHE=str(tmp_path / "demo-cache"))
    res = subprocess.run(
        [sys.executable, "-m", "internvl_ros.tools.demo", "--model-dir", str(model_dir),
         "--frames", "12", "--describe-every", "4", "--timeout", "120"],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stdout + res.stderr
    captions = [line for line in res.stdout.splitlines() if line.startswith("[frame ")]
    assert len(captions) >= 3, res.stdout
    assert "| captions" in res.stdout and "median TTFT" in res.stdout


def test_continuous_mode_records_the_nodes_captions(tmp_path, ros_domain, model_dir):
    from internvl_ros.tools.demo_bag import RAW_TOPIC, write_demo_bag

    bag = write_demo_bag(tmp_path / "cont", frames=20, fps=10, storage="mcap", kinds=("raw",))
    proc = _start_node(model_dir, "internvl_continuous",
                       ["-p", "caption_rate_hz:=2.0", "-r", f"image:={RAW_TOPIC}"])
    try:
        out = tmp_path / "cont.jsonl"
        res = _replay(bag, "--node", "/internvl_continuous", "--continuous", "--drain", "3",
                      "--output", str(out))
    finally:
        log = _stop(proc)
    assert res.returncode == 0, res.stderr + log
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines, res.stdout + res.stderr + log
    stamps = {(f.stamp_sec, f.stamp_nanosec): f.index for f in _frames_of(bag, RAW_TOPIC)}
    for rec in lines:
        assert rec["source"] == "continuous" and rec["success"] and rec["text"]
        key = (rec["stamp"]["sec"], rec["stamp"]["nanosec"])
        assert key in stamps
        assert rec["frame_index"] == stamps[key]


def test_record_keeps_a_captions_camera_and_detections(tmp_path):
    from rosbags.highlevel import AnyReader

    from internvl_ros.tools.bag_replay import Recorder
    from internvl_ros_interfaces.msg import Caption, Detection

    rec = Recorder(tmp_path / "rec", "/cam/image", "raw", "/internvl")
    msg = Caption(text="a cup", camera="front", detections=[
        Detection(label="cup", x_min=1.0, y_min=2.0, x_max=3.5, y_max=4.0)])
    msg.header.frame_id = "front_link"
    rec.caption_stamped(msg)
    rec.close()
    with AnyReader([tmp_path / "rec"]) as reader:
        (got,) = [reader.deserialize(raw, c.msgtype) for c, _, raw in reader.messages()]
    assert (got.camera, got.header.frame_id, got.text) == ("front", "front_link", "a cup")
    (d,) = got.detections
    assert (d.label, d.x_min, d.y_min, d.x_max, d.y_max) == ("cup", 1.0, 2.0, 3.5, 4.0)
