"""Layer runner: chunked prefill (no extra padding slice), shape groups, limits, errors."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_pipes import Recorder

from internvl_ros.backends import fake_axengine, get_backend
from internvl_ros.core.errors import (
    BackendError,
    ModelDirError,
    PromptTooLongError,
    ShapeMismatchError,
)
from internvl_ros.core.llm import LanguageModel
from internvl_ros.core.modeldir import load_model_dir


@pytest.fixture(scope="module")
def axera_limits():
    """conftest's axera_dir with these limits (the tests below count slices against them)."""
    return {"kv_cache_len": 300, "max_prefill": 256}


def load(root, backend, **kw):
    md = load_model_dir(root, backend)
    impl = get_backend(backend, num_threads=1) if backend == "onnxruntime" else get_backend(backend)
    layers = [Recorder(impl.open(str(p))) for p in md.paths.layers]
    post = impl.open(str(md.paths.post))
    emb = np.load(md.paths.embeddings, mmap_mode="r")
    return LanguageModel(layers, post, emb, md.config, **kw)


@pytest.fixture(scope="module")
def fake_ax():
    with fake_axengine.installed():
        yield


def prompt_embeds(llm, n, seed=0):
    ids = np.random.default_rng(seed).integers(0, 1400, n)
    return llm.embed(ids)


@pytest.mark.parametrize("length,slices", [(127, [127]), (128, [128]), (129, [128, 1]),
                                           (256, [128, 128])])
def test_dynamic_prefill_slices(host_dir, length, slices):
    llm = load(host_dir, "onnxruntime")
    x = prompt_embeds(llm, length)
    logits = llm.prefill(x)
    calls = llm.layers[0].calls
    assert [c[1]["input"][1] for c in calls] == slices  # ceil(L/128), no padding on the host
    assert [c[1]["K_cache"][1] for c in calls] == [128 * i for i in range(len(slices))]
    assert [c[1]["mask"][1:] for c in calls] == [(n, 128 * i + n) for i, n in enumerate(slices)]
    assert llm.cache.filled == length
    # same logits as one unchunked pass
    whole = load(host_dir, "onnxruntime", prefill_chunk=4096)
    np.testing.assert_allclose(logits, whole.prefill(x), rtol=1e-4, atol=1e-4)
    assert len(whole.layers[0].calls) == 1


@pytest.mark.parametrize("length,groups", [(127, [1]), (128, [1]), (129, [1, 2]), (256, [1, 2])])
def test_fixed_prefill_uses_ceil_slices_and_right_row(host_dir, axera_dir, fake_ax, length,
                                                      groups):
    llm = load(axera_dir, "axengine")
    assert llm.fixed and llm.chunk == 128 and llm.max_prefill == 256 and llm.max_ctx == 300
    x = prompt_embeds(llm, length, seed=length)
    logits = llm.prefill(x)
    calls = llm.layers[0].calls
    # a prompt of exactly k*128 tokens runs k slices, not k+1 (Axera's demo bug)
    assert [c[0] for c in calls] == groups
    first = calls[0][1]
    assert first["K_cache"] == (1, 1, 32) and first["mask"] == (1, 128, 128)  # dummy cache
    if len(calls) > 1:
        assert calls[1][1]["K_cache"] == (1, 128, 32) and calls[1][1]["mask"] == (1, 128, 256)
    # logits of row (L-1) mod 128 of the last slice == the host's
    ref = load(host_dir, "onnxruntime").prefill(x)
    assert int(np.argmax(logits)) == int(np.argmax(ref))
    np.testing.assert_allclose(logits, ref, atol=0.05 * np.abs(ref).max())
    # then decode runs group 0 with the whole cache and the token in the last mask column
    tok = int(np.argmax(logits))
    out = llm.decode(tok)
    g, shapes = llm.layers[0].calls[-1]
    assert g == 0 and shapes["K_cache"] == (1, 300, 32) and shapes["mask"] == (1, 1, 301)
    host = load(host_dir, "onnxruntime")
    host.prefill(x)
    assert int(np.argmax(out)) == int(np.argmax(host.decode(tok)))


def test_prompt_longer_than_prefill_limit(axera_dir, host_dir, fake_ax):
    llm = load(axera_dir, "axengine")
    with pytest.raises(PromptTooLongError) as e:
        llm.prefill(prompt_embeds(llm, 257))
    msg = str(e.value)
    assert "257 tokens" in msg and "prefill limit 256" in msg and "never truncated" in msg
    assert llm.layers[0].calls == []  # nothing ran
    host = load(host_dir, "onnxruntime", max_context=200)
    with pytest.raises(PromptTooLongError, match="context 200"):
        host.prefill(prompt_embeds(host, 201))


def test_decode_stops_at_the_context(axera_dir, fake_ax):
    llm = load(axera_dir, "axengine")
    llm.prefill(prompt_embeds(llm, 250))
    for _ in range(50):
        llm.decode(5)
    assert llm.cache.filled == 300
    with pytest.raises(PromptTooLongError, match="context of 300 tokens is full"):
        llm.decode(5)


def test_cache_reset_zeroes_used_rows(host_dir):
    llm = load(host_dir, "onnxruntime")
    llm.prefill(prompt_embeds(llm, 40))
    assert np.abs(llm.cache.k[:, :, :40]).sum() > 0
    llm.reset()
    assert llm.cache.filled == 0 and not llm.cache.k.any() and not llm.cache.v.any()


def run_request(llm, n_prompt, n_decode, seed):
    """Prefill a random prompt and decode greedily; returns every logits vector."""
    out = [llm.prefill(prompt_embeds(llm, n_prompt, seed=seed))]
    for _ in range(n_decode):
        out.append(llm.decode(int(np.argmax(out[-1]))))
    return out


@pytest.mark.parametrize("backend", ["onnxruntime", "axengine"])
def test_stale_cache_rows_are_kept_and_harmless(host_dir, axera_dir, fake_ax, backend):
    """A new request does not zero the cache: the host never reads rows past `filled`, the
    NPU masks them (exp(-65536 + s) * v = 0 for finite v)."""
    root = axera_dir if backend == "axengine" else host_dir
    used = load(root, backend)
    run_request(used, 250, 20, seed=1)  # rows [0, 270) now hold this request
    second = run_request(used, 40, 5, seed=2)
    stale = used.cache.k[:, :, 45:270]
    assert np.abs(stale.astype(np.float32)).sum() > 0  # not zeroed: no 470/234 MB memset
    fresh = run_request(load(root, backend), 40, 5, seed=2)
    for a, b in zip(second, fresh, strict=True):
        np.testing.assert_array_equal(a, b)


def test_tainted_cache_is_zeroed_before_the_next_request(axera_dir, fake_ax):
    llm = load(axera_dir, "axengine")
    run_request(llm, 200, 2, seed=3)
    llm.cache.k[:, :, 100:202] = np.nan  # what a failed or overflowing step could leave
    llm.cache.taint()
    got = run_request(llm, 30, 3, seed=4)
    assert np.isfinite(llm.cache.k.astype(np.float32)).all()
    assert not llm.cache.k[:, :, 33:].astype(np.float32).any()
    for a, b in zip(got, run_request(load(axera_dir, "axengine"), 30, 3, seed=4), strict=True):
        np.testing.assert_array_equal(a, b)
    # non-finite logits taint the cache by themselves, and fail the step (no token from them)
    llm.cache.k[:, :, :] = np.inf
    with pytest.raises(BackendError, match="non-finite logits"):
        llm.decode(5)
    assert llm.cache.tainted


def test_prefill_groups_in_another_dtype(host_dir, tmp_path_factory, fake_ax):
    """Each shape group is fed in its own declared dtypes (here float32 prefill groups and a
    bfloat16 decode group)."""
    root = tmp_path_factory.mktemp("axera_f32_prefill")
    fake_axengine.make_fake_axera_dir(host_dir, root, kv_cache_len=300, max_prefill=256,
                                      prefill_dtype=np.float32)
    llm = load(root, "axengine")
    assert llm.dtypes[1]["input"] == np.float32 and llm.dtypes[0]["input"] != np.float32
    x = prompt_embeds(llm, 200, seed=5)
    logits = llm.prefill(x)
    tok = int(np.argmax(logits))
    out = llm.decode(tok)
    host = load(host_dir, "onnxruntime")
    ref = host.prefill(x)
    np.testing.assert_allclose(logits, ref, atol=0.02 * np.abs(ref).max())
    assert tok == int(np.argmax(ref)) and int(np.argmax(out)) == int(np.argmax(host.decode(tok)))


def rewrite_layer(root, index, **changes):
    """Rebuild one layer's fake .axmodel with other shape groups (a mixed download)."""
    import json

    path = next(root.rglob(f"*_l{index}_together.axmodel"))
    manifest = json.loads(path.read_text())
    g0 = manifest["groups"][0]
    names_in = [n["name"] for n in g0["inputs"]]
    names_out = [n["name"] for n in g0["outputs"]]
    hidden, kv_dim = g0["inputs"][3]["shape"][-1], g0["inputs"][0]["shape"][-1]
    opts = dict(kv_cache_len=300, prefill_len=128, max_prefill=256) | changes
    manifest["groups"] = fake_axengine.layer_groups(names_in, names_out, hidden, kv_dim, **opts)
    path.write_text(json.dumps(manifest))
    return path


@pytest.mark.parametrize("changes,what", [
    (dict(kv_cache_len=200), "shape group 0: input 'K_cache'"),
    (dict(max_prefill=128), "2 shape group(s)"),
    (dict(prefill_dtype=np.float32), "shape group 1: input 'K_cache'"),
])
def test_mixed_layer_files_fail_at_load(host_dir, tmp_path, fake_ax, changes, what):
    fake_axengine.make_fake_axera_dir(host_dir, tmp_path, kv_cache_len=300, max_prefill=256)
    bad = rewrite_layer(tmp_path, 1, **changes)
    with pytest.raises(ModelDirError) as e:
        load(tmp_path, "axengine")
    msg = str(e.value)
    assert str(bad) in msg and what in msg and "different builds" in msg


class FakeNode:
    def __init__(self, name, shape, dtype=np.float32):
        self.name, self.shape, self.dtype = name, shape, np.dtype(dtype)


class FakeSession:
    dynamic_shapes = True
    num_shape_groups = 1

    def __init__(self, path, inputs):
        self.path, self._inputs = path, inputs

    def get_inputs(self, g=0):
        return self._inputs

    def close(self):
        pass


def test_model_inputs_must_match_config(host_dir):
    md = load_model_dir(host_dir)
    post = FakeSession("post.onnx", [FakeNode("input", (1, None, 64))])
    layer = FakeSession("layer0.onnx", [FakeNode("K_cache", (1, None, 32)),
                                        FakeNode("V_cache", (1, None, 32)),
                                        FakeNode("indices", (1, None), np.uint32),
                                        FakeNode("input", (1, None, 80)),
                                        FakeNode("mask", (1, None, None))])
    emb = np.zeros((10, 64), np.float32)
    with pytest.raises(ShapeMismatchError) as e:
        LanguageModel([layer], post, emb, md.config)
    assert "layer0.onnx" in str(e.value) and "80" in str(e.value)
    assert "hidden_size=64" in str(e.value)
    layer._inputs[3] = FakeNode("input", (1, None, 64))
    layer._inputs[0] = FakeNode("K_cache", (1, None, 48))
    with pytest.raises(ShapeMismatchError, match="kv_dim"):
        LanguageModel([layer], post, emb, md.config)
    layer._inputs = layer._inputs[:4]
    with pytest.raises(ShapeMismatchError, match=r"lacks input\(s\) \['mask'\]"):
        LanguageModel([layer], post, emb, md.config)
