"""GPTQ import: a GPTQ-packed checkpoint (qweight / qzeros / scales / g_idx, as GPTQModel
writes them, quantization_config in config.json) exports to MatMulNBits without going through
float, and decodes like its dequantised float twin.

The packed checkpoints are written by `export.gptq.pack_gptq` from the format's description;
the reference dequantisation here is written separately, bit by bit from that description, and
the dequantised float checkpoint is checked with transformers' greedy generate.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from internvl_ros.core import GenerationConfig, Pipeline
from internvl_ros.core.errors import ConfigError, ModelDirError
from internvl_ros.export.exporter import export_model
from internvl_ros.export.gptq import GPTQConfig, gptq_linear, pack_gptq
from internvl_ros.export.testing import hf_greedy, tiny_model_dirs

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def reference_dequant(packed: dict, cfg: GPTQConfig) -> np.ndarray:
    """W (N, K) from the format's description, one code at a time (independent of gptq.py)."""
    qweight = packed["qweight"].view(np.uint32)
    qzeros = packed["qzeros"].view(np.uint32)
    scales, g_idx = packed["scales"].astype(np.float64), packed["g_idx"]
    bits, per, mask = cfg.bits, 32 // cfg.bits, (1 << cfg.bits) - 1
    K, N = qweight.shape[0] * per, qweight.shape[1]
    w = np.empty((K, N))
    for k in range(K):
        g = g_idx[k]
        for n in range(N):
            q = (int(qweight[k // per, n]) >> (bits * (k % per))) & mask
            z = (int(qzeros[g, n // per]) >> (bits * (n % per))) & mask
            z += 1 if cfg.checkpoint_format == "gptq" else 0
            w[k, n] = scales[g, n] * (q - z)
    return np.ascontiguousarray(w.T, dtype=np.float32)  # (N, K), torch layout


def matmul_nbits(qw, x: np.ndarray) -> np.ndarray:
    """x @ W through onnxruntime's MatMulNBits built by the exporter's graph code."""
    import onnxruntime as ort
    from onnx import TensorProto

    from internvl_ros.export.graphs import Graph

    g = Graph("one")
    inp = g.add_input("x", TensorProto.FLOAT, [1, x.shape[1]])
    y = g.linear(inp, qw, None, "w")
    g.graph.node.append(__import__("onnx").helper.make_node("Identity", [y], ["y"]))
    g.graph.output.append(__import__("onnx").helper.make_tensor_value_info(
        "y", TensorProto.FLOAT, [1, qw.N]))
    sess = ort.InferenceSession(g.model().SerializeToString(),
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("bits,group,desc_act,sym,fmt", [
    (4, 32, False, True, "gptq"), (4, 32, True, True, "gptq"), (4, 16, True, False, "gptq_v2"),
    (8, 32, False, False, "gptq"), (8, 64, True, True, "gptq_v2"), (4, -1, False, True, "gptq"),
])
def test_packed_weight_equals_reference_dequantisation(bits, group, desc_act, sym, fmt):
    rng = np.random.default_rng(bits + group)
    N, K = 48, 128
    w = rng.standard_normal((N, K)).astype(np.float32)
    cfg = GPTQConfig(bits, group, desc_act, sym, fmt)
    perm = rng.permutation(K) if desc_act else None
    packed = pack_gptq(w, cfg, perm)
    assert packed["qweight"].dtype == np.int32 and packed["qweight"].shape == (K * bits // 32, N)
    assert packed["scales"].dtype == np.float16
    ref = reference_dequant(packed, cfg)  # (N, K)
    assert np.abs(ref - w).max() < 0.6 * (np.abs(w).max() / (1 << (bits - 1)))  # it quantises
    qw = gptq_linear(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"],
                     cfg, K, N)
    assert (qw.perm is not None) == desc_act
    x = rng.standard_normal((1, K)).astype(np.float32)
    np.testing.assert_allclose(matmul_nbits(qw, x), x @ ref.T, rtol=1e-4, atol=1e-4)


def test_inconsistent_checkpoints_are_refused():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 64)).astype(np.float32)
    cfg = GPTQConfig(4, 32, True, True)
    packed = pack_gptq(w, cfg, rng.permutation(64))
    plain = GPTQConfig(4, 32, False, True)
    with pytest.raises(ModelDirError, match="desc_act is false"):
        gptq_linear(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"],
                    plain, 64, 16)
    with pytest.raises(ModelDirError, match="expected"):
        gptq_linear(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"],
                    cfg, 64, 8)
    with pytest.raises(ConfigError, match="group_size"):
        GPTQConfig(4, 48, False, True)
    with pytest.raises(ConfigError, match="only 4- and 8-bit"):
        GPTQConfig(3, 32, False, True)


def write_gptq_checkpoint(src, dst, cfg: GPTQConfig, seed: int = 0, lm_head: bool = False):
    """Copy a float tiny checkpoint, pack its language-model linears in the GPTQ format, and
    write its dequantised float twin beside it. Returns (gptq_dir, float_dir)."""
    rng = np.random.default_rng(seed)
    gq, fl = dst / "gptq", dst / "dequant"
    shutil.copytree(src, gq)
    shutil.copytree(src, fl)
    tensors = load_file(str(src / "model.safetensors"))
    packed_t, float_t = {}, {}
    for key, value in tensors.items():
        name = key[:-len(".weight")]
        if key.endswith(".weight") and (name.endswith(LINEARS) or (lm_head and
                                                                  name.endswith("lm_head"))):
            perm = rng.permutation(value.shape[1]) if cfg.desc_act else None
            packed = pack_gptq(value, cfg, perm)
            packed_t.update({f"{name}.{k}": v for k, v in packed.items()})
            float_t[key] = reference_dequant(packed, cfg)
        else:
            packed_t[key] = float_t[key] = value
    save_file(packed_t, str(gq / "model.safetensors"))
    save_file(float_t, str(fl / "model.safetensors"))
    config = json.loads((gq / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "gptq", "bits": cfg.bits, "group_size": cfg.group_size,
        "desc_act": cfg.desc_act, "sym": cfg.sym, "checkpoint_format": cfg.checkpoint_format,
        "lm_head": lm_head}
    (gq / "config.json").write_text(json.dumps(config, indent=2))
    return gq, fl


@pytest.mark.parametrize("layout", ["host", "split"])
@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_checkpoint_decodes_like_its_dequantised_twin(tmp_path, layout, desc_act):
    hf_dir, _ = tiny_model_dirs("a")
    cfg = GPTQConfig(4, 32, desc_act, True, "gptq")
    gq, fl = write_gptq_checkpoint(hf_dir, tmp_path, cfg, lm_head=desc_act)
    out = export_model(gq, tmp_path / "onnx", layout=layout, accuracy_level=0)
    info = json.loads((out / "internvl_export.json").read_text())
    assert info["quantization"]["method"] == "gptq" and info["quantization"]["desc_act"] is desc_act
    question, img = "Describe the image.", np.random.default_rng(5).integers(
        0, 256, (240, 320, 3), dtype=np.uint8)
    with Pipeline.from_model_dir(out, num_threads=1) as pipe:
        res = pipe.generate(question, images=[img],
                            config=GenerationConfig(max_new_tokens=12)).result
        ids, pixels = pipe.prepare(question, [img])
    reference = hf_greedy(fl, ids, pixels, max_new_tokens=12)  # transformers, float twin
    assert len(reference) >= 4
    n = len(res.token_ids)
    assert res.token_ids == reference[:n] and n >= len(reference) - 1


def test_gptq_export_refuses_requantising(tmp_path):
    from internvl_ros.export.quantize import QuantConfig

    hf_dir, _ = tiny_model_dirs("a")
    gq, _ = write_gptq_checkpoint(hf_dir, tmp_path, GPTQConfig(4, 32, False, True))
    with pytest.raises(ConfigError, match="drop --bits"):
        export_model(gq, tmp_path / "o", quant=QuantConfig(8))
