"""Token selection with transformers' semantics: repetition penalty, then temperature, top-k,
top-p; temperature 0 is greedy (argmax after the repetition penalty)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError


@dataclass(frozen=True)
class GenerationConfig:
    """Per-request generation settings, validated at construction (raises ConfigError)."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; applies to prompt and generated tokens (HF)
    seed: int | None = None

    def __post_init__(self):
        def bad(field, value, rule):
            raise ConfigError(f"GenerationConfig.{field}={value!r}: {rule}")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            bad("max_new_tokens", self.max_new_tokens, "must be an integer >= 1")
        if not _is_number(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            bad("temperature", self.temperature, "must be a number in [0, 100] (0 = greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", self.top_k, "must be an integer >= 0 (0 = off)")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            bad("top_p", self.top_p, "must be a number in (0, 1] (1 = off)")
        if not _is_number(self.repetition_penalty) or not 0.0 < self.repetition_penalty <= 100.0:
            bad("repetition_penalty", self.repetition_penalty,
                "must be a number in (0, 100] (1 = off)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or self.seed < 0):
            bad("seed", self.seed, "must be None or an integer >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def apply_repetition_penalty(logits: np.ndarray, token_ids: Iterable[int],
                             penalty: float) -> np.ndarray:
    """HF RepetitionPenaltyLogitsProcessor: seen tokens' logits divided by `penalty` when
    positive, multiplied when negative."""
    if penalty == 1.0:
        return logits
    seen = np.unique(np.fromiter(token_ids, dtype=np.int64))
    if seen.size == 0:
        return logits
    out = logits.copy()
    score = out[seen]
    out[seen] = np.where(score < 0, score * penalty, score / penalty)
    return out


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits (ties at the k-th value kept, as HF); others -> -inf."""
    if k <= 0 or k >= logits.size:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits < kth, -np.inf, logits)


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus filter (HF TopPLogitsWarper): drop the low-probability tail whose total mass
    is <= 1 - p; always keep the most likely token."""
    if p >= 1.0:
        return logits
    order = np.argsort(logits, kind="stable")  # ascending, as HF
    probs = _softmax(logits[order])
    cum = np.cumsum(probs)
    remove = cum <= (1.0 - p)
    remove[-1] = False
    out = logits.copy()
    out[order[remove]] = -np.inf
    return out


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - np.max(x))
    return e / e.sum()


class Sampler:
    """Picks the next token from (vocab,) logits with a GenerationConfig; seedable."""

    def __init__(self, config: GenerationConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray, history: Iterable[int] = ()) -> int:
        cfg = self.config
        logits = np.asarray(logits, dtype=np.float32).reshape(-1)  # (vocab,)
        logits = apply_repetition_penalty(logits, history, cfg.repetition_penalty)
        if cfg.greedy:
            return int(np.argmax(logits))
        logits = logits / np.float32(cfg.temperature)
        logits = top_k_filter(logits, cfg.top_k)
        logits = top_p_filter(logits, cfg.top_p)
        cum = np.cumsum(_softmax(logits))  # (vocab,)
        # u < cum[-1], so the pick is a token of non-zero probability
        return int(np.searchsorted(cum, self.rng.random() * cum[-1], side="right"))
