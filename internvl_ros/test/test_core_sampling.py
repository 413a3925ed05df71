"""Sampling against transformers' logits processors; config validation; seeding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from internvl_ros.core.errors import ConfigError
from internvl_ros.core.sampling import (
    GenerationConfig,
    Sampler,
    apply_repetition_penalty,
    reference_sample,
    top_k_filter,
    top_p_filter,
)

V = 200


def logits(seed=0):
    return np.random.default_rng(seed).normal(0, 3, V).astype(np.float32)


def hf(processor, x, ids=()):
    ids = torch.tensor([list(ids) or [0]], dtype=torch.long)
    return processor(ids, torch.from_numpy(x.copy())[None])[0].numpy()


@pytest.mark.parametrize("penalty", [0.7, 1.0, 1.3, 2.0])
def test_repetition_penalty_matches_hf(penalty):
    x = logits(1)
    seen = [3, 5, 5, 17, 150, 3]
    ours = apply_repetition_penalty(x, seen, penalty)
    ref = hf(RepetitionPenaltyLogitsProcessor(penalty), x, seen)
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    if penalty != 1.0:
        assert not np.allclose(ours[[3, 5]], x[[3, 5]])


@pytest.mark.parametrize("k", [1, 5, 50, V])
def test_top_k_matches_hf(k):
    x = logits(2)
    assert np.array_equal(np.isinf(top_k_filter(x, k)), np.isinf(hf(TopKLogitsWarper(k), x)))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9, 0.999])
def test_top_p_matches_hf(p):
    for seed in range(5):
        x = logits(seed)
        ours = top_p_filter(x, p)
        ref = hf(TopPLogitsWarper(p), x)
        assert np.array_equal(np.isinf(ours), np.isinf(ref)), (p, seed)
        assert np.isfinite(ours).sum() >= 1


def test_temperature_then_filters_pipeline_like_hf():
    x = logits(4)
    ids = [1, 2, 3]
    cfg = GenerationConfig(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.2)
    ref = hf(RepetitionPenaltyLogitsProcessor(1.2), x, ids)
    ref = hf(TemperatureLogitsWarper(0.7), ref)
    ref = hf(TopKLogitsWarper(20), ref)
    ref = hf(TopPLogitsWarper(0.8), ref)
    allowed = set(np.flatnonzero(np.isfinite(ref)))
    sampler = Sampler(GenerationConfig(**{**cfg.__dict__, "seed": 0}))
    picks = {sampler(x, ids) for _ in range(300)}
    assert picks <= allowed and len(picks) > 1


def test_greedy_is_argmax_after_penalty():
    x = logits(5)
    top = int(np.argmax(x))
    assert Sampler(GenerationConfig())(x) == top
    # a strong penalty on the best token moves greedy to the runner-up
    second = int(np.argsort(x)[-2])
    pen = GenerationConfig(repetition_penalty=100.0)
    assert Sampler(pen)(x, [top]) == (second if x[top] > 0 else top)


def test_sampling_is_seedable_and_follows_the_distribution():
    x = np.log(np.array([0.5, 0.3, 0.2] + [1e-9] * 7, dtype=np.float32))
    cfg = GenerationConfig(temperature=1.0, seed=123)
    a = [Sampler(cfg)(x) for _ in range(1)]
    s1, s2 = Sampler(cfg), Sampler(cfg)
    seq1 = [s1(x) for _ in range(2000)]
    seq2 = [s2(x) for _ in range(2000)]
    assert seq1 == seq2 and a[0] == seq1[0]
    freq = np.bincount(seq1, minlength=10) / len(seq1)
    np.testing.assert_allclose(freq[:3], [0.5, 0.3, 0.2], atol=0.04)
    assert Sampler(GenerationConfig(temperature=1.0, seed=124))(x) in (0, 1, 2)


@pytest.mark.parametrize("kwargs", [
    dict(max_new_tokens=0), dict(max_new_tokens=2.5), dict(max_new_tokens=True),
    dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_k=-1), dict(top_k=1.5),
    dict(top_p=0.0), dict(top_p=1.5), dict(repetition_penalty=0.0), dict(seed=-3),
    dict(seed="x"), dict(penalize_prompt=1),
])
def test_config_validation(kwargs):
    field = next(iter(kwargs))
    with pytest.raises(ConfigError, match=field):
        GenerationConfig(**kwargs)


def test_repetition_penalty_takes_an_array_with_repeats():
    x = logits(6)
    seen = np.array([4, 4, 9, 150, 9, 4])
    ref = hf(RepetitionPenaltyLogitsProcessor(1.5), x, seen.tolist())
    np.testing.assert_allclose(apply_repetition_penalty(x, seen, 1.5), ref, rtol=1e-6)


def scenario(vocab, kind, seed):
    rng = np.random.default_rng(seed)
    if kind == "ties":  # integer logits: many exact ties at the top-k / top-p cut
        return rng.normal(0, 3, vocab).round().astype(np.float32)
    return rng.normal(0, {"flat": 0.01, "wide": 2.0, "peaked": 6.0}[kind], vocab).astype(
        np.float32)


FULL_VOCAB = 151936  # InternVL3.5's


@pytest.mark.parametrize("vocab", [500, FULL_VOCAB])
@pytest.mark.parametrize("kind", ["flat", "wide", "peaked", "ties"])
def test_fast_paths_equal_the_full_sort_reference(vocab, kind):
    """The partition-based candidates of Sampler keep exactly the tokens of the full-sort
    filters (transformers' order), and draw the same token for the same seed."""
    cases = 0
    for top_k in (0, 1, 40, 3000):
        for top_p in (0.2, 0.9, 0.99, 1.0):
            seed = cases + vocab
            cfg = GenerationConfig(temperature=0.8, top_k=top_k, top_p=top_p, seed=seed)
            x = scenario(vocab, kind, seed)
            scaled = x / np.float32(cfg.temperature)
            ref = np.flatnonzero(np.isfinite(top_p_filter(top_k_filter(scaled, top_k), top_p)))
            fast = Sampler(cfg)._candidates(scaled)
            fast = np.arange(vocab) if fast is None else fast
            np.testing.assert_array_equal(fast, ref, err_msg=f"{kind} k={top_k} p={top_p}")
            u = np.random.default_rng(seed).random()  # the Sampler's first draw
            assert Sampler(cfg)(x) == reference_sample(x, cfg, u), (kind, top_k, top_p)
            cases += 1


def test_fast_top_p_falls_back_beyond_the_first_candidates():
    """A flat distribution: the nucleus needs more than the first 1024 candidates."""
    from internvl_ros.core import sampling

    x = scenario(FULL_VOCAB, "flat", 0)
    kept = Sampler(GenerationConfig(temperature=1.0, top_p=0.5))._candidates(x)
    assert kept.size > 16 * sampling.TOP_P_CANDIDATES  # the full sort ran
    np.testing.assert_array_equal(kept, np.flatnonzero(np.isfinite(top_p_filter(x, 0.5))))


def test_block_draw_follows_the_distribution_and_skips_zero_weights():
    """Whole-vocabulary draws (temperature only) go block by block: mass in a few tokens of
    different blocks, everything else exactly 0 (exp underflow)."""
    x = np.full(FULL_VOCAB, -1e4, np.float32)
    hot = {7: 0.1, 5000: 0.2, 4095: 0.3, 4096: 0.15, FULL_VOCAB - 1: 0.25}
    for i, prob in hot.items():
        x[i] = np.log(prob)
    sampler = Sampler(GenerationConfig(temperature=1.0, seed=3))
    picks = [sampler(x) for _ in range(3000)]
    assert set(picks) <= set(hot)
    freq = {i: picks.count(i) / len(picks) for i in hot}
    for i, prob in hot.items():
        assert abs(freq[i] - prob) < 0.035, (i, freq[i], prob)
