"""Pipeline: images + question -> streamed tokens, with an explicit step API.

    pipe = Pipeline.from_model_dir(path, backend="onnxruntime")
    gen = pipe.generate("What is in front of the robot?", images=[rgb])
    for step in gen:              # one step per generated token
        print(step.text_delta, end="")
    print(gen.result.finish_reason, gen.result.timings)
    pipe.close()

Several questions about one frame (the image's work done once; core/ask.py):

    for answer in pipe.ask(["Is the door open?", Question("Which side?", choices=("left",
                           "right"))], images=[rgb], frame_key=("front", stamp)):
        print(answer.text, answer.choice_index)
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .constraint import ChoiceConstraint, TokenTable
from .errors import BackendError, BusyError, ConfigError, ModelDirError, ShapeMismatchError
from .framecache import DEFAULT_FRAME_CACHE_BYTES, EncodedFrame, FrameCache
from .host_llm import HostLanguageModel
from .kvfeed import KVFeedStatus, check_kv_feed
from .llm import LanguageModel, cast, check_max_context, run_session
from .modeldir import ModelDir, load_model_dir
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, check_rgb, decode_image, preprocess_image
from .prompt import build_prompt_ids
from .sampling import GenerationConfig, Sampler
from .tokenizer import Tokenizer

FINISH_REASONS = ("eos", "length", "context", "cancelled")


@dataclass
class Timings:
    """Per-request timings in seconds (ttft from request start to the first token)."""

    preprocess_s: float = 0.0
    vit_s: float = 0.0
    prefill_s: float = 0.0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    total_s: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    image_tiles: int = 0
    #: leading prompt tokens whose KV rows were kept from the previous request (not prefilled)
    cached_prompt_tokens: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Step:
    """One generated token."""

    index: int
    token_id: int
    text_delta: str


@dataclass
class GenerationResult:
    """The outcome of one request. `token_ids` excludes the stop token."""

    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str
    timings: Timings = field(default_factory=Timings)
    #: text completed only at the end (a held-back partial UTF-8 sequence), not in any Step
    text_tail: str = ""
    #: with `choices`: the index of the choice the text equals; -1 otherwise
    choice_index: int = -1

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": list(self.token_ids),
                "prompt_token_ids": list(self.prompt_token_ids),
                "finish_reason": self.finish_reason, "choice_index": self.choice_index,
                "timings": self.timings.to_dict()}


class VisionModel:
    """ViT + projector: (n_tiles, 3, S, S) -> (n_tiles * tokens, hidden), one tile per run.

    The model takes ImageNet-normalised float (1, 3, S, S) (what the published build and our
    export use), or raw RGB uint8 (1, S, S, 3) when it was compiled with the normalisation
    inside (Axera's NHWC/U8 input configuration).
    """

    def __init__(self, session, config):
        self.session = session
        node = session.get_inputs(0)[0]
        self.input_name, self.input_dtype = node.name, node.dtype
        shape = tuple(node.shape)
        self.nhwc_u8 = len(shape) == 4 and shape[-1] == 3 and node.dtype == np.uint8
        size = shape[1] if self.nhwc_u8 else shape[-1]
        self.image_size = size if isinstance(size, int) else config.image_size
        out = session.get_outputs(0)[0]
        hidden = out.shape[-1]
        path = getattr(session, "path", "vit")
        if isinstance(hidden, int) and hidden != config.hidden_size:
            raise ShapeMismatchError(
                f"ViT {path} outputs hidden size {hidden} but config.json says "
                f"{config.text_field}.hidden_size={config.hidden_size}; the ViT and the "
                "language model belong to different models")
        tokens = out.shape[1] if len(out.shape) == 3 else None
        self.tokens_per_tile = tokens if isinstance(tokens, int) else config.num_image_token
        self.hidden = config.hidden_size

    def __call__(self, pixel_values: np.ndarray) -> np.ndarray:
        feats = []
        for tile in pixel_values:  # (3, S, S)
            if self.nhwc_u8:  # undo the normalisation exactly: back to the uint8 pixels
                rgb = (tile.transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN) * 255.0
                x = np.rint(rgb).clip(0, 255).astype(np.uint8)[None]  # (1, S, S, 3)
            else:
                x = cast(np.ascontiguousarray(tile[None]), self.input_dtype)  # (1, 3, S, S)
            out = run_session(self.session, {self.input_name: x}, 0, "ViT")[0]
            out = np.asarray(out, dtype=np.float32).reshape(-1, self.hidden)  # (tokens, hidden)
            if out.shape[0] != self.tokens_per_tile:
                raise ShapeMismatchError(f"ViT returned {out.shape[0]} embeddings per tile, "
                                         f"expected {self.tokens_per_tile}")
            feats.append(out)
        return np.concatenate(feats, axis=0)  # (n_tiles * tokens, hidden)


class Pipeline:
    """Loaded model (tokenizer, ViT, layers, post, embeddings). One generation at a time."""

    def __init__(self, model_dir: ModelDir, backend, max_context: int | None = None,
                 max_tiles: int = 1, kv_feed: str = "auto",
                 frame_cache_bytes: int = DEFAULT_FRAME_CACHE_BYTES,
                 frame_cache_frames: int | None = None):
        self.model_dir = model_dir
        self.config = model_dir.config
        self.backend_name = getattr(backend, "name", str(backend))
        if isinstance(max_tiles, bool) or not isinstance(max_tiles, int) or max_tiles < 1:
            raise ConfigError(f"max_tiles={max_tiles!r} must be an integer >= 1")
        self.max_tiles = max_tiles
        # encoded frames by the caller's frame key
        self.frames = FrameCache(frame_cache_bytes, frame_cache_frames)
        self._prefix = None  # (frame, prompt ids, llm.prefills) of the prompt rows in the cache
        self._token_table: TokenTable | None = None
        self._constraints: dict[tuple, ChoiceConstraint] = {}
        max_context = check_max_context(max_context)
        paths = model_dir.paths
        self.tokenizer = model_dir.tokenizer or Tokenizer.from_path(
            paths.tokenizer, hf_dir=paths.hf_dir, extra_eos=self.config.eos_token_ids)
        sessions = []
        try:
            embeddings = np.load(paths.embeddings, mmap_mode="r")  # (vocab, hidden)
            if paths.layout == "host":  # one graph, KV cache kept by the backend
                sessions.append(backend.open(str(paths.host_lm), role="host_lm"))
                self.llm = HostLanguageModel(sessions[-1], embeddings, self.config,
                                             max_context=max_context)
            else:
                layers = []
                for p in paths.layers:
                    layers.append(backend.open(str(p)))
                    sessions.append(layers[-1])
                post = backend.open(str(paths.post))
                sessions.append(post)
                self.llm = LanguageModel(layers, post, embeddings, self.config,
                                         max_context=max_context, kv_feed=kv_feed)
            self.vision = None
            if paths.vit is not None:
                vit = backend.open(str(paths.vit), role="vit")
                sessions.append(vit)
                self.vision = VisionModel(vit, self.config)
        except BaseException:
            for s in sessions:
                s.close()
            raise
        self._lock = threading.Lock()
        self._active = None  # weakref to the unfinished Generation: an abandoned one frees us
        self._closed = False
        #: time.monotonic() when a generation step last returned (a watchdog's sign of life)
        self.last_step: float | None = None

    @classmethod
    def from_model_dir(cls, path: str | Path | None = None,
                       backend: str = "onnxruntime", provider=None,
                       num_threads: int | None = None, max_context: int | None = None,
                       max_tiles: int = 1, kv_feed: str = "auto", device_id: int | None = None,
                       frame_cache_bytes: int = DEFAULT_FRAME_CACHE_BYTES,
                       frame_cache_frames: int | None = None, **paths) -> Pipeline:
        """Discover and load a model dir. `paths` may override roles: config, tokenizer,
        layers, post, vit, embeddings (see core.modeldir.discover). `kv_feed` (auto, full,
        rows): how the NPU layers get the KV cache (core/kvfeed.py; `pipe.kv_feed` tells what
        is used); `device_id`: the Axera M.2 card (axengine backend); `frame_cache_bytes` and
        `frame_cache_frames`: the bounds of the frame cache (core/framecache.py)."""
        from ..backends import get_backend

        check_max_context(max_context)  # before anything loads
        check_kv_feed(kv_feed)
        FrameCache(frame_cache_bytes, frame_cache_frames)  # validates
        model_dir = load_model_dir(path, backend, **paths)
        impl = get_backend(backend, provider=provider, num_threads=num_threads,
                           device_id=device_id)
        return cls(model_dir, impl, max_context=max_context, max_tiles=max_tiles,
                   kv_feed=kv_feed, frame_cache_bytes=frame_cache_bytes,
                   frame_cache_frames=frame_cache_frames)

    # ------------------------------------------------------------------ properties

    @property
    def num_image_token(self) -> int:
        return self.vision.tokens_per_tile if self.vision else self.config.num_image_token

    @property
    def image_size(self) -> int:
        return self.vision.image_size if self.vision else self.config.image_size

    @property
    def max_prompt_tokens(self) -> int:
        return self.llm.max_prompt_tokens

    @property
    def max_context(self) -> int:
        return self.llm.max_ctx

    @property
    def kv_feed(self) -> KVFeedStatus:
        """How the NPU layers get the KV cache now: `.mode` (rows or full), `.requested`,
        `.reason`, `.verified_steps`; `.to_dict()` for diagnostics."""
        return self.llm.kv_feed

    @property
    def busy(self) -> bool:
        return self._current() is not None

    def _current(self) -> Generation | None:
        gen = self._active() if self._active is not None else None
        return gen if gen is not None and not gen.finished else None

    # ------------------------------------------------------------------ requests

    def prepare(self, prompt: str, images: Sequence = (), video: bool = False,
                system_prompt: str | None = None):
        """Preprocess images and build prompt ids: (prompt_ids, pixel_values or None)."""
        frame = self._frame(images, video)
        return self._prompt_ids(prompt, frame, system_prompt), (
            None if frame is None else frame.pixels)  # (n_tiles, 3, S, S)

    def _frame(self, images: Sequence, video: bool = False,
               frame_key=None) -> EncodedFrame | None:
        """The request's images as an EncodedFrame (None without images): from the frame
        cache when `frame_key` names a frame encoded before, else preprocessed now."""
        if isinstance(images, (np.ndarray, bytes, bytearray)):
            images = [images]  # a single image
        images = list(images or ())
        shapes = tuple(img.shape if isinstance(img, np.ndarray) else (type(img).__name__,
                                                                       len(img))
                       for img in images)
        key = None
        if frame_key is not None and images:
            FrameCache.check_key(frame_key)
            key = (frame_key, bool(video), self.max_tiles)
            hit = self.frames.get(key)
            if hit is not None and hit.shapes == shapes:
                return hit
        pixel_list = []
        for i, img in enumerate(images):
            if isinstance(img, (bytes, bytearray, memoryview)):
                img = decode_image(bytes(img), source=f"image {i}")
            check_rgb(img)
            tiles = 1 if video else self.max_tiles  # InternVL runs video frames as 1 tile
            pixel_list.append(preprocess_image(img, max_num=tiles, image_size=self.image_size))
        if not pixel_list:
            return None
        if self.vision is None:
            raise ModelDirError(f"no ViT model (*vit*{self.backend_ext}) was found in the model "
                                "dir, so images cannot be used; add the ViT file or pass vit=")
        return EncodedFrame(tiles=tuple(len(p) for p in pixel_list), video=bool(video),
                            shapes=shapes, pixels=np.concatenate(pixel_list), key=key)

    def _prompt_ids(self, prompt: str | Sequence[str | int], frame: EncodedFrame | None,
                    system_prompt: str | None) -> list[int]:
        """The prompt's token ids, checked against the prompt limit. `prompt` is user text, or
        the package's own sequence of text and control-token ids (`prompt.locate_question`)."""
        if not isinstance(prompt, str) and not (
                isinstance(prompt, (list, tuple))
                and all(isinstance(p, (str, int)) and not isinstance(p, bool) for p in prompt)):
            raise ShapeMismatchError(f"prompt must be a string (or locate_question's sequence), "
                                     f"got {type(prompt).__name__}")
        tiles = list(frame.tiles) if frame is not None else []
        video = frame.video if frame is not None else False
        ids = build_prompt_ids(self.tokenizer, prompt, tiles, video=video,
                               system_prompt=system_prompt, num_image_token=self.num_image_token)
        n_img = sum(tiles) * self.num_image_token
        detail = (f" ({len(ids) - n_img} text + {n_img} image tokens for {sum(tiles)} tile(s))"
                  if n_img else "")
        self.llm.check_prompt_length(len(ids), detail)
        return ids

    def fit_frames(self, prompt: str, system_prompt: str | None = None,
                   max_frames: int = 8) -> int:
        """The most video frames (one tile each, at most `max_frames`) whose prompt fits
        `max_prompt_tokens`; 0 if not even one does. E.g. 4 on the AX650N build (1152-token
        prefill limit), 7 on the host's default 2048-token context."""
        for n in range(max_frames, 0, -1):
            ids = build_prompt_ids(self.tokenizer, prompt, [1] * n, video=True,
                                   system_prompt=system_prompt,
                                   num_image_token=self.num_image_token)
            if len(ids) <= self.max_prompt_tokens:
                return n
        return 0

    @property
    def backend_ext(self) -> str:
        return ".axmodel" if self.backend_name == "axengine" else ".onnx"

    def generate(self, prompt: str | Sequence[str | int], images: Sequence = (),
                 video: bool = False, system_prompt: str | None = None,
                 config: GenerationConfig | None = None, frame_key=None) -> Generation:
        """Start a request; iterate the returned Generation for tokens. `prompt` is the question:
        user text, or `prompt.locate_question(tokenizer, phrase)` (grounding).

        `frame_key` (hashable, e.g. (camera, stamp, arrival)) names the frame the images are:
        a frame encoded before under that key skips preprocessing and the ViT (the frame
        cache), and the KV rows of a prompt prefix shared with the previous request on the
        same frame are kept. Input errors (image, prompt length, choices) raise here. Raises
        BusyError while another generation of this pipeline is unfinished.
        """
        t0 = time.perf_counter()
        config = self._check_request(config)
        frame = self._frame(images, video, frame_key)
        return self._start(prompt, frame, system_prompt, config, t0)

    def ask(self, questions: Sequence, images: Sequence = (), video: bool = False,
            system_prompt: str | None = None, config: GenerationConfig | None = None,
            frame_key=None):
        """Several questions about the same images; iterate the returned `Ask` for one
        `Answer` per question, in order (core/ask.py). The images are preprocessed once
        (image errors raise here), encoded once by the ViT, and the KV rows of the shared
        prefix (system prompt and image block) are computed once: each further question
        prefills only its own tokens. `questions`: strings or `Question`s (own choices and
        max_new_tokens); `config` holds the rest. One bad question fails its own Answer only.
        """
        from .ask import Ask

        t0 = time.perf_counter()
        config = self._check_request(config)
        frame = self._frame(images, video, frame_key)
        return Ask(self, questions, frame, system_prompt, config, t0)

    def _check_request(self, config: GenerationConfig | None) -> GenerationConfig:
        if self._closed:
            raise BackendError("the pipeline is closed; create a new one")
        config = config if config is not None else GenerationConfig()
        if not isinstance(config, GenerationConfig):
            raise ConfigError(f"config must be a GenerationConfig, got {type(config).__name__}")
        return config

    def _start(self, prompt: str | Sequence[str | int], frame: EncodedFrame | None,
               system_prompt: str | None, config: GenerationConfig, t0: float) -> Generation:
        ids = self._prompt_ids(prompt, frame, system_prompt)
        choice = self._constraint(config)
        with self._lock:
            if self._current() is not None:
                raise BusyError("this pipeline is already generating; iterate the current "
                                "generation to its end or call its cancel(), then retry")
            gen = Generation(self, ids, frame, config, t0, choice)
            self._active = weakref.ref(gen)
        gen.timings.preprocess_s = time.perf_counter() - t0
        return gen

    def _constraint(self, config: GenerationConfig) -> ChoiceConstraint | None:
        """The token automaton of config.choices (built once per choices list), or None."""
        if not config.choices:
            return None
        choice = self._constraints.get(config.choices)
        if choice is None:
            if self._token_table is None:
                self._token_table = TokenTable(self.tokenizer)
            choice = ChoiceConstraint(config.choices, self._token_table)
            if len(self._constraints) >= 64:
                self._constraints.pop(next(iter(self._constraints)))
            self._constraints[config.choices] = choice
        choice.check_budget(config.max_new_tokens)
        return choice

    def _features(self, frame: EncodedFrame, timings: Timings) -> np.ndarray:
        """The frame's ViT embeddings (n_tiles * tokens, hidden), computed on first use."""
        if frame.features is None:
            t = time.perf_counter()
            frame.features = self.vision(frame.pixels)  # (n_tiles * 256, hidden)
            timings.vit_s = time.perf_counter() - t
            frame.pixels = None
            if frame.key is not None:
                self.frames.put(frame.key, frame)
        return frame.features

    def _kept_rows(self, ids: list[int], frame: EncodedFrame | None) -> int:
        """Leading rows of the KV cache a prefill of `ids` about `frame` can keep: the common
        prefix with the previous prompt when it was about the same frame (or both had no
        image) and nothing overwrote the rows since; never the last token (its logits are
        needed); whole slices only on the NPU."""
        if self._prefix is None:
            return 0
        prev_frame, prev_ids, prefills = self._prefix
        if prev_frame is not frame or prefills != self.llm.prefills:
            return 0
        n = min(len(prev_ids), len(ids) - 1)
        differ = np.flatnonzero(np.asarray(prev_ids[:n]) != np.asarray(ids[:n]))
        common = int(differ[0]) if differ.size else n
        return self.llm.reusable_rows(common)

    def _release(self, gen: Generation) -> None:
        with self._lock:
            if self._active is not None and self._active() in (gen, None):
                self._active = None

    def reset(self) -> None:
        """Drop the KV state (a new request resets it anyway). The frame cache stays
        (`frames.clear()` empties it)."""
        with self._lock:
            if self._current() is None:
                self._prefix = None
                self.llm.reset()

    def close(self) -> None:
        """Release the sessions. The pipeline cannot be used afterwards."""
        if not self._closed:
            self._closed = True
            self.llm.close()
            if self.vision is not None:
                self.vision.session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class Generation:
    """An iterator of Steps (one per generated token) for one request.

    Iterate it from one thread at a time (a second thread gets BusyError). `cancel()` and
    `close()` are safe from any thread: no Step is yielded after they return, except one that
    had already been sampled. `close()` also frees the pipeline; while another thread is inside
    a step, the pipeline is freed when that step ends, never under a running model. `result`
    is the GenerationResult, running the generation to its end first if needed. Stops on an
    eos token, `<|im_end|>`, max_new_tokens or the context limit; with `choices`, also as
    soon as the text is a complete choice that no other choice continues (finish_reason
    "eos", without running the model for the eos).
    """

    def __init__(self, pipeline: Pipeline, prompt_ids: list[int], frame: EncodedFrame | None,
                 config: GenerationConfig, t0: float, choice: ChoiceConstraint | None = None):
        self._pipe = pipeline
        self.prompt_ids = list(prompt_ids)
        self._frame = frame
        self.config = config
        self._t0 = t0
        self._sampler = Sampler(config)
        self._choice = choice.start() if choice is not None else None
        # the ids the repetition penalty covers: generated ids (and the prompt's if asked)
        head = self.prompt_ids if config.penalize_prompt else []
        # no more tokens than the context holds (max_new_tokens may be 2**32 - 1 from a request)
        most = min(config.max_new_tokens, pipeline.llm.max_ctx)
        self._history = np.empty(len(head) + most, dtype=np.int64)
        self._history[:len(head)] = head
        self._n_history = len(head)
        self._stream = pipeline.tokenizer.stream_decoder()
        self._eos = set(pipeline.tokenizer.eos_token_ids)
        self.token_ids: list[int] = []
        self.timings = Timings(prompt_tokens=len(self.prompt_ids),
                               image_tiles=0 if frame is None else frame.n_tiles)
        self._logits: np.ndarray | None = None
        self._cancel = threading.Event()
        self._state = threading.Lock()  # guards _running, _close_requested and finishing
        self._running = False  # a thread is inside a step
        self._close_requested = False  # close() came during a step: finish when it ends
        self._finish: str | None = None
        self._result: GenerationResult | None = None
        self._t_first: float | None = None
        self._decode_steps = 0
        self._error: BaseException | None = None

    # ---------------------------------------------------------------- control

    def cancel(self) -> None:
        """Ask the generation to stop before its next token (finish_reason 'cancelled')."""
        self._cancel.set()

    @property
    def finished(self) -> bool:
        return self._finish is not None

    def step(self) -> Step | None:
        """Generate one token (as next()); None once the generation has finished."""
        try:
            return next(self)
        except StopIteration:
            return None

    @property
    def result(self) -> GenerationResult:
        if self._result is None:
            for _ in self:
                pass
        if self._result is None:
            raise BackendError(f"the generation failed: {self._error}")
        return self._result

    def close(self) -> None:
        """Abandon the generation (finish_reason 'cancelled') and free the pipeline: now, or
        when the step another thread is running ends."""
        with self._state:
            self._cancel.set()
            if self._finish is not None:
                return
            if self._running:
                self._close_requested = True
                return
            self._done("cancelled")

    # ---------------------------------------------------------------- iteration

    def __iter__(self):
        return self

    def __next__(self) -> Step:
        with self._state:
            if self._running:
                raise BusyError("another thread is iterating this generation; iterate it from "
                                "one thread (cancel() and close() are safe from any thread)")
            if self._finish is not None:
                raise StopIteration
            self._running = True
        try:
            return self._next()
        except StopIteration:
            raise
        except BaseException as exc:
            self._fail(exc)
            raise
        finally:
            self._pipe.last_step = time.monotonic()
            with self._state:
                self._running = False
                if self._close_requested and self._finish is None:
                    self._done("cancelled")

    def _next(self) -> Step:
        llm = self._pipe.llm
        if self._cancel.is_set():
            self._stop("cancelled")
        budget = self.config.max_new_tokens - len(self.token_ids)  # tokens still allowed
        if self._logits is None:  # first call: ViT + prefill
            self._logits = self._prefill()
        else:
            if self._choice is not None and self._choice.done(budget):
                self._stop("eos")  # a complete choice: the eos is all that may follow
            if budget <= 0:
                self._stop("length")
            if llm.cache.filled >= llm.max_ctx:
                self._stop("context")
            t = time.perf_counter()
            self._logits = llm.decode(self.token_ids[-1])
            self.timings.decode_s += time.perf_counter() - t
            self._decode_steps += 1
        penalised = (self._history[:self._n_history]
                     if self.config.repetition_penalty != 1.0 else ())
        if self._choice is None:
            token = self._sampler(self._logits, penalised)
        else:
            token = self._sampler(self._logits, penalised, allowed=self._choice.allowed(budget))
        if self._t_first is None:
            self._t_first = time.perf_counter()
            self.timings.ttft_s = self._t_first - self._t0
        if self._cancel.is_set():  # cancelled during this step: yield nothing more
            self._stop("cancelled")
        if token in self._eos:
            self._stop("eos")
        if self._choice is not None:
            self._choice.advance(token)
        self.token_ids.append(token)
        self._history[self._n_history] = token
        self._n_history += 1
        delta = self._stream.push(token)
        return Step(index=len(self.token_ids) - 1, token_id=token, text_delta=delta)

    def _prefill(self) -> np.ndarray:
        pipe, llm = self._pipe, self._pipe.llm
        embeds = llm.embed(self.prompt_ids)  # (L, hidden)
        if self._frame is not None:
            feats = pipe._features(self._frame, self.timings)  # (n_tiles * 256, hidden)
            where = np.flatnonzero(np.asarray(self.prompt_ids) == pipe.tokenizer.img_context_id)
            if where.size != feats.shape[0]:
                raise ShapeMismatchError(f"the prompt has {where.size} <IMG_CONTEXT> tokens but "
                                         f"the ViT produced {feats.shape[0]} embeddings")
            embeds[where] = feats
        keep = pipe._kept_rows(self.prompt_ids, self._frame)
        t = time.perf_counter()
        logits = llm.prefill(embeds, keep=keep)
        self.timings.prefill_s = time.perf_counter() - t
        self.timings.cached_prompt_tokens = keep
        pipe._prefix = (self._frame, self.prompt_ids, llm.prefills)  # rows [0, L) are ours
        return logits

    def _stop(self, reason: str):
        self._done(reason)
        raise StopIteration

    def _done(self, reason: str) -> None:
        t_end = time.perf_counter()
        tm = self.timings
        tm.generated_tokens = len(self.token_ids)
        tm.total_s = t_end - self._t0
        if tm.decode_s > 0:
            tm.decode_tokens_per_s = self._decode_steps / tm.decode_s
        tail = self._stream.flush()
        self._result = GenerationResult(
            text=self._stream.text, token_ids=list(self.token_ids),
            prompt_token_ids=list(self.prompt_ids), finish_reason=reason, timings=tm,
            text_tail=tail, choice_index=-1 if self._choice is None else self._choice.choice_index)
        self._frame = None
        self._logits = None
        self._finish = reason  # last: from here on generate() may start the next request
        self._pipe._release(self)

    def _fail(self, exc: BaseException) -> None:
        """A backend (or other) error: reset (and zero) the KV state, free the pipeline."""
        self._error = exc
        try:
            self._pipe._prefix = None
            self._pipe.llm.reset(clear=True)
        finally:
            self._finish = "error"
            self._pipe._release(self)
