"""Constrained answers (`choices`): the token automaton against a brute-force enumeration of
every tokenisation, the budget, the errors, the sampler's `allowed` path against the
full-vocabulary reference, and constrained generation through both backends."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_pipes import both_backends

from internvl_ros.backends import fake_axengine
from internvl_ros.core import GenerationConfig, Tokenizer
from internvl_ros.core.constraint import (
    MAX_CHOICES,
    ChoiceConstraint,
    TokenTable,
    check_choices,
)
from internvl_ros.core.errors import ConfigError
from internvl_ros.core.sampling import Sampler, reference_sample
from internvl_ros.export.testing import tiny_model_dirs

CHOICES = ("yes", "no", "not sure", "Ünïcode ✓", " left", "left")


@pytest.fixture(scope="module")
def tok():
    _, onnx_dir = tiny_model_dirs("a")
    return Tokenizer.from_path(onnx_dir / "tokenizer.json", hf_dir=onnx_dir)


@pytest.fixture(scope="module")
def table(tok):
    return TokenTable(tok)


def all_tokenisations(data: bytes, by_bytes: dict) -> set:
    """Brute force: every split of `data` into vocabulary tokens."""
    if not data:
        return {()}
    out = set()
    for cut in range(1, len(data) + 1):
        tid = by_bytes.get(data[:cut])
        if tid is not None:
            out |= {(tid,) + rest for rest in all_tokenisations(data[cut:], by_bytes)}
    return out


def accepted(constraint, budget, eos):
    """Every token path the automaton accepts within `budget` tokens: to a state where the eos
    is allowed, or that ends the answer by itself (`done`). {path: choice index}."""
    out = {}

    def walk(state, path):
        cur = constraint.start()
        cur.state = state
        left = budget - len(path)
        if cur.done(left):
            out[tuple(path)] = cur.choice_index
            return
        for t in cur.allowed(left).tolist():
            if t in eos:
                out[tuple(path)] = cur.choice_index
                continue
            nxt = constraint.start()
            nxt.state = state
            nxt.advance(t)
            walk(nxt.state, path + [t])

    walk(0, [])
    return out


def test_every_tokenisation_and_nothing_else(tok, table):
    c = ChoiceConstraint(CHOICES, table)
    paths = accepted(c, 64, set(tok.eos_token_ids))
    for i, choice in enumerate(CHOICES):
        want = all_tokenisations(choice.encode(), table.by_bytes)
        got = {p for p, idx in paths.items() if idx == i}
        assert got == want, choice
        assert tuple(tok.encode_plain(choice)) in got  # the canonical tokenisation
        for p in got:
            assert tok.decode(list(p)) == choice
    assert set(paths.values()) == set(range(len(CHOICES)))
    # "not sure" is reachable through the token for "no" (a choice that prefixes another)
    no = table.by_bytes[b"no"]
    assert any(p[0] == no and idx == CHOICES.index("not sure") for p, idx in paths.items())


def test_prefix_choice_allows_eos_and_continuation(tok, table):
    c = ChoiceConstraint(("no", "not sure"), table)
    cur = c.start()
    cur.advance(table.by_bytes[b"no"])
    allowed = set(cur.allowed(10).tolist())
    assert set(tok.eos_token_ids) <= allowed  # "no" is complete
    assert table.by_bytes[b"t"] in allowed  # ... or "not sure" goes on
    assert cur.choice_index == 0 and not cur.done(10)
    # with one token left only a one-token completion of "not sure" could follow: none exists
    assert b"t sure" not in table.by_bytes
    assert cur.done(1)
    cur.advance(table.by_bytes[b"t"])
    assert cur.choice_index == -1 and not (set(tok.eos_token_ids) & set(cur.allowed(10).tolist()))


def test_a_leaf_choice_is_done_at_once(table):
    c = ChoiceConstraint(("yes", "no"), table)
    cur = c.start()
    for t in all_tokenisations(b"yes", table.by_bytes).pop():
        assert not cur.done(10)
        cur.advance(t)
    assert cur.choice_index == 0 and cur.done(10)


def test_budget_prunes_paths_that_cannot_finish(tok, table):
    c = ChoiceConstraint(("Ünïcode ✓", "yes"), table)
    shortest = min(len(p) for p in all_tokenisations("Ünïcode ✓".encode(), table.by_bytes))
    assert c.min_tokens == min(shortest, len(tok.encode_plain("yes")))
    # within exactly `shortest` tokens the long choice can only follow a shortest path
    paths = accepted(c, shortest, set(tok.eos_token_ids))
    long_paths = [p for p, i in paths.items() if i == 0]
    assert long_paths and all(len(p) == shortest for p in long_paths)
    with pytest.raises(ConfigError, match="max_new_tokens=0 is too small"):
        c.check_budget(0)
    c.check_budget(c.min_tokens)


@pytest.mark.parametrize("choices, match", [
    (("yes", "yes"), "repeats"),
    (("yes", ""), "empty"),
    (("yes", 3), "must be a string"),
    ("yes", "must be a list"),
    (tuple(str(i) for i in range(MAX_CHOICES + 1)), "at most"),
    (("x" * 2000,), "bytes long"),
    (("ok", "\ud800"), "surrogate"),
])
def test_bad_choices_are_config_errors(choices, match):
    with pytest.raises(ConfigError, match=match):
        check_choices(choices)
    with pytest.raises(ConfigError, match=match):
        GenerationConfig(choices=choices)


def test_config_takes_a_list_and_empty_means_free_text():
    assert GenerationConfig(choices=["a", "b"]).choices == ("a", "b")
    assert GenerationConfig().choices == ()
    hash(GenerationConfig(choices=["a"]))


class FakeTokenizer:
    """A non-byte-level vocabulary with gaps (no token for 'z')."""

    byte_level = False
    eos_token_ids = (99,)

    def __init__(self):
        self.pieces = {"a": 1, "b": 2, "ab": 3, "é": 4, "c": 5}

    def vocab(self):
        return dict(self.pieces)

    def decode(self, ids, skip_special_tokens=True):
        inv = {v: k for k, v in self.pieces.items()}
        return "".join(inv[i] for i in ids)


def test_untokenisable_choice_is_named():
    table = TokenTable(FakeTokenizer())
    c = ChoiceConstraint(("ab", "é"), table)
    assert sorted(c.start().allowed(5).tolist()) == [1, 3, 4]
    with pytest.raises(ConfigError, match=r"\['az'\] cannot be tokenised"):
        ChoiceConstraint(("ab", "az"), table)


# ------------------------------------------------------------------------------------------
# the sampler's allowed path


@pytest.mark.parametrize("cfg", [
    dict(), dict(repetition_penalty=1.5), dict(temperature=0.8),
    dict(temperature=1.3, top_k=3), dict(temperature=1.0, top_p=0.6),
    dict(temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.2),
])
def test_sampler_with_allowed_equals_the_masked_reference(cfg):
    rng = np.random.default_rng(0)
    for trial in range(40):
        x = rng.normal(0, 3, 3000).astype(np.float32)
        allowed = np.sort(rng.choice(3000, size=int(rng.integers(1, 12)), replace=False))
        history = rng.integers(0, 3000, 5).tolist() + allowed[:2].tolist()
        config = GenerationConfig(seed=trial, **cfg)
        masked = np.full_like(x, -np.inf)
        masked[allowed] = x[allowed]
        ours = Sampler(config)(x, history, allowed=allowed)
        u = np.random.default_rng(trial).random()
        assert ours == reference_sample(masked, config, u, history), (cfg, trial)
        assert ours in allowed


# ------------------------------------------------------------------------------------------
# generation with choices, both backends


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    with both_backends(tmp_path_factory) as (_, pipes):
        yield pipes


def image(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (200, 260, 3), dtype=np.uint8)


def greedy_constrained(pipe, question, images, choices, max_new):
    """Reference: the constraint applied by hand to logits from the language model."""
    ids, pixels = pipe.prepare(question, images)
    llm = pipe.llm
    embeds = llm.embed(ids)
    if pixels is not None:
        embeds[np.asarray(ids) == pipe.tokenizer.img_context_id] = pipe.vision(pixels)
    logits = llm.prefill(embeds)
    cur = ChoiceConstraint(choices, TokenTable(pipe.tokenizer)).start()
    out = []
    eos = set(pipe.tokenizer.eos_token_ids)
    while not cur.done(max_new - len(out)):
        allowed = cur.allowed(max_new - len(out))
        t = int(allowed[np.argmax(logits[allowed])])
        if t in eos:
            break
        cur.advance(t)
        out.append(t)
        logits = llm.decode(t)
    return out, cur.choice_index


@pytest.mark.parametrize("backend", ["onnxruntime", "axengine"])
@pytest.mark.parametrize("choices", [("yes", "no"), ("no", "not sure", "left"),
                                     ("Ünïcode ✓", "the red cup", "a")])
def test_greedy_choice_on_both_backends(pipes, backend, choices):
    pipe = pipes[backend]
    cfg = GenerationConfig(max_new_tokens=16, choices=choices)
    with fake_axengine.installed():
        res = pipe.generate("Is the door open?", images=[image(1)], config=cfg).result
        ref, ref_index = greedy_constrained(pipe, "Is the door open?", [image(1)], choices, 16)
    assert res.text in choices and res.text == choices[res.choice_index]
    assert res.finish_reason == "eos"
    assert res.token_ids == ref and res.choice_index == ref_index
    assert res.text == pipe.tokenizer.decode(res.token_ids)


def test_sampled_choices_stay_within_and_vary(pipes):
    pipe = pipes["onnxruntime"]
    choices = ("yes", "no", "not sure", "left", "right")
    seen = set()
    for seed in range(12):
        cfg = GenerationConfig(max_new_tokens=8, choices=choices, temperature=5.0, seed=seed,
                               top_p=0.95)
        res = pipe.generate("Which way?", config=cfg).result
        assert res.text == choices[res.choice_index], res.text
        seen.add(res.text)
    assert len(seen) >= 2, seen


def test_empty_choices_change_nothing(pipes):
    pipe = pipes["onnxruntime"]
    a = pipe.generate("Is the door open?", config=GenerationConfig(max_new_tokens=10)).result
    b = pipe.generate("Is the door open?",
                      config=GenerationConfig(max_new_tokens=10, choices=())).result
    assert a.token_ids == b.token_ids and b.choice_index == -1 and a.choice_index == -1


def test_choice_errors_raise_at_generate(pipes):
    pipe = pipes["onnxruntime"]
    with pytest.raises(ConfigError, match="too small"):
        pipe.generate("Q", config=GenerationConfig(max_new_tokens=1,
                                                   choices=("Ünïcode ✓ longer text",)))
    assert not pipe.busy
    with pytest.raises(ConfigError, match="repeats"):
        GenerationConfig(choices=("a", "a"))
