"""GPTQ-packed checkpoints (as GPTQModel / AutoGPTQ write them) -> MatMulNBits weights.

A quantised linear `X` of in_features K and out_features N is stored as
- `X.qweight` int32 (K * bits / 32, N): `32 / bits` values of one column packed along K, row
  k = 32 / bits * r + j in bits [bits * j, bits * (j + 1)) of word r;
- `X.qzeros` int32 (groups, N * bits / 32): the zero points packed the same way along N; the
  "gptq" (v1) checkpoint format stores zero - 1, "gptq_v2" the zero itself;
- `X.scales` float16 (groups, N);
- `X.g_idx` int32 (K,): the group of each input row; k // group_size unless act-order
  (`desc_act`), where the rows of a group are scattered;
- `X.bias` (N,) when the layer has one.
W[k, n] = scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n]). The settings are in config.json's
`quantization_config` (quant_method "gptq"; bits, group_size, desc_act, sym, checkpoint_format),
at the top level or in the text model's config.

`gptq_linear` repacks those integers into MatMulNBits' layout without going through float: the
4/8-bit codes and the zero points are moved bit for bit, the float16 scales widen exactly. An
act-order weight has its rows sorted by group, so every group is a contiguous block, and
carries that permutation (a Gather of the activations' columns in the graph: exact).
`pack_gptq` writes the format from a float weight (round-to-nearest per group, for tests).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from internvl_ros.core.errors import ConfigError, ModelDirError
from internvl_ros.export.quantize import QuantizedWeight, _pack_nibbles, pack_zero_points

FORMATS = ("gptq", "gptq_v2")


@dataclass(frozen=True)
class GPTQConfig:
    bits: int
    group_size: int  # -1: one group over all of K
    desc_act: bool
    sym: bool
    checkpoint_format: str = "gptq"
    lm_head: bool = False

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ConfigError(f"quantization_config.bits={self.bits}: only 4- and 8-bit GPTQ "
                              "checkpoints map to onnxruntime's MatMulNBits")
        if self.checkpoint_format not in FORMATS:
            raise ConfigError(f"quantization_config.checkpoint_format="
                              f"'{self.checkpoint_format}' is not one of {FORMATS}")
        if self.group_size != -1 and (self.group_size < 16
                                      or self.group_size & (self.group_size - 1)):
            raise ConfigError(f"quantization_config.group_size={self.group_size}: MatMulNBits "
                              "needs a power of two >= 16 (or -1)")


def read_gptq_config(hf_dir: Path) -> GPTQConfig | None:
    """The GPTQ settings of a checkpoint, None for a float checkpoint; other quantisation
    methods are a ConfigError."""
    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    q = cfg.get("quantization_config")
    for sub in ("llm_config", "text_config"):
        q = q or (cfg.get(sub) or {}).get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method", "gptq")
    if method != "gptq":
        raise ConfigError(f"{hf_dir}/config.json: quant_method '{method}' is not supported; "
                          "the exporter reads float checkpoints and GPTQ-packed ones")
    return GPTQConfig(bits=int(q.get("bits", 4)), group_size=int(q.get("group_size", 128)),
                      desc_act=bool(q.get("desc_act", False)), sym=bool(q.get("sym", True)),
                      checkpoint_format=q.get("checkpoint_format", "gptq"),
                      lm_head=bool(q.get("lm_head", False)))


def _unpack_words(words: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """int32 words -> the 32 / bits codes of each, spread along `axis` (low bits first)."""
    per = 32 // bits
    u = words.astype(np.uint32)
    shifts = (np.arange(per, dtype=np.uint32) * bits)
    codes = (u[..., None] >> shifts) & np.uint32((1 << bits) - 1)  # (..., per)
    codes = np.moveaxis(codes, -1, axis + 1)  # the codes of a word next to it along `axis`
    shape = list(words.shape)
    shape[axis] *= per
    return codes.reshape(shape).astype(np.uint8)


def _pack_words(codes: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Inverse of _unpack_words: codes along `axis` -> int32 words."""
    per = 32 // bits
    c = np.moveaxis(codes.astype(np.uint32), axis, -1)
    c = c.reshape(c.shape[:-1] + (c.shape[-1] // per, per))
    words = (c << (np.arange(per, dtype=np.uint32) * bits)).sum(-1, dtype=np.uint64)
    return np.ascontiguousarray(np.moveaxis(words.astype(np.uint32).view(np.int32), -1, axis))


def _block_size(group: int, K: int) -> int:
    """MatMulNBits block: the group, or (one group over K) the largest power of two <= 128
    dividing K; a block never spans two groups, so the scales repeat exactly."""
    if group != K:
        return group
    b = 128
    while b >= 16 and K % b:
        b //= 2
    if b < 16:
        raise ConfigError(f"group_size -1 over K={K}: no power-of-two block of 16..128 divides "
                          "K, so MatMulNBits cannot hold it")
    return b


def gptq_linear(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray,
                g_idx: np.ndarray | None, cfg: GPTQConfig, K: int, N: int,
                accuracy_level: int = 0, name: str = "") -> QuantizedWeight:
    """One GPTQ-packed linear as a QuantizedWeight for MatMulNBits (integers moved as-is)."""
    bits, per = cfg.bits, 32 // cfg.bits
    group = K if cfg.group_size == -1 else cfg.group_size
    groups = -(-K // group)
    want = {"qweight": (K // per, N), "qzeros": (groups, N // per), "scales": (groups, N)}
    for what, arr in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
        if tuple(arr.shape) != want[what]:
            raise ModelDirError(f"{name}.{what} has shape {tuple(arr.shape)}, expected "
                                f"{want[what]} for K={K}, N={N}, {bits}-bit, group {group}")
    if K % group:
        raise ModelDirError(f"{name}: K={K} is not a multiple of group_size {group}")
    q = _unpack_words(qweight, bits, axis=0)  # (K, N) codes
    zeros = _unpack_words(qzeros, bits, axis=1).astype(np.int32)  # (groups, N)
    if cfg.checkpoint_format == "gptq":
        zeros = zeros + 1  # v1 stores zero - 1
    if zeros.max() >= 1 << bits:
        raise ModelDirError(f"{name}: a zero point of {int(zeros.max())} does not fit in "
                            f"{bits} bits (a v1 checkpoint with zero 2^bits); re-save it in "
                            "checkpoint_format gptq_v2")
    natural = np.arange(K) // group
    perm = None
    if g_idx is not None and not np.array_equal(g_idx, natural):
        if not cfg.desc_act:
            raise ModelDirError(f"{name}.g_idx is not k // group_size although desc_act is "
                                "false in quantization_config; the checkpoint is inconsistent")
        perm = np.argsort(g_idx, kind="stable").astype(np.int64)  # rows grouped, in order
        if not np.array_equal(np.asarray(g_idx)[perm], natural):
            raise ModelDirError(f"{name}.g_idx does not give every group exactly "
                                f"{group} rows; act-order cannot be mapped to MatMulNBits")
        q = q[perm]
    bs = _block_size(group, K)
    rep = group // bs  # MatMulNBits blocks per GPTQ group
    k_blocks = K // bs
    codes = q.T.reshape(N, k_blocks, bs)  # (N, k_blocks, bs)
    packed = _pack_nibbles(codes) if bits == 4 else codes
    block_scales = np.repeat(scales.astype(np.float32).T, rep, axis=1)  # (N, k_blocks)
    block_zeros = np.repeat(zeros.T, rep, axis=1).astype(np.uint8)  # (N, k_blocks)
    return QuantizedWeight(np.ascontiguousarray(packed), np.ascontiguousarray(block_scales),
                           pack_zero_points(block_zeros, bits), K, N, bits, bs,
                           accuracy_level, perm)


def dequantize_gptq(qweight, qzeros, scales, g_idx, cfg: GPTQConfig) -> np.ndarray:
    """The float (K, N) weight a GPTQ linear stands for, straight from the format's formula
    (an independent reference for tests)."""
    bits = cfg.bits
    q = _unpack_words(qweight, bits, axis=0).astype(np.float32)  # (K, N)
    z = _unpack_words(qzeros, bits, axis=1).astype(np.float32)  # (groups, N)
    if cfg.checkpoint_format == "gptq":
        z += 1
    g = np.asarray(g_idx)
    return (q - z[g]) * scales.astype(np.float32)[g]  # (K, N)


def pack_gptq(weight: np.ndarray, cfg: GPTQConfig, perm: np.ndarray | None = None) -> dict:
    """Write a torch-layout (N, K) float weight in the GPTQ format (round-to-nearest per
    group; `perm` sets the act-order: the k-th row quantised is perm[k]). Returns
    {"qweight", "qzeros", "scales", "g_idx"} arrays as a GPTQ checkpoint stores them."""
    w = np.asarray(weight, np.float32).T  # (K, N)
    K, N = w.shape
    group = K if cfg.group_size == -1 else cfg.group_size
    order = np.arange(K) if perm is None else np.asarray(perm)
    g_idx = np.empty(K, np.int32)
    g_idx[order] = np.arange(K) // group  # row order[k] belongs to group k // group
    groups = K // group
    qmax = (1 << cfg.bits) - 1
    scales = np.empty((groups, N), np.float16)
    zeros = np.empty((groups, N), np.int32)
    for gi in range(groups):
        rows = w[g_idx == gi]  # (group, N)
        if cfg.sym:
            s = np.abs(rows).max(0) / ((qmax - 1) / 2)
            z = np.full(N, (qmax + 1) // 2)
        else:
            lo, hi = np.minimum(rows.min(0), 0), np.maximum(rows.max(0), 0)
            s = (hi - lo) / qmax
            z = np.clip(np.rint(-lo / np.where(s == 0, 1, s)), 1, qmax - 1)  # v1-safe zeros
        scales[gi] = np.where(s == 0, 1, s).astype(np.float16)
        zeros[gi] = z
    s32 = scales.astype(np.float32)[g_idx]  # (K, N)
    q = np.clip(np.rint(w / s32) + zeros[g_idx], 0, qmax).astype(np.uint8)  # (K, N)
    stored = zeros - 1 if cfg.checkpoint_format == "gptq" else zeros
    return {"qweight": _pack_words(q, cfg.bits, axis=0),
            "qzeros": _pack_words(stored, cfg.bits, axis=1),
            "scales": scales, "g_idx": g_idx}
