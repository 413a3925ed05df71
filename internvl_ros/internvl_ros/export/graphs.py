"""Hand-built ONNX graphs for the split InternVL model (numpy weights in, onnx.ModelProto out).

Three graphs, matching docs/MODEL_DIR.md:
- `build_layer`: one Qwen3 decoder layer with an external KV cache (dynamic `past` and `n`).
- `build_post`: final RMSNorm + lm_head.
- `build_vit`: InternViT + pixel shuffle + mlp1 projector, one 448x448 tile (no resize inside).

Everything is float32 with opset 17 primitives (no contrib ops; onnxruntime >= 1.14).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper

from internvl_ros.export.checkpoint import TextSpec, VisionSpec

OPSET = 17
MASKED = -65536.0  # additive mask value for "do not attend" (bf16-representable)


class Graph:
    """A tiny imperative ONNX graph builder: every op returns its output name.

    Nodes and initializers go straight into one ModelProto (no intermediate copies), which keeps
    the peak memory of the 1.2 GB ViT export near twice its size.
    """

    def __init__(self, name: str):
        self.proto = helper.make_model(
            helper.make_graph([], name, [], []),
            opset_imports=[helper.make_opsetid("", OPSET)], producer_name="internvl_ros",
        )
        self.proto.ir_version = 8  # readable by onnxruntime >= 1.14
        self.graph = self.proto.graph
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, array: np.ndarray, name: str | None = None) -> str:
        name = name or self.fresh("const")
        array = np.asarray(array)
        t = self.graph.initializer.add()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        t.dims.extend(array.shape)
        t.raw_data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        return name

    def ints(self, values) -> str:
        return self.const(np.asarray(values, dtype=np.int64))

    def scalar(self, value: float) -> str:
        return self.const(np.asarray(value, dtype=np.float32))

    def op(self, op_type: str, *inputs: str, n_out: int = 1, **attrs):
        outs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.graph.node.append(helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def add_input(self, name: str, elem_type: int, shape: list) -> str:
        self.graph.input.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def add_output(self, value: str, name: str, shape: list) -> None:
        self.graph.node.append(helper.make_node("Identity", [value], [name]))
        self.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))

    def model(self) -> onnx.ModelProto:
        return self.proto

    # -- layers -------------------------------------------------------------------------------

    def linear(self, x: str, weight: np.ndarray, bias: np.ndarray | None, name: str) -> str:
        """x @ weight.T + bias, weight in torch (out, in) layout."""
        y = self.op("MatMul", x, self.const(weight.T, f"{name}.weight_t"))
        if bias is not None:
            y = self.op("Add", y, self.const(bias, f"{name}.bias"))
        return y

    def rms_norm(self, x: str, weight: np.ndarray, eps: float, name: str) -> str:
        """weight * x / sqrt(mean(x^2, -1) + eps), as in transformers (float32)."""
        var = self.op("ReduceMean", self.op("Mul", x, x), axes=[-1], keepdims=1)
        inv = self.op("Reciprocal", self.op("Sqrt", self.op("Add", var, self.scalar(eps))))
        return self.op("Mul", self.op("Mul", x, inv), self.const(weight, f"{name}.weight"))

    def layer_norm(self, x: str, weight: np.ndarray, bias: np.ndarray, eps: float,
                   name: str) -> str:
        return self.op("LayerNormalization", x, self.const(weight, f"{name}.weight"),
                       self.const(bias, f"{name}.bias"), axis=-1, epsilon=float(eps))

    def gelu(self, x: str) -> str:
        """Exact (erf) GELU."""
        erf = self.op("Erf", self.op("Mul", x, self.scalar(1.0 / math.sqrt(2.0))))
        return self.op("Mul", self.op("Mul", x, self.scalar(0.5)),
                       self.op("Add", erf, self.scalar(1.0)))


# ---------------------------------------------------------------------------------------------
# decoder layer


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """1 / theta^(2i/d) in float32, computed like transformers' default RoPE."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)  # (head_dim/2,)


def build_layer(spec: TextSpec, w: Mapping[str, np.ndarray], index: int) -> onnx.ModelProto:
    """One Qwen3 decoder layer; `w` holds the layer's tensors by their name after `layers.{i}.`.

    Inputs K_cache, V_cache (1, past, kv_dim), indices (1, n) uint32, input (1, n, hidden),
    mask (1, n, past + n). Outputs K_new, V_new (1, n, kv_dim) and output (1, n, hidden).
    """
    H, KVH, D = spec.heads, spec.kv_heads, spec.head_dim
    g = Graph(f"qwen3_layer_{index}")
    k_cache = g.add_input("K_cache", TensorProto.FLOAT, [1, "past", spec.kv_dim])
    v_cache = g.add_input("V_cache", TensorProto.FLOAT, [1, "past", spec.kv_dim])
    indices = g.add_input("indices", TensorProto.UINT32, [1, "n"])
    x = g.add_input("input", TensorProto.FLOAT, [1, "n", spec.hidden])
    mask = g.add_input("mask", TensorProto.FLOAT, [1, "n", "past_plus_n"])
    p = f"layers.{index}"

    # attention block
    h = g.rms_norm(x, w["input_layernorm.weight"], spec.rms_eps, f"{p}.input_layernorm")
    q = g.linear(h, w["self_attn.q_proj.weight"], w.get("self_attn.q_proj.bias"),
                 f"{p}.self_attn.q_proj")  # (1, n, H*D)
    k = g.linear(h, w["self_attn.k_proj.weight"], w.get("self_attn.k_proj.bias"),
                 f"{p}.self_attn.k_proj")  # (1, n, KVH*D)
    v = g.linear(h, w["self_attn.v_proj.weight"], w.get("self_attn.v_proj.bias"),
                 f"{p}.self_attn.v_proj")  # (1, n, KVH*D)
    q = g.op("Reshape", q, g.ints([0, 0, H, D]))  # (1, n, H, D)
    k = g.op("Reshape", k, g.ints([0, 0, KVH, D]))  # (1, n, KVH, D)
    q = g.rms_norm(q, w["self_attn.q_norm.weight"], spec.rms_eps, f"{p}.self_attn.q_norm")
    k = g.rms_norm(k, w["self_attn.k_norm.weight"], spec.rms_eps, f"{p}.self_attn.k_norm")

    # RoPE from absolute positions: angle = pos * inv_freq, rotate_half convention
    pos = g.op("Unsqueeze", g.op("Cast", indices, to=TensorProto.FLOAT), g.ints([2]))  # (1, n, 1)
    freqs = g.op("Mul", pos, g.const(rope_inv_freq(D, spec.rope_theta), f"{p}.rope.inv_freq"))
    emb = g.op("Concat", freqs, freqs, axis=-1)  # (1, n, D)
    cos = g.op("Unsqueeze", g.op("Cos", emb), g.ints([2]))  # (1, n, 1, D)
    sin = g.op("Unsqueeze", g.op("Sin", emb), g.ints([2]))  # (1, n, 1, D)
    half = g.ints([D // 2, D // 2])

    def rope(t: str) -> str:
        t1, t2 = g.op("Split", t, half, axis=-1, n_out=2)  # (1, n, heads, D/2) each
        rotated = g.op("Concat", g.op("Neg", t2), t1, axis=-1)
        return g.op("Add", g.op("Mul", t, cos), g.op("Mul", rotated, sin))

    q = rope(q)  # (1, n, H, D)
    k_new = g.op("Reshape", rope(k), g.ints([0, 0, KVH * D]))  # (1, n, kv_dim)
    v_new = v  # (1, n, kv_dim)

    # attention over [cache; new]; GQA: the G = H / KVH query heads of a KV head are stacked
    # along the sequence axis, so K/V are never repeated
    k_all = g.op("Concat", k_cache, k_new, axis=1)  # (1, T, kv_dim), T = past + n
    v_all = g.op("Concat", v_cache, v_new, axis=1)  # (1, T, kv_dim)
    kh = g.op("Transpose", g.op("Reshape", k_all, g.ints([0, 0, KVH, D])),
              perm=[0, 2, 3, 1])  # (1, KVH, D, T)
    vh = g.op("Transpose", g.op("Reshape", v_all, g.ints([0, 0, KVH, D])),
              perm=[0, 2, 1, 3])  # (1, KVH, T, D)
    qh = g.op("Transpose", q, perm=[0, 2, 1, 3])  # (1, H, n, D)
    qh = g.op("Reshape", qh, g.ints([1, KVH, -1, D]))  # (1, KVH, G*n, D)
    scores = g.op("Mul", g.op("MatMul", qh, kh), g.scalar(D ** -0.5))  # (1, KVH, G*n, T)
    scores = g.op("Reshape", scores, g.ints([1, H, -1, 0]))  # (1, H, n, T)
    scores = g.op("Add", scores, g.op("Unsqueeze", mask, g.ints([1])))  # + (1, 1, n, T)
    probs = g.op("Softmax", scores, axis=-1)  # (1, H, n, T)
    probs = g.op("Reshape", probs, g.ints([1, KVH, -1, 0]))  # (1, KVH, G*n, T)
    attn = g.op("MatMul", probs, vh)  # (1, KVH, G*n, D)
    attn = g.op("Reshape", attn, g.ints([1, H, -1, D]))  # (1, H, n, D)
    attn = g.op("Transpose", attn, perm=[0, 2, 1, 3])  # (1, n, H, D)
    attn = g.op("Reshape", attn, g.ints([0, 0, H * D]))  # (1, n, H*D)
    attn = g.linear(attn, w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias"),
                    f"{p}.self_attn.o_proj")  # (1, n, hidden)
    x = g.op("Add", x, attn)

    # SwiGLU MLP block
    h = g.rms_norm(x, w["post_attention_layernorm.weight"], spec.rms_eps,
                   f"{p}.post_attention_layernorm")
    gate = g.linear(h, w["mlp.gate_proj.weight"], None, f"{p}.mlp.gate_proj")  # (1, n, inter)
    up = g.linear(h, w["mlp.up_proj.weight"], None, f"{p}.mlp.up_proj")  # (1, n, inter)
    act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
    out = g.op("Add", x, g.linear(act, w["mlp.down_proj.weight"], None, f"{p}.mlp.down_proj"))

    g.add_output(k_new, "K_new", [1, "n", spec.kv_dim])
    g.add_output(v_new, "V_new", [1, "n", spec.kv_dim])
    g.add_output(out, "output", [1, "n", spec.hidden])
    return g.model()


def build_post(spec: TextSpec, norm_weight: np.ndarray, lm_head: np.ndarray) -> onnx.ModelProto:
    """Final RMSNorm + lm_head: input (1, n, hidden) -> logits (1, n, vocab); n is 1 at runtime."""
    g = Graph("qwen3_post")
    x = g.add_input("input", TensorProto.FLOAT, [1, "n", spec.hidden])
    h = g.rms_norm(x, norm_weight, spec.rms_eps, "norm")
    logits = g.linear(h, lm_head, None, "lm_head")  # (1, n, vocab)
    g.add_output(logits, "logits", [1, "n", spec.vocab])
    return g.model()


# ---------------------------------------------------------------------------------------------
# vision


def build_vit(spec: VisionSpec, text_hidden: int, w: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """InternViT + pixel shuffle + projector on one ImageNet-normalised tile.

    `w` holds canonical tensors with the `vit.` / `proj.` prefixes. Input `image`
    (1, 3, S, S) float32 -> `image_features` (1, (S/P/2)^2, text_hidden).
    """
    C, NH, S, P = spec.hidden, spec.heads, spec.image_size, spec.patch_size
    Dh = C // NH
    grid = spec.grid
    n_tok = grid * grid + 1  # patches + cls
    g = Graph("internvl_vit")
    img = g.add_input("image", TensorProto.FLOAT, [1, 3, S, S])

    # patch embedding + cls + absolute positions
    patch = g.op("Conv", img, g.const(w["vit.embeddings.patch_embeddings.projection.weight"],
                                      "vit.patch_embed.weight"),
                 g.const(w["vit.embeddings.patch_embeddings.projection.bias"],
                         "vit.patch_embed.bias"),
                 kernel_shape=[P, P], strides=[P, P])  # (1, C, grid, grid)
    patch = g.op("Transpose", g.op("Reshape", patch, g.ints([1, C, grid * grid])),
                 perm=[0, 2, 1])  # (1, grid*grid, C)
    x = g.op("Concat", g.const(w["vit.embeddings.cls_token"].reshape(1, 1, C), "vit.cls_token"),
             patch, axis=1)  # (1, n_tok, C)
    pos = w["vit.embeddings.position_embeddings"].reshape(1, n_tok, C)
    x = g.op("Add", x, g.const(pos, "vit.position_embeddings"))

    def norm(t: str, name: str) -> str:
        if spec.norm_type == "layer_norm":
            return g.layer_norm(t, w[f"{name}.weight"], w[f"{name}.bias"], spec.eps, name)
        return g.rms_norm(t, w[f"{name}.weight"], spec.eps, name)

    for i in range(spec.num_layers):
        p = f"vit.encoder.layer.{i}"
        a = f"{p}.attention"
        h = norm(x, f"{p}.layernorm_before")
        q = g.linear(h, w[f"{a}.q_proj.weight"], w.get(f"{a}.q_proj.bias"), f"{a}.q_proj")
        k = g.linear(h, w[f"{a}.k_proj.weight"], w.get(f"{a}.k_proj.bias"), f"{a}.k_proj")
        v = g.linear(h, w[f"{a}.v_proj.weight"], w.get(f"{a}.v_proj.bias"), f"{a}.v_proj")
        if spec.qk_norm:  # RMSNorm over all heads together, as InternViT does
            q = g.rms_norm(q, w[f"{a}.q_norm.weight"], spec.eps, f"{a}.q_norm")
            k = g.rms_norm(k, w[f"{a}.k_norm.weight"], spec.eps, f"{a}.k_norm")
        heads = g.ints([1, n_tok, NH, Dh])
        qh = g.op("Transpose", g.op("Reshape", q, heads), perm=[0, 2, 1, 3])  # (1, NH, N, Dh)
        kh = g.op("Transpose", g.op("Reshape", k, heads), perm=[0, 2, 3, 1])  # (1, NH, Dh, N)
        vh = g.op("Transpose", g.op("Reshape", v, heads), perm=[0, 2, 1, 3])  # (1, NH, N, Dh)
        scores = g.op("Mul", g.op("MatMul", qh, kh), g.scalar(Dh ** -0.5))  # (1, NH, N, N)
        attn = g.op("MatMul", g.op("Softmax", scores, axis=-1), vh)  # (1, NH, N, Dh)
        attn = g.op("Reshape", g.op("Transpose", attn, perm=[0, 2, 1, 3]),
                    g.ints([1, n_tok, C]))  # (1, N, C)
        attn = g.linear(attn, w[f"{a}.projection_layer.weight"],
                        w.get(f"{a}.projection_layer.bias"), f"{a}.projection_layer")
        x = g.op("Add", x, g.op("Mul", attn, g.const(w[f"{p}.lambda_1"], f"{p}.lambda_1")))
        h = norm(x, f"{p}.layernorm_after")
        h = g.linear(h, w[f"{p}.mlp.fc1.weight"], w[f"{p}.mlp.fc1.bias"], f"{p}.mlp.fc1")
        h = g.linear(g.gelu(h), w[f"{p}.mlp.fc2.weight"], w[f"{p}.mlp.fc2.bias"], f"{p}.mlp.fc2")
        x = g.op("Add", x, g.op("Mul", h, g.const(w[f"{p}.lambda_2"], f"{p}.lambda_2")))
    if spec.final_layernorm:
        x = g.layer_norm(x, w["vit.layernorm.weight"], w["vit.layernorm.bias"], spec.eps,
                         "vit.layernorm")

    # drop cls, pixel shuffle (0.5): (grid, grid, C) -> (grid/2, grid/2, 4C)
    x = g.op("Slice", x, g.ints([1]), g.ints([n_tok]), g.ints([1]))  # (1, grid*grid, C)
    half = grid // 2
    x = g.op("Reshape", x, g.ints([1, grid, half, 2 * C]))  # (1, grid, grid/2, 2C)
    x = g.op("Transpose", x, perm=[0, 2, 1, 3])  # (1, grid/2, grid, 2C)
    x = g.op("Reshape", x, g.ints([1, half, half, 4 * C]))  # (1, grid/2, grid/2, 4C)
    if spec.ps_version == "v2":
        x = g.op("Transpose", x, perm=[0, 2, 1, 3])
    x = g.op("Reshape", x, g.ints([1, half * half, 4 * C]))  # (1, 256, 4C)

    # projector (mlp1): LayerNorm(eps 1e-5) -> Linear -> GELU -> Linear
    x = g.layer_norm(x, w["proj.layer_norm.weight"], w["proj.layer_norm.bias"], 1e-5,
                     "proj.layer_norm")
    x = g.linear(x, w["proj.linear_1.weight"], w["proj.linear_1.bias"], "proj.linear_1")
    x = g.linear(g.gelu(x), w["proj.linear_2.weight"], w["proj.linear_2.bias"], "proj.linear_2")
    g.add_output(x, "image_features", [1, half * half, text_hidden])
    return g.model()
