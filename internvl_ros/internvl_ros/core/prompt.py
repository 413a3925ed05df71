"""The InternVL chat prompt (Qwen ChatML), built from segments so user text can't inject
control tokens.

Layout, as InternVL's `chat()` with the `internvl2_5` template (InternVL3.5):

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n{images}{question}<|im_end|>\\n
    <|im_start|>assistant\\n

with {images} = ""                                      (text only)
                "<img>{ctx}</img>\\n"                    (one image)
                "Image-1: <img>{ctx}</img>\\nImage-2: ..."  (several images)
                "Frame1: <img>{ctx}</img>\\nFrame2: ..."    (video frames)
and {ctx} = <IMG_CONTEXT> x (256 x tiles of that image).

Control tokens are inserted by id; system and user text are encoded with special-token matching
disabled, so `<img>`, `<IMG_CONTEXT>`, `<|im_end|>` typed by a user stay plain text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

from .errors import ConfigError
from .grounding import LOCATE_PREFIX, REF_END, REF_START, check_phrase
from .tokenizer import Tokenizer

#: InternVL's default system message (conversation template `internvl2_5`, used by InternVL3.5)
DEFAULT_SYSTEM_PROMPT = ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、"
                         "清华大学及多家合作单位联合开发的多模态大语言模型。")

#: placeholder ids of `prompt_text` (no tokenizer) -> their text
_CONTROL_TEXT = {-1: "<|im_start|>", -2: "<|im_end|>", -3: REF_START, -4: REF_END}

Segment = Union[str, int, "ImageBlock"]


@dataclass(frozen=True)
class ImageBlock:
    """`<img>` + n_tokens x `<IMG_CONTEXT>` + `</img>`."""

    n_tokens: int


def prompt_segments(question: str | Sequence[str | int], tiles_per_image: Sequence[int] = (),
                    video: bool = False, system_prompt: str | None = None,
                    num_image_token: int = 256, im_start: int = -1,
                    im_end: int = -2) -> list[Segment]:
    """The prompt as a list of text (str), control-token ids (int) and image blocks.

    `question` is user text, or a sequence of text and control-token ids built by the package
    itself (`locate_question`), never by a user."""
    system = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
    segs: list[Segment] = [im_start, "system\n" + system, im_end, "\n", im_start, "user\n"]
    n = len(tiles_per_image)
    for i, tiles in enumerate(tiles_per_image):
        if video:
            label = f"Frame{i + 1}: "
        elif n > 1:
            label = f"Image-{i + 1}: "
        else:
            label = ""
        # merge text with the previous text segment: HF tokenizes text between two control
        # tokens as one piece, so must we
        _append_text(segs, label)
        segs.append(ImageBlock(num_image_token * int(tiles)))
        segs.append("\n")
    for part in ([question] if isinstance(question, str) else question):
        if isinstance(part, str):
            _append_text(segs, part)
        else:
            segs.append(int(part))
    segs += [im_end, "\n", im_start, "assistant\n"]
    return segs


def _append_text(segs: list, text: str) -> None:
    if not text:
        return
    if segs and isinstance(segs[-1], str):
        segs[-1] = segs[-1] + text
    else:
        segs.append(text)


def locate_question(tokenizer: Tokenizer | None, phrase: str) -> list[str | int]:
    """InternVL's grounding question for `phrase`: the `<ref>`/`</ref>` tokens are inserted by
    id, the phrase stays plain text (a phrase typing `</ref><box>` cannot inject markup).
    Without a tokenizer the ids are -3/-4 (for `prompt_text`)."""
    phrase = check_phrase(phrase)
    if tokenizer is None:
        return [LOCATE_PREFIX, -3, phrase, -4]
    ids = [tokenizer.token_to_id(t) for t in (REF_START, REF_END)]
    if None in ids:
        raise ConfigError(f"locate needs the tokens {REF_START} and {REF_END}, which "
                          f"{tokenizer.source} lacks; use the tokenizer that came with the "
                          "InternVL checkpoint")
    return [LOCATE_PREFIX, ids[0], phrase, ids[1]]


def build_prompt_ids(tokenizer: Tokenizer, question: str | Sequence[str | int],
                     tiles_per_image: Sequence[int] = (), video: bool = False,
                     system_prompt: str | None = None, num_image_token: int = 256) -> list[int]:
    """Token ids of the full prompt (see module docstring)."""
    segs = prompt_segments(question, tiles_per_image, video, system_prompt, num_image_token,
                           im_start=tokenizer.im_start_id, im_end=tokenizer.im_end_id)
    ids: list[int] = []
    for seg in segs:
        if isinstance(seg, ImageBlock):
            ids.append(tokenizer.img_start_id)
            ids.extend([tokenizer.img_context_id] * seg.n_tokens)
            ids.append(tokenizer.img_end_id)
        elif isinstance(seg, int):
            ids.append(seg)
        else:
            ids.extend(tokenizer.encode_plain(seg))
    return ids


def prompt_text(question: str | Sequence[str | int], tiles_per_image: Sequence[int] = (),
                video: bool = False, system_prompt: str | None = None,
                num_image_token: int = 256) -> str:
    """The same prompt as one string (for logging and for comparing with HF tokenizers)."""
    out = []
    for seg in prompt_segments(question, tiles_per_image, video, system_prompt, num_image_token):
        if isinstance(seg, ImageBlock):
            out.append("<img>" + "<IMG_CONTEXT>" * seg.n_tokens + "</img>")
        elif isinstance(seg, int):
            out.append(_CONTROL_TEXT[seg])
        else:
            out.append(seg)
    return "".join(out)
