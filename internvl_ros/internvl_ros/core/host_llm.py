"""The host layout's language model: one graph for all layers, the KV cache kept backend-side.

The host layout (`internvl-export --layout host`, docs/MODEL_DIR.md) puts every decoder layer,
the final norm and the lm_head in one model whose attention appends new K/V rows in place to a
cache the backend owns. So a step hands the backend only the new rows' embeddings and their
start position, and gets one logits row back: no cache crosses the Python boundary.

`HostLanguageModel` offers the Pipeline what `llm.LanguageModel` offers (prefill, decode,
reset, check_prompt_length, max_prompt_tokens, max_ctx, cache.filled, embed, close). The
backend object is a `KVSession` (onnxruntime: `backends.onnxruntime_backend.OnnxRuntimeKVSession`).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .errors import (
    BackendError,
    ConfigError,
    InternVLError,
    PromptTooLongError,
    ShapeMismatchError,
)
from .kvfeed import KVFeedStatus
from .llm import LanguageModel, check_logits, check_max_context
from .modeldir import ModelConfig

DEFAULT_MAX_CONTEXT = 2048  # as the split layout on the host
DEFAULT_PREFILL_CHUNK = 512  # rows per prefill step: bounds the attention scratch memory


class KVSession(Protocol):
    """A whole-language-model session that keeps its own KV cache."""

    path: str
    num_layers: int
    hidden: int
    vocab: int
    max_positions: int | None  # longest context the graph supports (RoPE tables), if known
    rows: int  # cache rows allocated

    def allocate(self, rows: int) -> None:
        """Allocate a zeroed cache of `rows` rows per layer."""

    def clear(self) -> None:
        """Zero the whole cache."""

    def step(self, embeds: np.ndarray, past: int) -> np.ndarray:
        """Run embeddings (1, n, hidden) at positions [past, past + n), writing their K/V
        rows; return the logits (vocab,) of the last row."""

    def close(self) -> None: ...


class CacheState:
    """How many cache rows hold the tokens fed so far (the rows live in the session)."""

    def __init__(self):
        self.filled = 0
        self.tainted = False  # rows may hold non-finite values: zero them on reset

    def taint(self) -> None:
        self.tainted = True


class HostLanguageModel:
    """Prefill/decode over a KVSession, with token embeddings looked up on the host."""

    fixed = False  # dynamic shapes: no shape groups, no padding

    def __init__(self, session: KVSession, embeddings: np.ndarray, config: ModelConfig,
                 max_context: int | None = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK):
        max_context = check_max_context(max_context)
        self.session = session
        self.embeddings = embeddings  # (vocab, hidden), usually memory-mapped
        self.config = config
        path = getattr(session, "path", "host graph")
        if session.num_layers != config.num_hidden_layers or session.hidden != \
                config.hidden_size:
            raise ShapeMismatchError(
                f"{path} has {session.num_layers} layers of hidden size {session.hidden} but "
                f"config.json says {config.text_field}.num_hidden_layers="
                f"{config.num_hidden_layers}, hidden_size={config.hidden_size}; the model file "
                "and config.json belong to different models")
        limit = session.max_positions
        if max_context is not None and limit is not None and max_context > limit:
            raise ConfigError(f"max_context={max_context} exceeds the {limit} positions {path} "
                              "was exported for; re-export with a larger --max-positions")
        self.max_ctx = max_context or min(DEFAULT_MAX_CONTEXT, limit or DEFAULT_MAX_CONTEXT)
        self.max_prefill = self.max_ctx
        self.chunk = int(prefill_chunk)
        self.cache = CacheState()
        self.prefills = 0  # prefills started: a change means the rows were overwritten
        session.allocate(self.max_ctx)

    @property
    def kv_feed(self) -> KVFeedStatus:
        """kv_feed is an NPU matter: here the cache lives in the session's own buffers."""
        return KVFeedStatus("auto", "full", "host layout: the KV cache stays in onnxruntime's "
                            "buffers and grows in place (IOBinding); kv_feed applies to the NPU")

    @property
    def max_prompt_tokens(self) -> int:
        return self.max_ctx

    embed = LanguageModel.embed  # token embeddings (n, hidden) float32, same checks
    _start_prefill = LanguageModel._start_prefill  # the same keep rules and cache set-up

    def reset(self, clear: bool = True) -> None:
        """Forget the KV state; `clear` (or a tainted cache) also zeroes the rows. Stale rows
        are never read otherwise: attention reads rows [0, filled) only."""
        if clear or self.cache.tainted:
            self.session.clear()
            self.cache.tainted = False
        self.cache.filled = 0

    def check_prompt_length(self, length: int, detail: str = "") -> None:
        if length < 1:
            raise PromptTooLongError("the prompt is empty")
        if length > self.max_prompt_tokens:
            raise PromptTooLongError(
                f"the prompt is {length} tokens{detail} but this model accepts at most "
                f"{self.max_prompt_tokens} (its context). Shorten the question, send fewer "
                "images or frames, or use fewer tiles per image; image tokens are never "
                "truncated")

    def reusable_rows(self, n: int) -> int:
        """The most leading cache rows, at most `n`, a prefill can keep: every filled row
        (dynamic shapes), none when the rows may be non-finite."""
        if self.cache.tainted:
            return 0
        return max(0, min(int(n), self.cache.filled))

    def prefill(self, embeds: np.ndarray, keep: int = 0) -> np.ndarray:
        """Run the prompt embeddings (L, hidden); return the logits (vocab,) of the last token.

        `keep` (as LanguageModel.prefill): the cache's first `keep` rows already hold this
        prompt's first `keep` tokens, so only rows [keep, L) run; keep = 0 starts afresh."""
        length = embeds.shape[0]
        self._start_prefill(length, keep)
        logits = None
        for start in range(keep, length, self.chunk):
            rows = embeds[start:start + self.chunk][None]  # (1, n, hidden)
            logits = self._step(rows, start, "prefill")
            self.cache.filled = start + rows.shape[1]
        return logits

    def decode(self, token_id: int) -> np.ndarray:
        """Feed one token at the next position; return the logits (vocab,) after it."""
        pos = self.cache.filled
        if pos >= self.max_ctx:
            raise PromptTooLongError(f"the context of {self.max_ctx} tokens is full")
        logits = self._step(self.embed([token_id])[None], pos, "decode")  # (1, 1, hidden) in
        self.cache.filled = pos + 1
        return logits

    def _step(self, rows: np.ndarray, past: int, what: str) -> np.ndarray:
        try:
            logits = self.session.step(rows, past)  # (vocab,)
        except InternVLError:
            raise
        except Exception as exc:  # backends raise their own types
            raise BackendError(f"{what} ({getattr(self.session, 'path', '?')}) failed: "
                               f"{type(exc).__name__}: {exc}") from exc
        check_logits(logits, self.cache, getattr(self.session, "path", "?"))
        return logits

    def close(self) -> None:
        self.session.close()
