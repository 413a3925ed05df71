"""Read an InternVL checkpoint (native transformers or remote-code layout) with numpy only.

Weights are read straight from the safetensors files (no torch): F32, F16 and BF16 tensors
become float32 arrays. Keys of both layouts are mapped to one canonical naming:

- `lm.*`: native `language_model.model.*` (on disk) or `model.language_model.*` (in memory);
  remote `language_model.model.*`
- `lm_head.*`: `language_model.lm_head.*` or `lm_head.*`
- `vit.*`: native `vision_tower.*` (or `model.vision_tower.*`); remote `vision_model.*`, renamed
- `proj.*`: native `multi_modal_projector.*` (or with `model.`); remote `mlp1.0/1/3.*`

The vision names follow the native layout (`encoder.layer.{i}.attention.q_proj`, ...); the
remote fused `attn.qkv` matrix is split into q/k/v rows on read.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from internvl_ros.core.errors import ConfigError, ModelDirError

# ---------------------------------------------------------------------------------------------
# safetensors, numpy only


_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


@dataclass(frozen=True)
class _TensorRef:
    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    stop: int


def _read_safetensors_header(path: Path) -> dict[str, _TensorRef]:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ModelDirError(f"{path}: not a safetensors file (too short). Re-download it.")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ModelDirError(f"{path}: corrupt safetensors header ({e}). Re-download it.") from e
    base = 8 + n
    refs = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, stop = info["data_offsets"]
        refs[name] = _TensorRef(path, info["dtype"], tuple(info["shape"]), base + start,
                                base + stop)
    return refs


def _load_ref(ref: _TensorRef) -> np.ndarray:
    """Read one tensor as float32 (BF16 is widened exactly)."""
    if ref.dtype not in ("F64", "F32", "F16", "BF16"):
        raise ModelDirError(
            f"{ref.path}: tensor of dtype {ref.dtype} where a float weight was expected. "
            "Only float checkpoints and GPTQ-packed ones (quantization_config with "
            "quant_method 'gptq' in config.json) are supported."
        )
    count = int(np.prod(ref.shape, dtype=np.int64))
    raw = np.fromfile(ref.path, dtype=_ST_DTYPES[ref.dtype], count=count, offset=ref.start)
    if ref.dtype == "BF16":
        out = (raw.astype(np.uint32) << 16).view(np.float32)
    else:
        out = raw.astype(np.float32, copy=False)
    return out.reshape(ref.shape)


def _index_safetensors(model_dir: Path) -> dict[str, _TensorRef]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        paths = [model_dir / f for f in files]
    elif (model_dir / "model.safetensors").is_file():
        paths = [model_dir / "model.safetensors"]
    else:
        paths = sorted(model_dir.glob("*.safetensors"))
    if not paths:
        hint = " (found pytorch_model.bin: re-save it as safetensors)" if any(
            model_dir.glob("*.bin")) else ""
        raise ModelDirError(
            f"{model_dir}: no model.safetensors or model.safetensors.index.json{hint}. "
            "Point --hf-model at a transformers checkpoint folder."
        )
    refs: dict[str, _TensorRef] = {}
    for p in paths:
        if not p.is_file():
            raise ModelDirError(f"{p}: listed in the safetensors index but missing. Re-download.")
        refs.update(_read_safetensors_header(p))
    return refs


# ---------------------------------------------------------------------------------------------
# key mapping


_PREFIXES = [  # (source prefix, canonical prefix); first match wins
    ("model.language_model.", "lm."),
    ("language_model.model.", "lm."),
    ("language_model.lm_head.", "lm_head."),
    ("lm_head.", "lm_head."),
    ("model.vision_tower.", "vit."),
    ("vision_tower.", "vit."),
    ("vision_model.", "vit."),
    ("model.multi_modal_projector.", "proj."),
    ("multi_modal_projector.", "proj."),
    ("mlp1.0.", "proj.layer_norm."),
    ("mlp1.1.", "proj.linear_1."),
    ("mlp1.3.", "proj.linear_2."),
]

_REMOTE_VIT_RENAMES = [  # regex on the part after "vit."; remote-code InternViT -> native names
    (r"^embeddings\.class_embedding$", "embeddings.cls_token"),
    (r"^embeddings\.position_embedding$", "embeddings.position_embeddings"),
    (r"^embeddings\.patch_embedding\.", "embeddings.patch_embeddings.projection."),
    (r"^encoder\.layers\.", "encoder.layer."),
    (r"\.attn\.proj\.", ".attention.projection_layer."),
    (r"\.attn\.", ".attention."),
    (r"\.ls1$", ".lambda_1"),
    (r"\.ls2$", ".lambda_2"),
    (r"\.norm1\.", ".layernorm_before."),
    (r"\.norm2\.", ".layernorm_after."),
]


def canonical_name(key: str) -> str | None:
    """Map a checkpoint key of either layout to its canonical name (None: not a model weight)."""
    for src, dst in _PREFIXES:
        if key.startswith(src):
            rest = key[len(src):]
            if src == "vision_model.":
                for pattern, repl in _REMOTE_VIT_RENAMES:
                    rest = re.sub(pattern, repl, rest)
            return dst + rest
    return None


class Weights:
    """Lazy float32 access to the checkpoint tensors by canonical name."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        # canonical name -> (ref, row slice or None)
        self._map: dict[str, tuple[_TensorRef, slice | None]] = {}
        for key, ref in _index_safetensors(model_dir).items():
            name = canonical_name(key)
            if name is None:
                continue
            m = re.match(r"^(vit\.encoder\.layer\.\d+\.attention\.)qkv\.(weight|bias)$", name)
            if m:  # remote fused qkv: rows [q; k; v], each hidden_size long
                third = ref.shape[0] // 3
                for j, part in enumerate(("q_proj", "k_proj", "v_proj")):
                    self._map[f"{m.group(1)}{part}.{m.group(2)}"] = (
                        ref, slice(j * third, (j + 1) * third))
            else:
                self._map[name] = (ref, None)

    def __contains__(self, name: str) -> bool:
        return name in self._map

    def names(self) -> list[str]:
        return sorted(self._map)

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Return the float32 tensor `name`, checking its shape when `shape` is given."""
        if name not in self._map:
            raise ModelDirError(
                f"{self.model_dir}: weight '{name}' (canonical name) is missing from the "
                "safetensors files. Is this an InternVL checkpoint with a Qwen3 text model?"
            )
        ref, rows = self._map[name]
        arr = _load_ref(ref)
        if rows is not None:
            arr = arr[rows]
        if shape is not None and tuple(arr.shape) != tuple(shape):
            raise ModelDirError(
                f"{self.model_dir}: weight '{name}' has shape {tuple(arr.shape)}, the config "
                f"implies {tuple(shape)}. The config.json does not match the weights."
            )
        return np.ascontiguousarray(arr, dtype=np.float32)

    def shape(self, name: str) -> tuple[int, ...] | None:
        """Shape of `name` without reading it (None when missing)."""
        if name not in self._map:
            return None
        ref, rows = self._map[name]
        if rows is None:
            return ref.shape
        return (rows.stop - rows.start,) + tuple(ref.shape[1:])

    def get_raw(self, name: str) -> np.ndarray:
        """Tensor `name` in its stored dtype (the integers of a quantised checkpoint)."""
        if name not in self._map:
            raise ModelDirError(f"{self.model_dir}: tensor '{name}' (canonical name) is missing "
                                "from the safetensors files")
        ref, _ = self._map[name]
        count = int(np.prod(ref.shape, dtype=np.int64))
        raw = np.fromfile(ref.path, dtype=_ST_DTYPES[ref.dtype], count=count, offset=ref.start)
        return raw.reshape(ref.shape)

    def get_optional(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray | None:
        return self.get(name, shape) if name in self._map else None


# ---------------------------------------------------------------------------------------------
# config


@dataclass(frozen=True)
class TextSpec:
    """The Qwen3 decoder hyper-parameters the exporter needs."""

    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rms_eps: float
    rope_theta: float

    def __post_init__(self):
        for field in ("num_layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate",
                      "vocab"):
            if int(getattr(self, field)) <= 0:
                raise ConfigError(f"text config: {field} must be positive, got "
                                  f"{getattr(self, field)}. Fix config.json.")
        if self.heads % self.kv_heads:
            raise ConfigError(f"text config: num_attention_heads {self.heads} is not a multiple "
                              f"of num_key_value_heads {self.kv_heads}. Fix config.json.")
        if self.head_dim % 2:
            raise ConfigError(f"text config: head_dim {self.head_dim} must be even for RoPE.")

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


@dataclass(frozen=True)
class VisionSpec:
    """InternViT + pixel shuffle + projector hyper-parameters."""

    num_layers: int  # layers actually run (select_layer applied)
    hidden: int
    heads: int
    intermediate: int
    image_size: int
    patch_size: int
    norm_type: str  # "layer_norm" | "rms_norm"
    eps: float
    qk_norm: bool
    final_layernorm: bool  # native use_mean_pooling=False and the last layer is used
    downsample_ratio: float
    ps_version: str  # "v2" (InternVL2+); "v1" skips the last transpose
    hidden_act: str
    projector_act: str

    def __post_init__(self):
        if self.norm_type not in ("layer_norm", "rms_norm"):
            raise ConfigError(f"vision config: norm_type '{self.norm_type}' is not layer_norm or "
                              "rms_norm. Fix config.json.")
        if self.hidden % self.heads:
            raise ConfigError(f"vision config: hidden_size {self.hidden} is not a multiple of "
                              f"num_attention_heads {self.heads}.")
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision config: image_size {self.image_size} is not a multiple of "
                              f"patch_size {self.patch_size}.")
        side = self.image_size // self.patch_size
        if self.downsample_ratio != 0.5 or side % 2:
            raise ConfigError(f"config: downsample_ratio {self.downsample_ratio} with a "
                              f"{side}x{side} patch grid is not supported (need 0.5, even grid).")
        if self.ps_version not in ("v1", "v2"):
            raise ConfigError(f"config: ps_version '{self.ps_version}' is not v1 or v2.")
        for name in ("hidden_act", "projector_act"):
            if getattr(self, name) != "gelu":
                raise ConfigError(f"vision config: {name} '{getattr(self, name)}' is not "
                                  "supported by the exporter (only exact 'gelu').")
        if self.num_layers < 0:
            raise ConfigError(f"config: select_layer selects {self.num_layers} vision layers.")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Image tokens per tile after pixel shuffle (256 for 448/14/0.5)."""
        return (self.grid // 2) ** 2


@dataclass(frozen=True)
class ModelSpec:
    layout: str  # "native" | "remote"
    text: TextSpec
    vision: VisionSpec
    image_token_id: int | None


def _pair(v) -> int:
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise ConfigError(f"vision config: non-square size {v} is not supported.")
        return int(v[0])
    return int(v)


def _text_spec(tc: dict, where: str) -> TextSpec:
    mt = tc.get("model_type")
    archs = tc.get("architectures") or []
    if mt != "qwen3" and "Qwen3ForCausalLM" not in archs:
        raise ConfigError(
            f"{where}: text model type '{mt}' {archs} is not Qwen3. The exporter supports "
            "InternVL3.5 checkpoints with a Qwen3 language model."
        )
    if tc.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act '{tc['hidden_act']}' is not silu.")
    rope = tc.get("rope_parameters") or {}
    scaling = tc.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    if rope_type not in (None, "default"):
        raise ConfigError(f"{where}: rope type '{rope_type}' is not supported (only default RoPE).")
    theta = rope.get("rope_theta", tc.get("rope_theta", 10000.0))
    if tc.get("use_sliding_window"):
        raise ConfigError(f"{where}: use_sliding_window is true; sliding attention is not "
                          "supported by the exporter.")
    hidden, heads = int(tc["hidden_size"]), int(tc["num_attention_heads"])
    return TextSpec(
        num_layers=int(tc["num_hidden_layers"]),
        hidden=hidden,
        heads=heads,
        kv_heads=int(tc.get("num_key_value_heads") or heads),
        head_dim=int(tc.get("head_dim") or hidden // heads),
        intermediate=int(tc["intermediate_size"]),
        vocab=int(tc["vocab_size"]),
        rms_eps=float(tc.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
    )


def read_spec(model_dir: Path, weights: Weights | None = None) -> ModelSpec:
    """Parse `config.json` of a native or remote-code InternVL checkpoint."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelDirError(f"{path} is missing. Point --hf-model at a transformers checkpoint.")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise ModelDirError(f"{path}: not valid JSON ({e}).") from e
    if "llm_config" in cfg:
        layout, tc = "remote", cfg["llm_config"]
        vc = cfg.get("vision_config") or {}
        select = int(cfg.get("select_layer", -1))
        norm_type = vc.get("norm_type", "rms_norm")  # InternVisionConfig default
        qk_norm = bool(vc.get("qk_normalization", False))
        ps_version = cfg.get("ps_version", "v1")
        projector_act = "gelu"
        image_size = _pair(cfg.get("force_image_size") or vc.get("image_size", 448))
        image_token_id = None  # remote configs don't store it; the tokenizer knows
    elif "text_config" in cfg:
        layout, tc = "native", cfg["text_config"]
        vc = cfg.get("vision_config") or {}
        select = cfg.get("vision_feature_layer", -1)
        if not isinstance(select, int):
            raise ConfigError(f"{path}: vision_feature_layer {select} (a list) is not supported.")
        if cfg.get("vision_feature_select_strategy", "default") != "default":
            raise ConfigError(f"{path}: vision_feature_select_strategy must be 'default'.")
        norm_type = vc.get("norm_type", "layer_norm")
        qk_norm = bool(vc.get("use_qk_norm", False))
        ps_version = "v2"
        projector_act = cfg.get("projector_hidden_act", "gelu")
        image_size = _pair(vc.get("image_size", 448))
        image_token_id = cfg.get("image_token_id")
    else:
        raise ConfigError(
            f"{path}: neither 'text_config' (transformers InternVL) nor 'llm_config' "
            "(remote-code InternVLChatModel) found. Is this an InternVL checkpoint?"
        )
    text = _text_spec(tc, str(path))
    n_vit = int(vc.get("num_hidden_layers", 24))
    n_run = n_vit if select == -1 else (n_vit + 1 + select if select < 0 else select)
    final_ln = layout == "native" and select == -1 and not vc.get("use_mean_pooling", True)
    vision = VisionSpec(
        num_layers=n_run,
        hidden=int(vc.get("hidden_size", 1024)),
        heads=int(vc.get("num_attention_heads", 16)),
        intermediate=int(vc.get("intermediate_size", 4096)),
        image_size=image_size,
        patch_size=_pair(vc.get("patch_size", 14)),
        norm_type=norm_type,
        eps=float(vc.get("layer_norm_eps", 1e-6)),
        qk_norm=qk_norm,
        final_layernorm=final_ln,
        downsample_ratio=float(cfg.get("downsample_ratio", 0.5)),
        ps_version=ps_version,
        hidden_act=vc.get("hidden_act", "gelu"),
        projector_act=projector_act,
    )
    return ModelSpec(layout=layout, text=text, vision=vision, image_token_id=image_token_id)
