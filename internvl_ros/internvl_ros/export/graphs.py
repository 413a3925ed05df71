"""Hand-built ONNX graphs for the split InternVL model (numpy weights in, onnx.ModelProto out).

Three graphs, matching docs/MODEL_DIR.md:
- `build_layer`: one Qwen3 decoder layer with an external KV cache (dynamic `past` and `n`).
- `build_post`: final RMSNorm + lm_head.
- `build_vit`: InternViT + pixel shuffle + mlp1 projector, one 448x448 tile (no resize inside).

The split graphs are float32 with opset 17 primitives (no contrib ops; onnxruntime >= 1.14)
unless a weight comes quantised (`QuantizedWeight`: a com.microsoft `MatMulNBits`).

- `build_host_lm`: the host layout (onnxruntime only): every decoder layer, the final norm and
  the lm_head in one graph, with com.microsoft `GroupQueryAttention` appending to a KV cache
  buffer shared between its past inputs and present outputs (docs/MODEL_DIR.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper

from internvl_ros.export.checkpoint import TextSpec, VisionSpec
from internvl_ros.export.quantize import MS_DOMAIN, QuantizedWeight, fuse_quantized, nbits_node

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

    def op(self, op_type: str, *inputs: str, n_out: int = 1, domain: str = "", **attrs):
        outs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.graph.node.append(helper.make_node(op_type, list(inputs), outs, domain=domain,
                                                **attrs))
        if domain:
            self.use_domain(domain)
        return outs[0] if n_out == 1 else outs

    def use_domain(self, domain: str) -> None:
        if not any(o.domain == domain for o in self.proto.opset_import):
            self.proto.opset_import.append(helper.make_opsetid(domain, 1))

    def add_input(self, name: str, elem_type: int, shape: list) -> str:
        self.graph.input.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def add_output(self, value: str, name: str, shape: list) -> None:
        self.graph.node.append(helper.make_node("Identity", [value], [name]))
        self.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))

    def model(self) -> onnx.ModelProto:
        return self.proto

    # -- layers -------------------------------------------------------------------------------

    def linear(self, x: str, weight, bias: np.ndarray | None, name: str) -> str:
        """x @ weight.T + bias, weight in torch (out, in) layout, or a QuantizedWeight (K = in,
        N = out: a MatMulNBits)."""
        if isinstance(weight, QuantizedWeight):
            y = self.fresh("matmulnbits")
            nodes, inits = nbits_node(weight, x, y, f"{name}.weight")
            self.graph.node.extend(nodes)
            self.graph.initializer.extend(inits)
            self.use_domain(MS_DOMAIN)
        else:
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


# ---------------------------------------------------------------------------------------------
# host layout: the whole language model in one graph

HOST_LAYOUT = "host_lm"  # metadata value of `internvl_ros.layout` in the host graph


def host_cache_names(i: int) -> tuple:
    """(past key, past value, present key, present value) tensor names of layer i."""
    return (f"past_key_values.{i}.key", f"past_key_values.{i}.value",
            f"present.{i}.key", f"present.{i}.value")


def _fuse(weights: list, biases: list):
    """One (weight, bias) for several linears on the same input (stacked outputs), or None."""
    if all(isinstance(w, QuantizedWeight) for w in weights):
        fused = fuse_quantized(weights)
        outs = [w.N for w in weights]
    elif not any(isinstance(w, QuantizedWeight) for w in weights):
        fused = np.concatenate(weights, axis=0)  # torch (out, in) layout: stack the rows
        outs = [w.shape[0] for w in weights]
    else:
        fused = None
    if fused is None:
        return None
    bias = None
    if any(b is not None for b in biases):
        bias = np.concatenate([np.zeros(n, np.float32) if b is None else b
                               for b, n in zip(biases, outs, strict=True)])
    return fused, bias, outs


def build_host_lm(spec: TextSpec, layer_weights, norm_weight: np.ndarray, lm_head,
                  max_positions: int) -> onnx.ModelProto:
    """All decoder layers + final norm + lm_head, for onnxruntime (docs/MODEL_DIR.md).

    `layer_weights(i)` returns layer i's tensors as `build_layer` takes them; a linear weight
    may be a QuantizedWeight. Inputs: `inputs_embeds` (1, n, hidden), `seqlens_k` (1,) int32
    = past + n - 1, `total_sequence_length` () int32 = past + n, and per layer
    `past_key_values.{i}.key|value` (1, kv_heads, max_ctx, head_dim). Outputs: `logits`
    (1, 1, vocab) of the last input row, and `present.{i}.key|value`, which the caller binds to
    the same buffers as the past inputs: GroupQueryAttention then writes the n new rows in
    place at rows [past, past + n) and reads rows [0, past + n).
    RoPE runs inside GroupQueryAttention (rotate-half, cos/sin tables of `max_positions` rows),
    after the per-head q/k RMSNorm, as in Qwen3.
    """
    H, KVH, D = spec.heads, spec.kv_heads, spec.head_dim
    g = Graph("qwen3_host_lm")
    g.use_domain(MS_DOMAIN)
    x = g.add_input("inputs_embeds", TensorProto.FLOAT, [1, "n", spec.hidden])
    seqlens = g.add_input("seqlens_k", TensorProto.INT32, [1])
    total = g.add_input("total_sequence_length", TensorProto.INT32, [])
    angles = np.arange(max_positions, dtype=np.float64)[:, None] \
        * rope_inv_freq(D, spec.rope_theta).astype(np.float64)[None]  # (max_positions, D/2)
    cos = g.const(np.cos(angles).astype(np.float32), "rope.cos_cache")
    sin = g.const(np.sin(angles).astype(np.float32), "rope.sin_cache")
    eps = float(spec.rms_eps)

    def rms(t: str, weight: np.ndarray, name: str) -> str:
        return g.op("SimplifiedLayerNormalization", t, g.const(weight, f"{name}.weight"),
                    axis=-1, epsilon=eps, stash_type=1)

    def linears(t: str, ws: list, bs: list, names: list) -> list:
        fused = _fuse(ws, bs)
        if fused is None:
            return [g.linear(t, w, b, n) for w, b, n in zip(ws, bs, names, strict=True)]
        w, b, outs = fused
        y = g.linear(t, w, b, "+".join(names))
        return g.op("Split", y, g.ints(outs), axis=-1, n_out=len(outs))

    for i in range(spec.num_layers):
        w = layer_weights(i)
        p = f"layers.{i}"
        past_k, past_v, present_k, present_v = host_cache_names(i)
        for name in (past_k, past_v):
            g.add_input(name, TensorProto.FLOAT, [1, KVH, "max_ctx", D])
        h = rms(x, w["input_layernorm.weight"], f"{p}.input_layernorm")  # (1, n, hidden)
        a = f"{p}.self_attn"
        q, k, v = linears(h, [w[f"self_attn.{n}_proj.weight"] for n in "qkv"],
                          [w.get(f"self_attn.{n}_proj.bias") for n in "qkv"],
                          [f"{a}.{n}_proj" for n in "qkv"])  # (1, n, H*D), (1, n, KVH*D) x 2
        q = rms(g.op("Reshape", q, g.ints([0, 0, H, D])), w["self_attn.q_norm.weight"],
                f"{a}.q_norm")  # (1, n, H, D)
        k = rms(g.op("Reshape", k, g.ints([0, 0, KVH, D])), w["self_attn.k_norm.weight"],
                f"{a}.k_norm")  # (1, n, KVH, D)
        q = g.op("Reshape", q, g.ints([0, 0, H * D]))  # (1, n, H*D)
        k = g.op("Reshape", k, g.ints([0, 0, KVH * D]))  # (1, n, KVH*D)
        attn = g.fresh("gqa")  # (1, n, H*D); the presents are graph outputs by name
        g.graph.node.append(helper.make_node(
            "GroupQueryAttention", [q, k, v, past_k, past_v, seqlens, total, cos, sin],
            [attn, present_k, present_v], domain=MS_DOMAIN, num_heads=H, kv_num_heads=KVH,
            do_rotary=1, rotary_interleaved=0))
        for name in (present_k, present_v):
            g.graph.output.append(helper.make_tensor_value_info(
                name, TensorProto.FLOAT, [1, KVH, "max_ctx", D]))
        attn = g.linear(attn, w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias"),
                        f"{a}.o_proj")  # (1, n, hidden)
        x = g.op("Add", x, attn)
        h = rms(x, w["post_attention_layernorm.weight"], f"{p}.post_attention_layernorm")
        gate, up = linears(h, [w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"]],
                           [None, None], [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"])
        act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)  # (1, n, inter)
        x = g.op("Add", x, g.linear(act, w["mlp.down_proj.weight"], None, f"{p}.mlp.down_proj"))

    last = g.op("Slice", x, g.ints([-1]), g.ints([np.iinfo(np.int64).max]),
                g.ints([1]))  # (1, 1, hidden)
    logits = g.linear(rms(last, norm_weight, "norm"), lm_head, None, "lm_head")  # (1, 1, vocab)
    g.add_output(logits, "logits", [1, 1, spec.vocab])
    for key, value in (("internvl_ros.layout", HOST_LAYOUT),
                       ("internvl_ros.max_positions", str(int(max_positions)))):
        entry = g.proto.metadata_props.add()
        entry.key, entry.value = key, value
    return g.model()
