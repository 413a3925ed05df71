"""Golden tests for the reuse of the image's work and for choices: transformers' greedy
`generate` is the oracle.

Both tiny checkpoints, through onnxruntime and the axengine double (the published build's
limits: 8 prefill slices of 128, context 2047, bfloat16 layer I/O):
- every answer of an Ask (KV rows of the system prompt and image block kept, the ViT run once),
  a repeated request on a cached frame, and text prompts that share one or two whole 128-row
  slices equal a separate request (nothing reused) token for token, on both backends;
- on onnxruntime (float32) they also equal transformers on the full prompt; a constrained
  answer equals transformers' `generate(prefix_allowed_tokens_fn=...)` whose allowed tokens
  come from a brute-force enumeration of every tokenisation of the choices.

The axengine double computes in bfloat16 and, without any reuse, parts from float32
transformers after a few tokens on some inputs (e.g. model "a", image seed 12, "Is it dark?":
token 8); test_golden.py holds its transformers checks on inputs where it agrees. Here its
oracle is the separate request, which reuse must match exactly (whole slices are kept, so the
computation is the same).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from tiny_pipes import both_backends

from internvl_ros.backends import fake_axengine
from internvl_ros.core import GenerationConfig, Question, Tokenizer
from internvl_ros.core.constraint import TokenTable
from internvl_ros.export.testing import hf_greedy

MAX_NEW = 12


@pytest.fixture(scope="module", params=["a", "b"])
def model(request, tmp_path_factory):
    with both_backends(tmp_path_factory, request.param) as model:
        yield model


def image(seed, h=240, w=320):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def separate(pipe, prompt, images, config, system_prompt=None):
    pipe.reset()  # forget the KV prefix; no frame key: nothing is reused
    with fake_axengine.installed():
        return pipe.generate(prompt, images=images, system_prompt=system_prompt,
                             config=config).result


def check(hf_dir, backend, res, ref, pixels, name, choices=None):
    """`res` (with reuse) == `ref` (separate); on onnxruntime both == transformers."""
    assert res.token_ids == ref.token_ids and res.finish_reason == ref.finish_reason, name
    assert res.prompt_token_ids == ref.prompt_token_ids and ref.timings.cached_prompt_tokens == 0
    if backend != "onnxruntime":
        return
    if choices is not None:
        assert res.token_ids == hf_choice(hf_dir, res.prompt_token_ids, pixels, choices), name
    else:
        assert_hf_equal(hf_dir, res, pixels, name)


def assert_hf_equal(hf_dir, res, pixels, name):
    reference = hf_greedy(hf_dir, res.prompt_token_ids, pixels, max_new_tokens=MAX_NEW)
    n = len(res.token_ids)
    if res.finish_reason == "eos":  # ours excludes the stop token, HF includes it
        assert reference[:n + 1] == res.token_ids + [reference[n]], name
    else:
        assert res.finish_reason == "length" and res.token_ids == reference, name


def tokenisations(data: bytes, by_bytes: dict) -> set:
    if not data:
        return {()}
    return {(by_bytes[data[:cut]],) + rest for cut in range(1, len(data) + 1)
            if data[:cut] in by_bytes for rest in tokenisations(data[cut:], by_bytes)}


@functools.lru_cache(maxsize=2)
def _hf_model(hf_dir: str):
    from transformers import InternVLForConditionalGeneration

    return InternVLForConditionalGeneration.from_pretrained(
        hf_dir, dtype="float32", attn_implementation="eager").eval()


def hf_choice(hf_dir, prompt_ids, pixels, choices):
    """transformers' greedy generate restricted, step by step, to the tokens that continue
    some tokenisation of some choice (or the eos after a complete one)."""
    import torch

    tok = Tokenizer.from_path(hf_dir / "tokenizer.json", hf_dir=hf_dir)
    by_bytes = TokenTable(tok).by_bytes
    paths = set().union(*(tokenisations(c.encode(), by_bytes) for c in choices))
    eos = list(tok.eos_token_ids)
    n_prompt = len(prompt_ids)

    def allowed(_batch, ids):
        done = tuple(ids[n_prompt:].tolist())
        nxt = {p[len(done)] for p in paths if len(p) > len(done) and p[:len(done)] == done}
        return sorted(nxt | (set(eos) if done in paths else set()))

    model = _hf_model(str(hf_dir))
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    kwargs = {} if pixels is None else {"pixel_values": torch.from_numpy(pixels)}
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=eos,
                             pad_token_id=eos[0], prefix_allowed_tokens_fn=allowed, **kwargs)
    new = out[0, n_prompt:].tolist()
    return new[:-1] if new and new[-1] in eos else new


@pytest.mark.parametrize("backend", ["onnxruntime", "axengine", "axengine-rows"])
def test_ask_answers_equal_transformers(model, backend):
    hf_dir, pipes = model
    pipe = pipes[backend]
    img = image(11)
    choices = ("yes", "no", "not sure")
    questions = ["Describe the image.", Question("Is the door open?", choices=choices),
                 "What is on the table, and is the path clear?"]
    cfg = GenerationConfig(max_new_tokens=MAX_NEW)
    with fake_axengine.installed():
        answers = pipe.ask(questions, images=[img], config=cfg).answers
    _, pixels = pipe.prepare("x", [img])
    assert all(a.success for a in answers)
    assert [a.timings.vit_s > 0 for a in answers] == [True, False, False]
    assert all(a.timings.cached_prompt_tokens >= 256 for a in answers[1:])
    for i, (a, q) in enumerate(zip(answers, questions, strict=True)):
        q = q if isinstance(q, Question) else Question(q)
        ref = separate(pipe, q.prompt, [img], q.config(cfg))
        check(hf_dir, backend, a.result, ref, pixels, f"{backend} question {i}",
              choices=q.choices or None)
    res = answers[1].result
    assert res.text in choices and res.choice_index == choices.index(res.text)


@pytest.mark.parametrize("backend", ["onnxruntime", "axengine", "axengine-rows"])
def test_repeat_on_a_cached_frame_equals_transformers(model, backend):
    hf_dir, pipes = model
    pipe = pipes[backend]
    img = image(12)
    cfg = GenerationConfig(max_new_tokens=MAX_NEW)
    with fake_axengine.installed():
        results = [pipe.generate(q, images=[img], config=cfg, frame_key=("cam", 12)).result
                   for q in ("Describe the image.", "Describe the image.", "Is it dark?")]
    _, pixels = pipe.prepare("x", [img])
    assert results[1].timings.vit_s == 0 and results[1].timings.cached_prompt_tokens > 256
    for i, (res, q) in enumerate(zip(results, ("Describe the image.", "Describe the image.",
                                               "Is it dark?"), strict=True)):
        check(hf_dir, backend, res, separate(pipe, q, [img], cfg), pixels,
              f"{backend} request {i}")


@pytest.mark.parametrize("backend", ["onnxruntime", "axengine", "axengine-rows"])
def test_text_prompts_sharing_whole_slices_equal_transformers(model, backend):
    """Prompts that share 1 and 2 whole 128-row slices (the NPU keeps those) and then differ."""
    hf_dir, pipes = model
    pipe = pipes[backend]
    sentence = "The robot is near a red cup, a blue box and a door. "
    shared = sentence
    while len(pipe.prepare(shared, system_prompt="You answer briefly.")[0]) < 300:
        shared += sentence
    half = sentence * (shared.count(sentence) // 2)
    questions = [shared + "Where is the cup?", shared + "Is the door open?",
                 half + "What is the robot near?"]
    cfg = GenerationConfig(max_new_tokens=MAX_NEW)
    pipe.reset()
    with fake_axengine.installed():
        results = [pipe.generate(q, system_prompt="You answer briefly.", config=cfg).result
                   for q in questions]
    kept = [r.timings.cached_prompt_tokens for r in results]
    if backend.startswith("axengine"):
        assert kept[1] >= 256 and kept[2] >= 128 and all(k % 128 == 0 for k in kept)
    else:
        assert kept[1] > 256 and kept[2] > 128 and kept[2] % 128 != 0
    for i, (res, q) in enumerate(zip(results, questions, strict=True)):
        ref = separate(pipe, q, [], cfg, system_prompt="You answer briefly.")
        check(hf_dir, backend, res, ref, None, f"{backend} prompt {i}")
