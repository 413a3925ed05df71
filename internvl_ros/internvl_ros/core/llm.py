"""The split language model: per-layer sessions, KV cache, chunked prefill, decode, post.

Two feeding strategies, picked from the sessions:
- dynamic (onnxruntime): feed only the filled part of the cache; mask (1, n, past + n);
  prefill slices are not padded.
- fixed shape groups (NPU): shapes come from `session.get_inputs(g)`. Group 0 is decode with
  the whole cache (1, kv_cache_len, kv_dim) and mask (1, 1, kv_cache_len + 1), the current token
  in the last column. Groups 1..G are prefill slices with past = mask_len - n; the first slice
  gets the dummy cache the model declares. The last slice is padded.

A prompt of L tokens runs ceil(L / chunk) slices; the logits come from row (L - 1) mod chunk of
the last slice (no extra all-padding slice when L is a multiple of the chunk).

On the NPU the layers run through a KVFeeder (core/kvfeed.py, `kv_feed`): the whole cache every
run (`full`), or only the rows the layer's input buffers do not hold yet (`rows`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import (
    BackendError,
    ConfigError,
    InternVLError,
    ModelDirError,
    PromptTooLongError,
    ShapeMismatchError,
)
from .kvcache import KVCache
from .kvfeed import VERIFY_EVERY, VERIFY_FIRST, KVFeeder, KVFeedStatus, check_kv_feed
from .modeldir import ModelConfig

MASKED = -65536.0  # additive mask value of the Axera build
LAYER_INPUTS = ("K_cache", "V_cache", "indices", "input", "mask")


@dataclass(frozen=True)
class PrefillGroup:
    """A fixed-shape prefill shape group: `n` rows per slice, `past` cached rows."""

    group: int
    n: int
    past: int
    cache_rows: int  # rows of the K_cache/V_cache input (1 for the dummy of the first slice)


def run_session(session, feed: dict[str, np.ndarray], shape_group: int, what: str):
    """session.run with errors turned into BackendError naming the model file."""
    try:
        return session.run(None, feed, shape_group=shape_group)
    except InternVLError:
        raise
    except Exception as exc:  # backends raise their own types (and AssertionError)
        raise BackendError(f"{what} ({getattr(session, 'path', '?')}, shape group "
                           f"{shape_group}) failed: {type(exc).__name__}: {exc}") from exc


def cast(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return x if x.dtype == dtype else x.astype(dtype)


def check_max_context(value) -> int | None:
    """None (the default window) or an integer >= 1; anything else is a ConfigError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"max_context={value!r} must be an integer >= 1 (the context window "
                          "in tokens), or None for the default (2048 on the host, the build's "
                          "own window on the NPU)")
    return int(value)


def _io_signature(nodes) -> dict:
    """{name: (shape, dtype)} of a session's inputs or outputs in one shape group."""
    return {n.name: (tuple(n.shape), np.dtype(n.dtype)) for n in nodes}


class LanguageModel:
    """Decoder layers + post + token embeddings, with a KV cache. `kv_feed` (core/kvfeed.py)
    defaults to "full" here, so that a directly built LanguageModel runs every layer through
    `session.run()`; Pipeline (what users and the node build) defaults to "auto"."""

    def __init__(self, layers: Sequence, post, embeddings: np.ndarray, config: ModelConfig,
                 max_context: int | None = None, prefill_chunk: int = 128,
                 kv_feed: str = "full", kv_verify_first: int = VERIFY_FIRST,
                 kv_verify_every: int = VERIFY_EVERY):
        if not layers:
            raise ShapeMismatchError("no decoder layer sessions")
        max_context = check_max_context(max_context)
        check_kv_feed(kv_feed)
        self.layers = list(layers)
        self.post = post
        self.embeddings = embeddings  # (vocab, hidden), usually memory-mapped
        self.config = config
        self.fixed = not getattr(self.layers[0], "dynamic_shapes", True)
        first = self.layers[0]
        self.num_groups = int(getattr(first, "num_shape_groups", 1)) if self.fixed else 1
        self._check_layer_io(first)
        self._check_layers_agree()
        # input dtypes per shape group: {group: {input name: dtype}}
        self.dtypes = {g: {i.name: np.dtype(i.dtype) for i in first.get_inputs(g)}
                       for g in range(self.num_groups)}
        self.post_dtype = post.get_inputs(0)[0].dtype
        self.post_input = post.get_inputs(0)[0].name

        if self.fixed:
            self._read_shape_groups(first)
        else:
            self.decode_group = 0
            self.chunk = int(prefill_chunk)
            self.max_ctx = max_context or 2048
            self.max_prefill = self.max_ctx
        if max_context is not None and self.fixed and max_context < self.max_ctx:
            self.max_ctx = max_context  # a smaller window than the build allows is fine
        # the cache is kept in the decode group's dtype (decode feeds it whole on the NPU)
        self.cache_dtype = self.dtypes[self.decode_group]["K_cache"]
        self.cache = KVCache(len(self.layers), self.max_ctx_rows, config.kv_dim,
                             self.cache_dtype)
        self.feeder = KVFeeder(self.layers, self.cache, kv_feed, fixed=self.fixed,
                               verify_first=kv_verify_first, verify_every=kv_verify_every)
        self.prefills = 0  # prefills started: a change means the rows were overwritten

    @property
    def kv_feed(self) -> KVFeedStatus:
        """The KV feed in use (rows or full) and why."""
        return self.feeder.status

    # ------------------------------------------------------------------ model introspection

    @property
    def max_ctx_rows(self) -> int:
        """Rows of the cache: the decode group's cache length on the NPU."""
        return self.decode_cache_len if self.fixed else self.max_ctx

    @property
    def max_prompt_tokens(self) -> int:
        """Longest prompt that fits: the prefill limit, and the context."""
        return min(self.max_prefill, self.max_ctx)

    def _check_layer_io(self, session) -> None:
        path = getattr(session, "path", "layer 0")
        for g in range(self.num_groups):
            names = [i.name for i in session.get_inputs(g)]
            missing = [n for n in LAYER_INPUTS if n not in names]
            if missing:
                where = f" shape group {g}" if self.fixed else ""
                raise ShapeMismatchError(
                    f"decoder layer {path}{where} lacks input(s) {missing} (it has {names}); "
                    f"the model contract (docs/MODEL_DIR.md) needs {list(LAYER_INPUTS)}. "
                    "Re-export the model")
        inputs = {i.name: i for i in session.get_inputs(0)}
        hidden = inputs["input"].shape[-1]
        if isinstance(hidden, int) and hidden != self.config.hidden_size:
            raise ShapeMismatchError(
                f"decoder layer {path} takes hidden size {hidden} (input 'input' "
                f"{inputs['input'].shape}) but config.json says {self.config.text_field}."
                f"hidden_size={self.config.hidden_size}; the layer files and config.json "
                "belong to different models")
        kv = inputs["K_cache"].shape[-1]
        if isinstance(kv, int) and kv != self.config.kv_dim:
            raise ShapeMismatchError(
                f"decoder layer {path} has K_cache width {kv} but config.json gives kv_dim = "
                f"num_key_value_heads * head_dim = {self.config.kv_dim}; the layer files and "
                "config.json belong to different models")
        post_in = self.post.get_inputs(0)[0].shape[-1]
        if isinstance(post_in, int) and post_in != self.config.hidden_size:
            raise ShapeMismatchError(
                f"post model {getattr(self.post, 'path', '')} takes hidden size {post_in} but "
                f"config.json says hidden_size={self.config.hidden_size}")

    def _check_layers_agree(self) -> None:
        """Every layer must have layer 0's shape groups, input and output names, shapes and
        dtypes (a mixed download would otherwise fail mid-request)."""
        first = self.layers[0]
        path0 = getattr(first, "path", "layer 0")
        for i, layer in enumerate(self.layers[1:], start=1):
            path = getattr(layer, "path", f"layer {i}")
            groups = int(getattr(layer, "num_shape_groups", 1)) if self.fixed else 1
            if getattr(layer, "dynamic_shapes", True) != (not self.fixed) \
                    or groups != self.num_groups:
                raise ModelDirError(
                    f"decoder layer file {path} has {groups} shape group(s) but {path0} has "
                    f"{self.num_groups}; the layer files come from different builds. Use the "
                    "layer files of one download or export, all together")
            for g in range(self.num_groups):
                for kind in ("inputs", "outputs"):
                    want = _io_signature(getattr(first, f"get_{kind}")(g))
                    got = _io_signature(getattr(layer, f"get_{kind}")(g))
                    if got == want:
                        continue
                    name = next((n for n in sorted(set(want) | set(got))
                                 if want.get(n) != got.get(n)), "?")
                    raise ModelDirError(
                        f"decoder layer file {path}, shape group {g}: {kind[:-1]} '{name}' is "
                        f"{_describe(got.get(name))} but {_describe(want.get(name))} in {path0}; "
                        "the layer files come from different builds (e.g. another context or "
                        "prefill length). Use the layer files of one download or export, all "
                        "together")

    def _read_shape_groups(self, session) -> None:
        path = getattr(session, "path", "layer 0")
        prefill: list[PrefillGroup] = []
        decode = None
        for g in range(session.num_shape_groups):
            shapes = {i.name: i.shape for i in session.get_inputs(g)}
            n = shapes["input"][1]
            mask_len = shapes["mask"][-1]
            cache_rows = shapes["K_cache"][1]
            if n == 1 and decode is None:
                if mask_len != cache_rows + 1:
                    raise ShapeMismatchError(
                        f"{path} shape group {g}: decode mask {shapes['mask']} must be one "
                        f"column longer than the cache {shapes['K_cache']}")
                decode = (g, cache_rows)
            else:
                past = mask_len - n
                if past < 0 or (past > 0 and cache_rows != past):
                    raise ShapeMismatchError(
                        f"{path} shape group {g}: cache {shapes['K_cache']} and mask "
                        f"{shapes['mask']} disagree for a prefill slice of {n} rows")
                prefill.append(PrefillGroup(g, n, past, cache_rows))
        if decode is None or not prefill:
            raise ShapeMismatchError(f"{path} has no decode shape group (n = 1) or no prefill "
                                     "shape group; this is not an Axera LLM layer build")
        chunks = {p.n for p in prefill}
        if len(chunks) != 1:
            raise ShapeMismatchError(f"{path}: prefill shape groups of different lengths "
                                     f"{sorted(chunks)}")
        self.chunk = chunks.pop()
        self.prefill_groups = {p.past: p for p in prefill}
        pasts = sorted(self.prefill_groups)
        # slices must be fed at past = 0, chunk, 2*chunk, ... without gaps
        usable = 0
        while usable in self.prefill_groups:
            usable += self.chunk
        if pasts[0] != 0:
            raise ShapeMismatchError(f"{path}: no prefill shape group for the first slice")
        self.max_prefill = usable
        self.decode_group, self.decode_cache_len = decode
        self.max_ctx = self.decode_cache_len

    # ------------------------------------------------------------------ running

    def embed(self, ids: Sequence[int]) -> np.ndarray:
        """Token embeddings (n, hidden) float32."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.embeddings.shape[0]):
            raise ShapeMismatchError(f"token id {int(ids.max())} is outside the embedding "
                                     f"matrix ({self.embeddings.shape[0]} rows)")
        return np.asarray(self.embeddings[ids], dtype=np.float32)  # (n, hidden)

    def reset(self, clear: bool = True) -> None:
        """Forget the KV state; `clear` also zeroes the used cache rows (after a failure)."""
        self.cache.reset(clear=clear)

    def check_prompt_length(self, length: int, detail: str = "") -> None:
        if length < 1:
            raise PromptTooLongError("the prompt is empty")
        if length > self.max_prompt_tokens:
            limits = (f"prefill limit {self.max_prefill} tokens, context {self.max_ctx} tokens"
                      if self.fixed else f"context {self.max_ctx} tokens")
            raise PromptTooLongError(
                f"the prompt is {length} tokens{detail} but this model accepts at most "
                f"{self.max_prompt_tokens} ({limits}). Shorten the question, send fewer "
                "images or frames, or use fewer tiles per image; image tokens are never "
                "truncated")

    def reusable_rows(self, n: int) -> int:
        """The most leading cache rows, at most `n`, a prefill can keep (`prefill(keep=)`):
        every filled row on the host; on the NPU only whole slices (a multiple of the chunk:
        the prefill shape groups start at past = 0, chunk, 2 * chunk...); none when the rows
        may be non-finite."""
        if self.cache.tainted:
            return 0
        n = max(0, min(int(n), self.cache.filled))
        return n // self.chunk * self.chunk if self.fixed else n

    def prefill(self, embeds: np.ndarray, keep: int = 0) -> np.ndarray:
        """Run the prompt embeddings (L, hidden) through all layers; return the logits
        (vocab,) of the last prompt token.

        `keep`: the cache's first `keep` rows already hold this prompt's first `keep` tokens
        (a shared prefix of an earlier prompt; the caller vouches for that), so only rows
        [keep, L) run; `keep` must be < L and at most `reusable_rows(keep)`. With keep = 0 the
        cache is reset first."""
        length = embeds.shape[0]
        self._start_prefill(length, keep)
        chunk = self.chunk
        last_hidden = None
        for start in range(keep, length, chunk):  # ceil((L - keep) / chunk) slices
            n_valid = min(chunk, length - start)
            hidden = self._prefill_slice(embeds[start:start + n_valid], start)
            last_hidden = hidden[:, n_valid - 1:n_valid]  # (1, 1, hidden)
        self.cache.filled = length
        return self._logits(last_hidden)

    def _start_prefill(self, length: int, keep: int) -> None:
        """Check a prompt of `length` tokens keeping `keep` cached rows, and set the cache up
        for it (shared with the host runner)."""
        self.check_prompt_length(length)
        self.prefills += 1  # the rows after `keep` change: earlier claims on them are void
        if keep:
            if not 0 < keep < length or self.reusable_rows(keep) != keep:
                raise ValueError(f"prefill cannot keep {keep} rows of a {length}-token prompt "
                                 f"(reusable: {self.reusable_rows(keep)})")
            self.cache.filled = keep
        else:
            self.reset(clear=False)  # stale rows stay: never read (host) or masked (NPU)

    def _prefill_slice(self, x: np.ndarray, past: int) -> np.ndarray:
        """One slice of n_valid rows at absolute positions [past, past + n_valid)."""
        n_valid = x.shape[0]
        if self.fixed:
            group = self.prefill_groups[past]
            n, group_id = group.n, group.group
        else:
            n, group_id = n_valid, 0
        dt = self.dtypes[group_id]
        hidden = np.zeros((1, n, x.shape[1]), dtype=dt["input"])  # (1, n, hidden)
        hidden[0, :n_valid] = x
        indices = np.arange(past, past + n, dtype=dt["indices"])[None]  # (1, n)
        mask = np.full((1, n, past + n), MASKED, dtype=np.float32)  # (1, n, past + n)
        rows = np.arange(n)[:, None]
        cols = np.arange(past + n)[None, :]
        mask[0][(cols <= past + rows) & (rows < n_valid)] = 0.0
        mask = cast(mask, dt["mask"])
        self.feeder.begin("prefill", past)
        for i, layer in enumerate(self.layers):
            if self.fixed and past == 0:
                k = np.zeros((1, group.cache_rows, self.config.kv_dim), dt["K_cache"])
                v = np.zeros((1, group.cache_rows, self.config.kv_dim), dt["V_cache"])
            else:
                k, v = self.cache.view(i, past)  # (1, past, kv_dim)
                k, v = cast(k, dt["K_cache"]), cast(v, dt["V_cache"])
            feed = {"K_cache": k, "V_cache": v, "indices": indices,
                    "input": cast(hidden, dt["input"]), "mask": mask}
            k_new, v_new, hidden = self.feeder.run(
                i, feed, group_id, past, lambda layer=layer, feed=feed, i=i: run_session(
                    layer, feed, group_id, f"prefill of decoder layer {i}"))[:3]
            self.cache.write(i, past, k_new[:, :n_valid], v_new[:, :n_valid])
        return hidden

    def decode(self, token_id: int) -> np.ndarray:
        """Feed one token at the next position; return the logits (vocab,) after it."""
        pos = self.cache.filled
        if pos >= self.max_ctx:
            raise PromptTooLongError(f"the context of {self.max_ctx} tokens is full")
        dt = self.dtypes[self.decode_group]
        x = self.embed([token_id])[None]  # (1, 1, hidden)
        indices = np.array([[pos]], dtype=dt["indices"])  # (1, 1)
        if self.fixed:
            ctx = self.decode_cache_len
            mask = np.full((1, 1, ctx + 1), MASKED, dtype=np.float32)  # (1, 1, ctx + 1)
            mask[..., :pos] = 0.0
            mask[..., ctx] = 0.0  # the current token sits in the last column
        else:
            mask = np.zeros((1, 1, pos + 1), dtype=np.float32)  # (1, 1, pos + 1)
        mask = cast(mask, dt["mask"])
        hidden = cast(x, dt["input"])
        rows = self.decode_cache_len if self.fixed else pos
        self.feeder.begin("decode", pos)
        for i, layer in enumerate(self.layers):
            k, v = self.cache.view(i, rows)
            feed = {"K_cache": cast(k, dt["K_cache"]), "V_cache": cast(v, dt["V_cache"]),
                    "indices": indices, "input": cast(hidden, dt["input"]), "mask": mask}
            k_new, v_new, hidden = self.feeder.run(
                i, feed, self.decode_group, rows, lambda layer=layer, feed=feed, i=i: run_session(
                    layer, feed, self.decode_group, f"decode of decoder layer {i}"))[:3]
            self.cache.write(i, pos, k_new, v_new)  # (1, 1, kv_dim)
        self.cache.filled = pos + 1
        return self._logits(hidden)

    def _logits(self, hidden: np.ndarray) -> np.ndarray:
        x = cast(np.ascontiguousarray(hidden[:, -1:]), self.post_dtype)  # (1, 1, hidden)
        out = run_session(self.post, {self.post_input: x}, 0, "post (final norm + lm_head)")
        logits = np.asarray(out[0], dtype=np.float32).reshape(-1)  # (vocab,)
        check_logits(logits, self.cache, f"post model {getattr(self.post, 'path', '?')}")
        return logits

    def close(self) -> None:
        for s in self.layers + [self.post]:
            s.close()


def check_logits(logits: np.ndarray, cache, where: str) -> None:
    """Non-finite logits taint the cache (its rows are zeroed at the next reset); NaN, +inf,
    or no finite value at all is garbage: BackendError, never a token drawn from it. -inf
    alone is a mask and stays allowed."""
    if np.isfinite(logits).all():
        return
    cache.taint()
    nan, posinf = int(np.isnan(logits).sum()), int(np.isposinf(logits).sum())
    if nan or posinf or not np.isfinite(logits).any():
        raise BackendError(
            f"the model returned non-finite logits ({nan} NaN, {posinf} +inf of {logits.size}; "
            f"{where}): the backend computed garbage (an overflow in a low-precision build, or "
            "a faulty device). The KV cache is reset; if it repeats, check the model files and "
            "the device")


def _describe(sig) -> str:
    return "missing" if sig is None else f"{sig[0]} {sig[1]}"
