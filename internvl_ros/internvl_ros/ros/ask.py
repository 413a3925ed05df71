"""``~/ask``: several questions about one frame (``internvl_ros_interfaces/srv/Ask``).

The handler chooses the image exactly as ``~/describe`` does (``Describer.choose_image``: the
request's own image, or the latest frame within ``max_frame_age``) and queues ONE job through
``Describer.serve``, so busy, ``request_timeout``, the lifecycle state and shutdown behave as
for Describe: exactly one response per request. The job carries an ``AskWork``: on the worker
thread it runs ``pipeline.ask`` on the decoded frame, so the frame is converted, preprocessed
and encoded once, and each question after the first prefills only its own tokens. A question
that fails (bad choices, prompt too long, a backend error) fails its own Answer only.

Every answer is published on ``~/caption`` and ``~/caption_stamped`` (``source: "ask"``) once
the last one is done: like a Describe's caption, only for a request that gets its answers (not
one that timed out or was stopped meanwhile).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from internvl_ros.core import Question
from internvl_ros.core.errors import BackendError
from internvl_ros.ros import compat
from internvl_ros.ros.describe import MAX_NEW_TOKENS_HI, Describer, timings_msg
from internvl_ros.ros.worker import Job, Outcome, Request, RequestError, clamp_to_context
from internvl_ros_interfaces.msg import Answer as AnswerMsg
from internvl_ros_interfaces.srv import Ask as AskSrv

SOURCE = "ask"  # Request.source and Caption.source of answers
MAX_QUESTIONS = 64  # per request: each one is a generation, and they all hold the pipeline


@dataclass
class AskOutcome(Outcome):
    """An Ask that ran: ``answers`` holds one Outcome per question, in order."""

    answers: list[Outcome] = field(default_factory=list)
    prompts: tuple[str, ...] = ()  # the questions' prompts, defaults applied


@dataclass(frozen=True)
class AskWork:
    """What the worker runs for an Ask (``Request.run``): the questions, with the request's
    config, system prompt and frame key as the base. It touches nothing but the pipeline and
    the job."""

    questions: tuple[Question, ...]

    @property
    def prompts(self) -> tuple[str, ...]:
        return tuple(q.prompt for q in self.questions)

    def __call__(self, pipeline, job: Job, rgb, header, convert_s: float, log) -> AskOutcome:
        req: Request = job.request
        t_call = time.monotonic()
        questions = [clamp_to_context(pipeline, q) if q.max_new_tokens else q
                     for q in self.questions]
        ask = pipeline.ask(questions, images=[rgb], system_prompt=req.system_prompt,
                           config=clamp_to_context(pipeline, req.config),
                           frame_key=req.frame_key)  # an image error raises here
        job.cancel.on_set(ask.cancel)  # a timeout or the shutdown stops it before its next token
        answers = []
        for answer in ask:
            out = _answer_outcome(answer, header, log)
            if answer.index == 0 and out.success:  # end to end, as a Describe's timings
                t = out.timings
                waited = t_call - req.arrival  # queue wait and frame conversion
                out.timings = replace(t, preprocess_s=t.preprocess_s + convert_s,
                                      ttft_s=t.ttft_s + waited if t.ttft_s else 0.0,
                                      total_s=t.total_s + waited)
            answers.append(out)
        failed = sum(not a.success for a in answers)
        message = "ok" if not failed else f"{failed} of {len(answers)} answer(s) failed"
        return AskOutcome(True, message, header=header, answers=answers, prompts=self.prompts)


def _answer_outcome(answer, header, log) -> Outcome:
    """One core Answer as an Outcome (a backend failure is logged, as the worker does)."""
    if answer.error is not None:
        if isinstance(answer.error, BackendError):
            log.error(f"ask: question {answer.index} failed: backend error: {answer.error}")
            return Outcome.fail(f"backend error: {answer.error}", header=header)
        return Outcome.fail(answer.message, header=header)
    return Outcome(True, answer.message, text=answer.text, finish_reason=answer.finish_reason,
                   header=header, timings=answer.timings, choice_index=answer.choice_index)


def answer_msg(out: Outcome) -> AnswerMsg:
    return AnswerMsg(success=out.success, text=out.text, choice_index=out.choice_index,
                     finish_reason=out.finish_reason, message=out.message,
                     timings=timings_msg(out.timings))


def fill(resp, outcome: Outcome):
    """Copy an outcome into an Ask response (answers only when the questions were asked)."""
    resp.success = outcome.success
    resp.message = outcome.message
    if outcome.header is not None:
        resp.image_header = outcome.header
    resp.answers = [answer_msg(a) for a in getattr(outcome, "answers", ())]
    return resp


class AskService:
    """The ``~/ask`` service. Requests go through the Describer (same queue, refusals and
    timeouts); ``on_caption`` publishes one caption (the node's publisher, as for Describe)."""

    def __init__(self, node, describer: Describer, pending: compat.Pending,
                 param: Callable[[str], object], on_caption: Callable[[Job, Outcome], None]):
        self._node = node
        self._describer = describer
        self._pending = pending
        self._p = param
        self._on_caption = on_caption
        self._service = None

    def create_interface(self, callback_group) -> None:
        """The service (once: it stays until the node is destroyed)."""
        if self._service is None:
            self._service = compat.create_counting_service(
                self._node, AskSrv, "~/ask", self._on_service, self._pending, callback_group)

    def build(self, req, source: str = SOURCE, on_delta=None) -> Request:
        """The worker's request: the image chosen as for Describe, the node's defaults applied
        to each question, and an AskWork to run. RequestError when it cannot be served."""
        n = len(req.questions)
        if n == 0:
            raise RequestError("no questions: the request's questions list is empty; ask at "
                               "least one question")
        if n > MAX_QUESTIONS:
            raise RequestError(f"too many questions: {n}; at most {MAX_QUESTIONS} per request")
        image = self._describer.choose_image(req)
        default = self._p("default_prompt")
        questions = tuple(
            Question(q.prompt.strip() or default, choices=tuple(q.choices),
                     max_new_tokens=min(int(q.max_new_tokens), MAX_NEW_TOKENS_HI) or None)
            for q in req.questions)
        request = self._describer.make_request(image, source, questions[0].prompt)
        return replace(request, run=AskWork(questions))

    def publish(self, job: Job, outcome: Outcome) -> None:
        """Publish every answer (worker thread, once the request has its outcome)."""
        for prompt, answer in zip(outcome.prompts, outcome.answers, strict=True):
            if answer.success and answer.finish_reason != "cancelled":
                answer = replace(answer, camera=getattr(job.request.image, "camera", ""))
                self._on_caption(Job(replace(job.request, prompt=prompt, run=None)), answer)

    def _on_service(self, req, resp):
        outcome = self._describer.serve(req, SOURCE, build=self.build, on_caption=self.publish)
        self._log(outcome)
        return fill(resp, outcome)

    def _log(self, outcome: Outcome) -> None:
        self._describer._log_failure("ask", outcome)
        for i, a in enumerate(getattr(outcome, "answers", ())):
            if not a.success:
                self._node.get_logger().warning(f"ask: answer {i} failed: {a.message}")
