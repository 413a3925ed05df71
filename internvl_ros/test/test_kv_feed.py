"""kv_feed: the NPU layers fed only the new KV rows (rows) against the whole cache (full).

Through the pyaxengine double (its persistent buffers, CMM flushes and the card's device
memory): greedy tokens of rows == full == transformers on every golden case, on the published
build's 9 prefill groups; the self-check catches a row corrupted behind the runtime's back; a
pyaxengine without the expected internals falls back to full with one clear line; AXCL device
selection, an SDK without bfloat16, close(), and the bytes written per token.
"""

from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest
from test_golden import check, image, question_for_length

from internvl_ros.backends import fake_axengine, get_backend
from internvl_ros.backends.axengine_rows import open_rows
from internvl_ros.core import GenerationConfig, Pipeline
from internvl_ros.core.errors import BackendError, ConfigError
from internvl_ros.export.testing import tiny_model_dirs
from internvl_ros.tools import caption

PUBLISHED = dict(max_prefill=fake_axengine.PUBLISHED_MAX_PREFILL)


@pytest.fixture(scope="module", params=["a", "b"])
def model(request, tmp_path_factory):
    hf_dir, onnx_dir = tiny_model_dirs(request.param)
    root = tmp_path_factory.mktemp(f"axera-{request.param}")
    fake_axengine.make_fake_axera_dir(onnx_dir, root, **PUBLISHED)
    with fake_axengine.installed():
        full = Pipeline.from_model_dir(root, backend="axengine", kv_feed="full")
        rows = Pipeline.from_model_dir(root, backend="axengine", kv_feed="rows")
    assert rows.llm.num_groups == 1 + 9 and rows.max_prompt_tokens == 1152
    assert rows.max_context == 2047
    assert full.kv_feed.mode == "full" and rows.kv_feed.mode == "rows"
    yield hf_dir, full, rows
    full.close()
    rows.close()


def golden(model, question, images=(), system_prompt=None):
    hf_dir, full, rows = model
    ids, res = check(hf_dir, full, rows, question, images, system_prompt)
    assert res["onnxruntime"].token_ids == res["axengine"].token_ids  # full == rows
    assert rows.kv_feed.mode == "rows", rows.kv_feed.reason  # the self-checks passed
    return ids


def test_text_only(model):
    golden(model, "What is in front of the robot?")


def test_one_image(model):
    golden(model, "Describe the image.", images=[image(1)])


def test_two_images(model):
    ids = golden(model, "Compare the two images.", images=[image(2), image(3)])
    assert len(ids) > 512


@pytest.mark.parametrize("target", [127, 128, 129, 256, 1100])
def test_prompt_lengths(model, target):
    """Around slice boundaries, and 1100 tokens: every one of the 9 prefill groups."""
    question = question_for_length(model[1], target)
    ids = golden(model, question, system_prompt="You describe images.")
    assert len(ids) == target


def test_every_step_bit_identical(model):
    """Self-check on every prefill slice and decode step: rows and full agree bit for bit on
    every layer (a mismatch would switch the pipeline to full)."""
    _, _, rows = model
    feeder = rows.llm.feeder
    every, first = feeder.verify_every, feeder.verify_first
    feeder.verify_every, feeder.verify_first = 1, 10 ** 9
    try:
        before = feeder.verified_steps
        q = question_for_length(rows, 300, system_prompt="You describe images.")
        res = rows.generate(q, images=[image(4)], system_prompt="You describe images.",
                            config=GenerationConfig(max_new_tokens=12)).result
    finally:
        feeder.verify_every, feeder.verify_first = every, first
    slices = -(-len(res.prompt_token_ids) // 128)
    assert feeder.verified_steps - before == slices + len(res.token_ids) - 1
    assert rows.kv_feed.mode == "rows"


# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_axera(tmp_path_factory):
    hf_dir, onnx_dir = tiny_model_dirs("a")
    root = tmp_path_factory.mktemp("axera-tiny")
    fake_axengine.make_fake_axera_dir(onnx_dir, root, kv_cache_len=511, max_prefill=512)
    return root


def tokens(pipe, question="What is in front of the robot?", n=12, images=()):
    return pipe.generate(question, images=images,
                         config=GenerationConfig(max_new_tokens=n)).result.token_ids


def test_fault_injection_is_caught_and_falls_back(tiny_axera, caplog):
    with fake_axengine.installed():
        with Pipeline.from_model_dir(tiny_axera, backend="axengine", kv_feed="full") as full:
            want = tokens(full, images=[image(5)])
        pipe = Pipeline.from_model_dir(tiny_axera, backend="axengine")  # auto
        assert pipe.kv_feed.mode == "rows" and pipe.kv_feed.requested == "auto"
        gen = pipe.generate("What is in front of the robot?", images=[image(5)],
                            config=GenerationConfig(max_new_tokens=12))
        next(gen)  # prefill: rows 0..L-1 are in the layers' buffers now
        # the double changes row 3 of layer 1's K_cache buffer right before the next decode run
        pipe.llm.layers[1]._sess.inject_fault(0, "K_cache", 3)
        with caplog.at_level(logging.WARNING, logger="internvl_ros.kv_feed"):
            got = gen.result.token_ids
        status = pipe.kv_feed
        assert got == want  # the full-feed outputs were kept
        assert status.mode == "full" and "decoder layer 1" in status.reason
        assert "decode step 0" in status.reason and "differ" in status.reason
        lines = [r for r in caplog.records if r.name == "internvl_ros.kv_feed"]
        assert len(lines) == 1 and "switching to full" in lines[0].getMessage()
        assert tokens(pipe, images=[image(5)]) == want  # full for good
        assert pipe.kv_feed.mode == "full"
        pipe.close()


def test_missing_internals_give_full_and_one_line(tiny_axera, caplog):
    with fake_axengine.installed(internals=False):
        with caplog.at_level(logging.INFO, logger="internvl_ros.kv_feed"):
            pipe = Pipeline.from_model_dir(tiny_axera, backend="axengine")
        lines = [r.getMessage() for r in caplog.records if r.name == "internvl_ros.kv_feed"]
        assert lines == [f"kv_feed: full ({pipe.kv_feed.reason})"]
        assert caplog.records[-1].levelno == logging.INFO
        assert pipe.kv_feed.mode == "full"
        assert "pyaxengine internals not as expected: session._io is missing" in lines[0]
        got = tokens(pipe)
        pipe.close()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="internvl_ros.kv_feed"):
            asked = Pipeline.from_model_dir(tiny_axera, backend="axengine", kv_feed="rows")
        assert asked.kv_feed.mode == "full" and caplog.records[-1].levelno == logging.WARNING
        asked.close()
    with fake_axengine.installed():
        with Pipeline.from_model_dir(tiny_axera, backend="axengine", kv_feed="rows") as rows:
            assert tokens(rows) == got


def test_door_checks_the_internals_it_needs(tiny_axera):
    """Fails when the internals the rows door relies on change (in the double, as read from
    pyaxengine's source)."""
    layer = next(tiny_axera.rglob("*_l0_together.axmodel"))
    with fake_axengine.installed() as ax:
        sess = ax.InferenceSession(str(layer), providers=["AxEngineExecutionProvider"])
        groups = range(1 + 512 // 128)
        ins = [sess.get_inputs(g) for g in groups]
        outs = [sess.get_outputs(g) for g in groups]
        rows, what = open_rows(sess, "AxEngineExecutionProvider", ins, outs)
        assert rows is not None and rows.layout == "axe-cmm", what
        # one persistent buffer per input, sized for the largest group (K_cache: decode)
        k_buf = sess._sess._io[0].pInputs[0]
        assert k_buf.nSize == 511 * 32 * 2
        assert sess._sess._io[0].pInputs[4].nSize == 128 * 512 * 2  # mask of the last slice
        # only flushed bytes reach the NPU: a write without a flush is not seen
        rng = np.random.default_rng(0)
        feed = {n.name: rng.normal(size=n.shape).astype(n.dtype) for n in ins[0]}
        feed["indices"] = np.full((1, 1), 5, np.uint32)
        feed["mask"][:] = 0
        before = sess.run(None, feed, shape_group=0)
        junk = np.full(32, 7.0, fake_axengine.BF16)
        ffi = sys.modules["axengine._axe_capi"].engine_cffi
        ffi.memmove(ffi.cast("char *", k_buf.pVirAddr) + 64, ffi.cast("void *", junk.ctypes.data),
                    junk.nbytes)
        small = {k: v for k, v in feed.items() if k not in ("K_cache", "V_cache")}
        same = rows.run(small, 0)
        assert all(a.tobytes() == b.tobytes() for a, b in zip(before, same, strict=True))
        rows.write_rows("K_cache", 1, junk[None, None])  # written and flushed
        changed = rows.run(small, 0)
        assert changed[2].tobytes() != before[2].tobytes()  # the NPU saw the new row
        del sess._sess._io
        rows, what = open_rows(sess, "AxEngineExecutionProvider", ins, outs)
        assert rows is None and "session._io is missing" in what
        card = ax.InferenceSession(str(layer), providers=["AXCLRTExecutionProvider"])
        rows, what = open_rows(card, "AXCLRTExecutionProvider", ins, outs)
        assert rows is not None and rows.layout == "axcl-device", what
        card._sess._io = None  # closed
        assert open_rows(card, "AXCLRTExecutionProvider", ins, outs)[0] is None
        small = [[n if n.name != "K_cache" else fake_axengine.NodeArg(n.name, n.dtype, (1, 9999,
                 n.shape[-1])) for n in g] for g in ins]
        sess = ax.InferenceSession(str(layer))
        rows, what = open_rows(sess, None, small, outs)
        assert rows is None and "the largest group needs" in what


def test_axcl_card_rows_and_device_id(tiny_axera):
    with fake_axengine.installed(devices=2):
        with Pipeline.from_model_dir(tiny_axera, backend="axengine", kv_feed="full") as full:
            want = tokens(full, images=[image(6)])
        with Pipeline.from_model_dir(tiny_axera, backend="axengine", device_id=1) as card:
            assert card.llm.layers[0].provider == "AXCLRTExecutionProvider"
            assert card.llm.layers[0]._sess._sess._device_index == 1
            assert card.kv_feed.mode == "rows" and "axcl-device" in card.kv_feed.reason
            assert tokens(card, images=[image(6)]) == want
            assert card.kv_feed.mode == "rows"
        with pytest.raises(BackendError, match="Device index 2 is out of range, total 2"):
            Pipeline.from_model_dir(tiny_axera, backend="axengine", device_id=2)
        with pytest.raises(ConfigError, match="M.2 card"):
            get_backend("axengine", provider="AxEngineExecutionProvider", device_id=0)
        with pytest.raises(ConfigError, match="device_id=-1"):
            get_backend("axengine", device_id=-1)
    with pytest.raises(BackendError, match="does not take device_id"):
        get_backend("onnxruntime", device_id=0)


def test_old_sdk_without_bfloat16(tiny_axera):
    with fake_axengine.installed(bf16=False):
        with pytest.raises(BackendError) as e:
            Pipeline.from_model_dir(tiny_axera, backend="axengine")
    assert "Unsupported data type" in str(e.value)
    assert "upgrade to AX650 SDK 2.18 or newer" in str(e.value)


def test_close_releases_buffers(tiny_axera):
    with fake_axengine.installed():
        pipe = Pipeline.from_model_dir(tiny_axera, backend="axengine")
        inner = pipe.llm.layers[0]._sess._sess
        bufs = [b._buf for b in inner._io[0].pInputs + inner._io[0].pOutputs]
        handle = inner._handle[0]
        pipe.close()
        assert handle.destroyed and all(b.freed for b in bufs)  # pyaxengine alone frees none
        card = Pipeline.from_model_dir(tiny_axera, backend="axengine",
                                       provider="AXCLRTExecutionProvider")
        inner = card.llm.layers[0]._sess._sess
        card.close()
        assert inner._io is None and inner._model_id[0] == 0


def test_bytes_written_per_token(tiny_axera):
    """Decode: rows writes 2 rows per layer plus the small inputs; full the whole cache.
    Prefill: each slice writes its own rows once."""
    with fake_axengine.installed():
        per_token = {}
        for mode in ("full", "rows"):
            with Pipeline.from_model_dir(tiny_axera, backend="axengine", kv_feed=mode) as pipe:
                tokens(pipe, n=4)  # warm: the rows pipeline has synced its buffers once
                llm = pipe.llm
                llm.feeder.verify_every = 0
                gen = pipe.generate("What is in front of the robot?",
                                    config=GenerationConfig(max_new_tokens=6))
                next(gen)
                next(gen)  # the first decode step also writes the last prefill slice's rows
                fake_axengine.counters.reset()
                steps = sum(1 for _ in gen)
                per_token[mode] = fake_axengine.counters.input_bytes / steps
    layers, kv, hidden, ctx = len(llm.layers), llm.config.kv_dim, llm.config.hidden_size, 511
    small = 4 + 2 * hidden + 2 * (ctx + 1)  # indices, input, mask
    post = 2 * hidden  # the post model's input
    assert per_token["rows"] == layers * (2 * 2 * kv + small) + post
    assert per_token["full"] == layers * (2 * 2 * kv * ctx + small) + post


def test_prefill_writes_each_slice_once(tiny_axera):
    with fake_axengine.installed():
        with Pipeline.from_model_dir(tiny_axera, backend="axengine", kv_feed="rows") as pipe:
            feeder = pipe.llm.feeder
            feeder.verify_first = feeder.verify_every = 0
            io = feeder.rows_io[0]
            written = []
            orig = io.write_rows
            io.write_rows = lambda name, start, r: (written.append((name, start, r.shape[1])),
                                                    orig(name, start, r))
            q = question_for_length(pipe, 300, system_prompt="You describe images.")
            gen = pipe.generate(q, system_prompt="You describe images.",
                                config=GenerationConfig(max_new_tokens=2))
            next(gen)
            k = [(s, n) for name, s, n in written if name == "K_cache"]
            assert k == [(0, 1), (0, 128), (128, 128)]  # dummy, then the earlier slices
            written.clear()
            next(gen)  # decode: the last slice's 44 rows, and the stale rest of the buffer once
            assert ("K_cache", 256, 511 - 256) in written


def test_kv_feed_options_and_host_backend():
    _, onnx_dir = tiny_model_dirs("a")
    with pytest.raises(ConfigError, match="kv_feed='fast'"):
        Pipeline.from_model_dir(onnx_dir, kv_feed="fast")
    with Pipeline.from_model_dir(onnx_dir, num_threads=1) as host:
        assert host.kv_feed.mode == "full" and "dynamic shapes" in host.kv_feed.reason
        a = tokens(host)
    with Pipeline.from_model_dir(onnx_dir, num_threads=1, kv_feed="rows") as host:
        assert host.kv_feed.mode == "full" and tokens(host) == a  # no change on onnxruntime


def test_caption_cli_reports_the_mode_used(tiny_axera, tmp_path, capsys):
    import cv2

    jpg = tmp_path / "x.jpg"
    cv2.imwrite(str(jpg), image(8)[..., ::-1])
    args = ["--model-dir", str(tiny_axera), "--backend", "axengine", "--image", str(jpg),
            "--prompt", "Describe it.", "--max-new-tokens", "5", "--json"]
    records = {}
    for internals in (True, False):
        with fake_axengine.installed(internals=internals):
            assert caption.main(args + ["--kv-feed", "rows"]) == 0
        records[internals] = json.loads(capsys.readouterr().out)
    ok, bare = records[True]["kv_feed"], records[False]["kv_feed"]
    assert ok["mode"] == "rows" and ok["requested"] == "rows" and ok["verified_steps"] > 0
    assert bare["mode"] == "full" and "internals" in bare["reason"]
    assert records[True]["token_ids"] == records[False]["token_ids"]
    np.testing.assert_equal(records[True]["prompt_token_ids"], records[False]["prompt_token_ids"])


def test_board_script_runs_unchanged(tiny_axera, tmp_path):
    """bench/board.py, as a board owner runs it, here through the double (--fake)."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "bench" / "board.py"
    out = subprocess.run([sys.executable, str(script), "--model-dir", str(tiny_axera), "--fake",
                          "--tokens", "6", "--runs", "1", "--json", str(tmp_path / "b.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "| decode tok/s (median) |" in out.stdout and "| TTFT s" in out.stdout
    assert "same tokens in both modes: yes" in out.stdout
    assert "rows self-check: passed" in out.stdout
    record = json.loads((tmp_path / "b.json").read_text())
    assert record["rows"]["kv_feed"]["mode"] == "rows" and record["full"]["decode_tok_s"] > 0


def test_prefill_groups_in_another_dtype_stay_full(tmp_path):
    """Rows are shared between shape groups only when every group holds K/V in one dtype."""
    _, onnx_dir = tiny_model_dirs("a")
    fake_axengine.make_fake_axera_dir(onnx_dir, tmp_path, kv_cache_len=300, max_prefill=256,
                                      prefill_dtype=np.float32)
    with fake_axengine.installed():
        with Pipeline.from_model_dir(tmp_path, backend="axengine", kv_feed="rows") as pipe:
            assert pipe.kv_feed.mode == "full"
            assert "float32 in shape group 1 but bfloat16" in pipe.kv_feed.reason
            assert len(tokens(pipe, n=4)) == 4


def test_stale_rows_follow_the_cache():
    """The feeder writes exactly the rows the host cache changed since the buffers got them:
    what a prefill that keeps a cached prefix and continues at row N relies on."""
    from internvl_ros.core.kvcache import KVCache
    from internvl_ros.core.kvfeed import KVFeeder

    bf16 = fake_axengine.BF16

    class RowsIO:
        dtype = {"K_cache": bf16, "V_cache": bf16}

        def __init__(self):
            self.writes = []

        def write_rows(self, name, start, rows):
            self.writes.append((name, start, rows.shape[1]))

        def run(self, feed, group):
            return [np.zeros(1)]

    class Layer:
        def __init__(self):
            self.kv_rows, self.kv_rows_reason = RowsIO(), "test layout"

    layers = [Layer(), Layer()]
    cache = KVCache(2, 100, 4, bf16)
    feeder = KVFeeder(layers, cache, "auto", verify_first=0, verify_every=0)
    assert feeder.mode == "rows" and feeder.stale == [[(0, 100)], [(0, 100)]]
    io = layers[0].kv_rows

    def run(rows):
        io.writes.clear()
        feeder.run(0, {"K_cache": None, "V_cache": None}, 0, rows, lambda: 1 / 0)
        return [(s, n) for name, s, n in io.writes if name == "K_cache"]

    assert run(100) == [(0, 100)]  # fresh buffers: everything once
    assert run(100) == []
    rows = np.ones((1, 3, 4), bf16)
    cache.write(0, 10, rows, rows)
    cache.write(0, 13, rows[:, :1], rows[:, :1])  # adjacent: merged
    cache.write(0, 50, rows[:, :1], rows[:, :1])
    assert feeder.stale[0] == [(10, 14), (50, 51)] and feeder.stale[1] == [(0, 100)]
    assert run(12) == [(10, 2)]  # a group reading 12 rows gets rows 10, 11 only
    assert feeder.stale[0] == [(12, 14), (50, 51)]
    assert run(100) == [(12, 2), (50, 1)]
    cache.reset(clear=True)  # zeroed rows must be written again, in every layer
    assert feeder.stale == [[(0, 51)], [(0, 100)]]
