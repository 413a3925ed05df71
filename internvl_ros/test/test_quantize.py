"""Weight-only int4/int8 quantisation (export.quantize): packing, onnxruntime agreement, and a
quantised tiny model dir that the runtime loads and runs close to float32."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from internvl_ros.core import GenerationConfig, Pipeline
from internvl_ros.core.errors import ConfigError, ModelDirError
from internvl_ros.export.quantize import (
    QuantConfig,
    dequantize_blockwise,
    main,
    quantize_blockwise,
    quantize_graph,
    quantize_model_dir,
)
from internvl_ros.export.testing import tiny_model_dirs

CASES = [  # bits, block size, symmetric, K, N (K = 96: an odd number of 32-row blocks)
    (4, 32, True, 64, 48), (4, 32, False, 96, 40), (4, 128, True, 200, 24),
    (8, 32, True, 96, 16), (8, 32, False, 64, 24), (4, 16, False, 48, 8),
]


def matmul_model(w: np.ndarray) -> onnx.ModelProto:
    K, N = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "n", N])],
        [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("bits,block,sym,K,N", CASES)
def test_rounding_error_is_within_half_a_step(bits, block, sym, K, N):
    rng = np.random.default_rng(bits * 1000 + K)
    w = rng.standard_normal((K, N)).astype(np.float32)
    w[0, 0] = 20.0  # one outlier: its block gets a coarse scale, the others must not
    qw = quantize_blockwise(w, QuantConfig(bits, block, sym, 0))
    dq = dequantize_blockwise(qw)
    assert dq.shape == (K, N)
    k_blocks = -(-K // block)
    assert qw.scales.shape == (N, k_blocks)
    assert qw.packed.shape == (N, k_blocks, block * bits // 8)
    assert (qw.zero_points is None) == sym
    # rounding: |error| <= half a step; a value clipped at the end of the range (or moved by
    # the rounded zero point) at most one step
    step = np.repeat(np.abs(qw.scales).T, block, axis=0)[:K]  # (K, N)
    err = np.abs(dq - w)
    assert np.all(err <= step * (1 + 1e-4) + 1e-7)
    assert np.mean(err <= step / 2 * (1 + 1e-4) + 1e-7) > 0.98
    # the outlier's block is coarse; other blocks keep a fine step
    assert step[0, 0] > 3 * np.median(step)
    # relative error of the whole matrix shrinks with more bits
    rel = np.abs(dq - w).mean() / np.abs(w).mean()
    assert rel < (0.15 if bits == 4 else 0.012)


@pytest.mark.parametrize("bits,block,sym,K,N", CASES)
def test_matmulnbits_computes_with_the_dequantised_weight(bits, block, sym, K, N):
    rng = np.random.default_rng(7 + K + N)
    w = rng.standard_normal((K, N)).astype(np.float32)
    x = rng.standard_normal((1, 5, K)).astype(np.float32)
    model = matmul_model(w)
    stats = quantize_graph(model, QuantConfig(bits, block, sym, accuracy_level=0))
    assert stats["quantized"] == 1 and stats["kept"] == 0
    ops = [(n.op_type, n.domain) for n in model.graph.node]
    assert ops == [("MatMulNBits", "com.microsoft")]
    assert [t.name for t in model.graph.initializer if t.name == "W"] == []
    dq = dequantize_blockwise(quantize_blockwise(w, QuantConfig(bits, block, sym, 0)))
    y = run(model, x)
    np.testing.assert_allclose(y, x @ dq, rtol=1e-4, atol=1e-4)
    # and the quantised product is a close, not exact, copy of the float one
    ref = x @ w
    assert 0 < np.abs(y - ref).max() < (0.3 if bits == 4 else 0.03) * np.abs(ref).max()


def test_only_constant_2d_weights_are_quantised():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((32, 32)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]),
         helper.make_node("MatMul", ["h", "x2"], ["y"])], "g",  # activation x activation
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 32]),
         helper.make_tensor_value_info("x2", TensorProto.FLOAT, [1, 32, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4])],
        [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    stats = quantize_graph(model, QuantConfig(4, 32))
    assert stats["quantized"] == 1 and stats["kept"] == 1
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits", "MatMul"]


def test_config_is_validated():
    for bad in (dict(bits=3), dict(block_size=24), dict(block_size=8), dict(accuracy_level=7)):
        with pytest.raises(ConfigError):
            QuantConfig(**bad)


# ---------------------------------------------------------------------------------------------
# a quantised model dir


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    _, onnx_dir = tiny_model_dirs("a")
    q4 = quantize_model_dir(onnx_dir, tmp_path_factory.mktemp("q4"), bits=4, block_size=32)
    return onnx_dir, q4


def _ops(path):
    model = onnx.load(str(path))
    return [n.op_type for n in model.graph.node], model


def test_model_dir_layers_and_post_are_quantised_vit_is_not(dirs):
    onnx_dir, q4 = dirs
    names = {p.name for p in onnx_dir.iterdir() if p.is_file()}
    assert names <= {p.name for p in q4.iterdir()}
    for name in ("qwen3_p128_l0_together.onnx", "qwen3_p128_l1_together.onnx",
                 "qwen3_post.onnx"):
        ops, model = _ops(q4 / name)
        assert "MatMulNBits" in ops
        # only the two attention products (activations on both sides) stay MatMul
        assert ops.count("MatMul") == (2 if "_l" in name else 0)
        assert (q4 / name).stat().st_size < 0.5 * (onnx_dir / name).stat().st_size
        inputs = [i.name for i in model.graph.input]
        assert inputs == [i.name for i in onnx.load(str(onnx_dir / name)).graph.input]
    vit = "internvl_vit_model_1x3x448x448.onnx"
    assert "MatMulNBits" not in _ops(q4 / vit)[0]
    info = json.loads((q4 / "internvl_export.json").read_text())["quantization"]
    assert info["bits"] == 4 and info["block_size"] == 32 and info["quantized"] == 15
    np.testing.assert_array_equal(np.load(q4 / "model.embed_tokens.weight.npy"),
                                  np.load(onnx_dir / "model.embed_tokens.weight.npy"))


def test_quantised_pipeline_runs_close_to_float32(dirs):
    onnx_dir, q4 = dirs
    logits = {}
    for name, d in (("f32", onnx_dir), ("q4", q4)):
        with Pipeline.from_model_dir(d, num_threads=1) as pipe:
            ids = pipe.prepare("Describe the robot's surroundings.")[0]
            llm = pipe.llm
            rows = [llm.prefill(llm.embed(ids))]
            for t in (5, 17, 300):  # the same forced continuation on both builds
                rows.append(llm.decode(t))
            logits[name] = np.stack(rows)  # (4, vocab)
            gen = pipe.generate("What is ahead?", config=GenerationConfig(max_new_tokens=4))
            assert len(gen.result.token_ids) >= 1
    f, q = logits["f32"], logits["q4"]
    cos = (f * q).sum(-1) / np.linalg.norm(f, axis=-1) / np.linalg.norm(q, axis=-1)
    assert np.all(cos > 0.95), cos
    assert not np.allclose(f, q)  # really quantised


def test_cli_keeps_lm_head_float_and_rejects_bad_dirs(dirs, tmp_path, capsys):
    onnx_dir, _ = dirs
    out = tmp_path / "q8"
    assert main([str(onnx_dir), str(out), "--bits", "8", "--block-size", "32",
                 "--lm-head-bits", "0", "--asymmetric", "-q"]) == 0
    assert "MatMulNBits" not in _ops(out / "qwen3_post.onnx")[0]
    layer = onnx.load(str(out / "qwen3_p128_l0_together.onnx"))
    nbits = [n for n in layer.graph.node if n.op_type == "MatMulNBits"]
    assert {a.i for n in nbits for a in n.attribute if a.name == "bits"} == {8}
    assert all(len(n.input) == 4 for n in nbits)  # zero points (asymmetric)
    with Pipeline.from_model_dir(out, num_threads=1) as pipe:
        assert pipe.generate("Hi", config=GenerationConfig(max_new_tokens=2)).result.token_ids
    assert main([str(onnx_dir), str(onnx_dir)]) == 2
    assert "must differ" in capsys.readouterr().err
    with pytest.raises(ModelDirError, match="not a directory"):
        quantize_model_dir(tmp_path / "missing", tmp_path / "x")
