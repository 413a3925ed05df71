"""The generated Ask / Question / Answer types and Describe's choices: names, defaults, a CDR
round trip, and a comment on every field line of the interface files."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO_ROOT

IFACE = REPO_ROOT / "internvl_ros_interfaces"


def test_ask_types_have_the_issue_fields_and_defaults():
    from internvl_ros_interfaces.action import Describe as DescribeAction
    from internvl_ros_interfaces.msg import Answer, Question, Timings
    from internvl_ros_interfaces.srv import Ask, Describe

    req = Ask.Request()
    assert (req.camera, list(req.questions), req.max_frame_age) == ("", [], 0.0)
    assert req.image.data.tolist() == [] and len(req.compressed_image.data) == 0
    resp = Ask.Response()
    for field in ("success", "message", "image_header", "answers"):
        assert hasattr(resp, field), field
    q = Question()
    assert (q.prompt, list(q.choices), q.max_new_tokens) == ("", [], 0)
    a = Answer()
    assert (a.success, a.text, a.choice_index, a.finish_reason) == (False, "", -1, "")
    assert isinstance(a.timings, Timings) and Timings().cached_prompt_tokens == 0
    assert list(Describe.Request().choices) == [] and Describe.Response().choice_index == -1
    assert list(DescribeAction.Goal().choices) == [] and DescribeAction.Result().choice_index == -1


def test_ask_request_survives_serialisation():
    from rclpy.serialization import deserialize_message, serialize_message

    from internvl_ros_interfaces.msg import Answer, Question
    from internvl_ros_interfaces.srv import Ask

    req = Ask.Request(camera="front", max_frame_age=0.5, questions=[
        Question(prompt="Is the door open?", choices=["yes", "no", "not sure"]),
        Question(prompt="What is on the table?", max_new_tokens=32)])
    back = deserialize_message(serialize_message(req), Ask.Request)
    assert back.camera == "front" and [q.prompt for q in back.questions] == [
        "Is the door open?", "What is on the table?"]
    assert list(back.questions[0].choices) == ["yes", "no", "not sure"]
    assert back.questions[1].max_new_tokens == 32
    resp = Ask.Response(success=True, answers=[Answer(success=True, text="yes", choice_index=0)])
    back = deserialize_message(serialize_message(resp), Ask.Response)
    assert back.answers[0].text == "yes" and back.answers[0].choice_index == 0


@pytest.mark.parametrize("path", ["srv/Ask.srv", "msg/Question.msg", "msg/Answer.msg",
                                  "srv/Describe.srv", "action/Describe.action",
                                  "msg/Timings.msg"])
def test_every_field_is_commented(path):
    for line in Path(IFACE / path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and line != "---":
            assert "#" in line, f"{path}: field without a comment: {line!r}"
