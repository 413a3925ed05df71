"""Several questions about one frame: `Pipeline.ask` -> `Ask`, an iterator of `Answer`s.

    ask = pipe.ask(["What is on the table?",
                    Question("Is the door open?", choices=("yes", "no"), max_new_tokens=4)],
                   images=[rgb], frame_key=("front", stamp_ns))
    for answer in ask:               # answered in order, one Answer per question
        print(answer.success, answer.text, answer.choice_index, answer.timings.ttft_s)

The images are preprocessed once (when `ask()` is called) and encoded by the ViT once (during
the first question); the KV rows of the prompt prefix the questions share (system prompt and
image block: InternVL puts the images before the question) are computed once, and each further
question prefills only its own tokens. Every question is an ordinary Generation, so its tokens
equal those of a separate `generate()` call. A question that fails (bad choices, too long, a
backend error) gives an Answer with `error` set; the others still run.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import ConfigError, InternVLError
from .pipeline import Generation, GenerationResult, Timings
from .sampling import GenerationConfig


@dataclass(frozen=True)
class Question:
    """One question of an Ask: its prompt, its own `choices` (empty: free text, or the Ask's
    config's) and `max_new_tokens` (None or 0: the Ask's config's)."""

    prompt: str
    choices: tuple[str, ...] = ()
    max_new_tokens: int | None = None

    def config(self, base: GenerationConfig) -> GenerationConfig:
        """`base` with this question's choices and max_new_tokens (raises ConfigError)."""
        changes = {}
        if self.choices:
            changes["choices"] = self.choices
        if self.max_new_tokens:
            changes["max_new_tokens"] = self.max_new_tokens
        return dataclasses.replace(base, **changes) if changes else base


@dataclass
class Answer:
    """The outcome of one question: a `result` (success, also when cancelled) or an `error`."""

    index: int
    prompt: str
    result: GenerationResult | None = None
    error: InternVLError | None = None

    @property
    def success(self) -> bool:
        return self.error is None

    @property
    def text(self) -> str:
        return self.result.text if self.result is not None else ""

    @property
    def choice_index(self) -> int:
        return self.result.choice_index if self.result is not None else -1

    @property
    def finish_reason(self) -> str:
        return self.result.finish_reason if self.result is not None else ""

    @property
    def timings(self) -> Timings:
        return self.result.timings if self.result is not None else Timings()

    @property
    def message(self) -> str:
        """"ok", "cancelled", or the error as "<ErrorType>: <what to do>"."""
        if self.error is not None:
            return f"{type(self.error).__name__}: {self.error}"
        return "cancelled" if self.finish_reason == "cancelled" else "ok"


class Ask:
    """Answers questions about one frame, in order, one per `next()` (see the module doc).

    `cancel()` (any thread) stops the running question before its next token; it and every
    later question are answered with finish_reason "cancelled". `answers` runs them all.
    """

    def __init__(self, pipeline, questions: Sequence, frame, system_prompt: str | None,
                 config: GenerationConfig, t0: float):
        if isinstance(questions, (str, Question)) or not isinstance(questions, Sequence):
            raise ConfigError("questions must be a list of strings or Questions, got "
                              f"{type(questions).__name__}")
        if not questions:
            raise ConfigError("questions is empty; ask at least one question")
        self._pipe = pipeline
        self.questions = [q if isinstance(q, Question) else Question(q) for q in questions]
        self._frame = frame
        self._system_prompt = system_prompt
        self._config = config
        self._t0 = t0  # the first question's TTFT includes the image preprocessing
        self._next = 0
        self._cancel = threading.Event()
        self._gen: Generation | None = None
        self._answers: list[Answer] = []

    def __iter__(self):
        return self

    def __next__(self) -> Answer:
        i = self._next
        if i >= len(self.questions):
            raise StopIteration
        self._next += 1
        answer = self._answer(i, self.questions[i])
        self._answers.append(answer)
        return answer

    def _answer(self, i: int, q: Question) -> Answer:
        t0 = self._t0 if i == 0 else time.perf_counter()
        prompt = q.prompt if isinstance(q.prompt, str) else repr(q.prompt)
        if self._cancel.is_set():
            return Answer(i, prompt, result=_cancelled(t0))
        try:
            config = q.config(self._config)
            gen = self._pipe._start(q.prompt, self._frame, self._system_prompt, config, t0)
        except InternVLError as e:
            return Answer(i, prompt, error=e)
        except (TypeError, ValueError) as e:  # a malformed Question (e.g. choices not a list)
            return Answer(i, prompt, error=ConfigError(f"question {i}: {e}"))
        self._gen = gen
        try:
            if self._cancel.is_set():
                gen.cancel()
            return Answer(i, prompt, result=gen.result)
        except InternVLError as e:  # a backend failure; the pipeline reset itself
            return Answer(i, prompt, error=e)
        finally:
            self._gen = None
            if not gen.finished:  # never leave the pipeline busy
                gen.close()

    @property
    def answers(self) -> list[Answer]:
        """Every Answer, in question order (runs the remaining questions)."""
        for _ in self:
            pass
        return list(self._answers)

    def cancel(self) -> None:
        self._cancel.set()
        gen = self._gen
        if gen is not None:
            gen.cancel()


def _cancelled(t0: float) -> GenerationResult:
    tm = Timings(total_s=time.perf_counter() - t0)
    return GenerationResult(text="", token_ids=[], prompt_token_ids=[],
                            finish_reason="cancelled", timings=tm)
