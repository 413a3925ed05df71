"""Token selection with transformers' semantics: repetition penalty, then temperature, top-k,
top-p; temperature 0 is greedy (argmax after the repetition penalty).

`Sampler` never sorts the whole vocabulary when it can avoid it (a full sort of 151k logits
costs ~20 ms on the board's CPU, more than half the NPU's decode budget per token):

- top-k: the k candidates (ties at the k-th value included) come from a partition, then top-p
  and the draw run on them only. Both filters only remove tokens, so this is transformers'
  order exactly;
- top-p alone: the top 1024 candidates by partition; the nucleus is cut inside them unless
  their mass is below p, then 16384, then the full sort (only for a very flat distribution);
- the draw: inverse CDF over the kept tokens in vocabulary order, float32 weights accumulated in
  float64, in blocks (no float64 pass over the whole vocabulary).

`top_k_filter` / `top_p_filter` are the full-vocabulary reference filters (transformers'
TopKLogitsWarper / TopPLogitsWarper); `reference_sample` draws with them, and the tests check
that `Sampler` keeps the same tokens and draws the same token for the same seed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .constraint import check_choices
from .errors import ConfigError

#: candidates taken by partition for top-p without top-k (a full sort only if their mass < p)
TOP_P_CANDIDATES = 1024
_DRAW_BLOCK = 4096  # block length of the inverse-CDF draw


@dataclass(frozen=True)
class GenerationConfig:
    """Per-request generation settings, validated at construction (raises ConfigError).

    `top_k` defaults to 0 (off); transformers' generate() defaults to 50 when sampling.
    `repetition_penalty` applies to the generated tokens only, as InternVL's chat() (which calls
    generate(inputs_embeds=...), so transformers never sees the prompt ids); set
    `penalize_prompt=True` to include the prompt ids too, as generate(input_ids=...).
    `choices` (distinct non-empty strings) make the answer exactly one of them, greedy or
    sampled (core.constraint); empty = free text.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None
    penalize_prompt: bool = False  # the repetition penalty also covers the prompt ids
    #: the answer must be exactly one of these strings (core.constraint); () = free text
    choices: tuple[str, ...] = ()

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
        if not isinstance(self.penalize_prompt, bool):
            bad("penalize_prompt", self.penalize_prompt, "must be True or False")
        # a list is accepted and stored as a tuple (the config stays hashable)
        object.__setattr__(self, "choices", check_choices(self.choices,
                                                          "GenerationConfig.choices"))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def apply_repetition_penalty(logits: np.ndarray, token_ids: Iterable[int],
                             penalty: float) -> np.ndarray:
    """HF RepetitionPenaltyLogitsProcessor: seen tokens' logits divided by `penalty` when
    positive, multiplied when negative (once per token; repeats in `token_ids` are fine)."""
    if penalty == 1.0:
        return logits
    seen = (token_ids.astype(np.int64, copy=False) if isinstance(token_ids, np.ndarray)
            else np.fromiter(token_ids, dtype=np.int64))
    if seen.size == 0:
        return logits
    out = logits.copy()
    score = out[seen]  # duplicates gather the same original value and write the same result
    out[seen] = np.where(score < 0, score * penalty, score / penalty)
    return out


# ------------------------------------------------------------------------------------------
# reference filters: the whole vocabulary, transformers' formulation


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits (ties at the k-th value kept, as HF); others -> -inf."""
    if k <= 0 or k >= logits.size:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits < kth, -np.inf, logits)


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus filter (HF TopPLogitsWarper): sort ascending, drop the low-probability tail whose
    cumulative mass is <= 1 - p; always keep the most likely token. Full sort."""
    if p >= 1.0:
        return logits
    order = np.argsort(logits, kind="stable")  # ascending, as HF
    w = _weights(logits[order])  # (vocab,) float32, 0 for -inf
    total = w.sum(dtype=np.float64)
    remove = np.cumsum(w, dtype=np.float64) <= (1.0 - p) * total
    remove[-1] = False
    out = logits.copy()
    out[order[remove]] = -np.inf
    return out


def reference_sample(logits: np.ndarray, config: GenerationConfig, u: float,
                     history: Iterable[int] = ()) -> int:
    """The slow path: penalty, temperature, full-vocabulary top-k and top-p, then the draw with
    the uniform number `u` in [0, 1). Used by the tests to check `Sampler`."""
    x = np.asarray(logits, dtype=np.float32).reshape(-1)
    x = apply_repetition_penalty(x, history, config.repetition_penalty)
    if config.greedy:
        return int(np.argmax(x))
    x = x / np.float32(config.temperature)
    x = top_p_filter(top_k_filter(x, config.top_k), config.top_p)
    ids = np.flatnonzero(np.isfinite(x))
    return int(ids[_draw(_weights(x[ids]), u)])


# ------------------------------------------------------------------------------------------
# the fast path


def _weights(x: np.ndarray) -> np.ndarray:
    """Unnormalised float32 probabilities exp(x - max(x)); -inf -> 0."""
    return np.exp(x - np.max(x))


def _draw(w: np.ndarray, u: float) -> int:
    """Inverse CDF: the index i with cum[i-1] <= u * total < cum[i] over the weights `w` (>= 0,
    not all 0), accumulated in float64 block by block. Never picks a zero weight."""
    n = w.size
    if n <= _DRAW_BLOCK:
        cum = np.cumsum(w, dtype=np.float64)
        i = int(np.searchsorted(cum, u * cum[-1], side="right"))
        return i if i < n and w[i] > 0 else int(np.flatnonzero(w)[-1])
    full = n // _DRAW_BLOCK * _DRAW_BLOCK
    sums = w[:full].reshape(-1, _DRAW_BLOCK).sum(axis=1, dtype=np.float64)  # (blocks,)
    if full < n:
        sums = np.append(sums, w[full:].sum(dtype=np.float64))
    cum = np.cumsum(sums)
    target = u * cum[-1]
    b = min(int(np.searchsorted(cum, target, side="right")), sums.size - 1)
    while sums[b] == 0:  # rounding can land on an empty block: step back to a non-empty one
        b -= 1
    start = b * _DRAW_BLOCK
    block = w[start:start + _DRAW_BLOCK]
    within = np.cumsum(block, dtype=np.float64)
    i = int(np.searchsorted(within, target - (cum[b - 1] if b > 0 else 0.0), side="right"))
    if i >= block.size or block[i] == 0:  # rounding past the block's end
        i = int(np.flatnonzero(block)[-1])
    return start + i


def _nucleus(x: np.ndarray, w: np.ndarray, total: float, p: float) -> np.ndarray | None:
    """Top-p on candidates `x` (ascending vocabulary order) with weights `w`; `total` is the
    mass of every token still in play. Returns the kept positions (ascending), or None when
    the nucleus may reach past the candidates.

    Descending order, ties broken as transformers' ascending stable sort reversed. A token is
    kept when its ascending cumulative mass, total - (mass strictly above it), is
    > (1 - p) * total: `top_p_filter`'s rule, without summing the tail below the candidates."""
    desc = np.argsort(x, kind="stable")[::-1]  # (c,)
    above = np.zeros(desc.size, dtype=np.float64)  # (c,) mass strictly above each token
    np.cumsum(w[desc][:-1], dtype=np.float64, out=above[1:])
    keep = total - above > (1.0 - p) * total  # a prefix of `desc`: the top token always
    if keep.all():
        return None
    return np.sort(desc[keep])


class Sampler:
    """Picks the next token from (vocab,) logits with a GenerationConfig; seedable."""

    def __init__(self, config: GenerationConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray, history: Iterable[int] = (),
                 allowed: np.ndarray | None = None) -> int:
        """`history`: the token ids the repetition penalty covers (ignored when it is 1).
        `allowed`: ascending token ids the choice must come from (a constrained answer, see
        core.constraint), as if every other logit were -inf before temperature, top-k and top-p
        (transformers' order); the filters and the draw then run on these ids only."""
        cfg = self.config
        logits = np.asarray(logits, dtype=np.float32).reshape(-1)  # (vocab,)
        logits = apply_repetition_penalty(logits, history, cfg.repetition_penalty)
        if allowed is not None:
            logits = logits[allowed]  # (n_allowed,): positions map back through `allowed`
        pick = self._pick(logits)
        return pick if allowed is None else int(allowed[pick])

    def _pick(self, logits: np.ndarray) -> int:
        cfg = self.config
        if cfg.greedy:
            return int(np.argmax(logits))
        u = self.rng.random()
        x = logits / np.float32(cfg.temperature)  # (vocab,) float32
        ids = self._candidates(x)
        if ids is None:
            return _draw(_weights(x), u)
        return int(ids[_draw(_weights(x[ids]), u)])

    def _candidates(self, x: np.ndarray) -> np.ndarray | None:
        """Token ids (ascending) kept by top-k then top-p; None = the whole vocabulary."""
        cfg, vocab = self.config, x.size
        if 0 < cfg.top_k < vocab:
            ids = np.flatnonzero(x >= np.partition(x, -cfg.top_k)[-cfg.top_k])  # ties kept
            if cfg.top_p >= 1.0:
                return ids
            xc = x[ids]
            w = _weights(xc)
            keep = _nucleus(xc, w, w.sum(dtype=np.float64), cfg.top_p)
            return ids if keep is None else ids[keep]
        if cfg.top_p >= 1.0:
            return None
        w = _weights(x)  # (vocab,)
        total = w.sum(dtype=np.float64)
        for m in (TOP_P_CANDIDATES, 16 * TOP_P_CANDIDATES):  # then the full sort
            if m >= vocab:
                break
            ids = np.flatnonzero(x >= np.partition(x, -m)[-m])  # a prefix of the sorted order
            keep = _nucleus(x[ids], w[ids], total, cfg.top_p)
            if keep is not None:
                return ids[keep]
        return _nucleus(x, w, total, cfg.top_p)  # positions are the token ids; None = all
