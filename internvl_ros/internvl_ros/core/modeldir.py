"""Model-directory discovery and validation (docs/MODEL_DIR.md).

A model dir has six roles: HF config, tokenizer, decoder layers, post, ViT and token embeddings.
Each role is discovered below a root folder (the root itself and its immediate subfolders), so
both our flat host layout and the published AXERA-TECH download work without rearranging.
An explicit path for a role overrides discovery.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np

from .errors import ModelDirError, ShapeMismatchError

PathLike = Union[str, Path]  # noqa: UP007 (a runtime alias)

#: file extension of the per-role model files, by backend
BACKEND_EXTENSIONS = {"onnxruntime": ".onnx", "axengine": ".axmodel"}

EMBEDDINGS_NAME = "model.embed_tokens.weight.npy"
LAYER_RE = re.compile(
    r"^(?P<prefix>.+)_p(?P<chunk>\d+)_l(?P<index>\d+)_together\.(?P<ext>onnx|axmodel)$")
POST_RE = re.compile(r"^(?P<prefix>.+)_post\.(?P<ext>onnx|axmodel)$")
#: the host layout (onnxruntime only): the whole language model in one graph
HOST_LM_RE = re.compile(r"^(?P<prefix>.+)_host_lm\.onnx$")


@dataclass(frozen=True)
class ModelConfig:
    """The fields of config.json the runtime needs (native or remote-code InternVL layout)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int | None
    max_position_embeddings: int | None
    image_size: int
    patch_size: int
    downsample_ratio: float
    eos_token_ids: tuple = ()
    layout: str = "native"  # "native" (text_config) or "remote" (llm_config)
    text_field: str = "text_config"  # where the LLM fields were read, for error messages

    def __post_init__(self):
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "image_size", "patch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ModelDirError(f"config.json: {name}={value!r} must be a positive integer")
        if not 0 < self.downsample_ratio <= 1:
            raise ModelDirError(
                f"config.json: downsample_ratio={self.downsample_ratio!r} must be in (0, 1]")

    @property
    def kv_dim(self) -> int:
        """Width of one K or V cache row: num_key_value_heads * head_dim."""
        return self.num_key_value_heads * self.head_dim

    @property
    def num_image_token(self) -> int:
        """LLM tokens per 448x448 tile after pixel shuffle (256 for InternVL3.5)."""
        side = self.image_size // self.patch_size
        return int(side * side * self.downsample_ratio ** 2)


@dataclass(frozen=True)
class ModelPaths:
    """Resolved file of each role. `vit` may be None (text-only use).

    `layout` "split": `layers` + `post` (per-layer files, any backend); "host": `layers` is
    empty and `post` is the one host-layout graph (`<prefix>_host_lm.onnx`, all layers + final
    norm + lm_head, onnxruntime only)."""

    root: Path | None
    config: Path
    tokenizer: Path  # tokenizer.json, or the folder holding vocab.json + merges.txt
    layers: tuple
    post: Path
    embeddings: Path
    vit: Path | None = None
    backend: str = "onnxruntime"
    prefix: str = ""
    layout: str = "split"

    @property
    def host_lm(self) -> Path | None:
        """The host-layout graph, or None for the split layout."""
        return self.post if self.layout == "host" else None

    @property
    def hf_dir(self) -> Path:
        """Folder of config.json (generation_config.json etc. are looked up there)."""
        return self.config.parent


@dataclass(frozen=True)
class ModelDir:
    """A discovered and validated model dir: paths plus parsed config."""

    paths: ModelPaths
    config: ModelConfig
    embeddings_shape: tuple = field(default=())
    tokenizer: object = None  # core.tokenizer.Tokenizer


# --------------------------------------------------------------------------------------------
# config.json


def _first(d: dict, *keys, default=None):
    for key in keys:
        if key in d and d[key] is not None:
            return d[key]
    return default


def _as_int_size(value, what: str, path: Path) -> int:
    """image_size / patch_size may be an int or a [h, w] list (square only)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ModelDirError(f"{path}: {what}={value!r} is not square; only square tiles "
                                "are supported")
        value = value[0]
    if not isinstance(value, int):
        raise ModelDirError(f"{path}: {what}={value!r} is not an integer")
    return value


def _eos_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def load_config(path: PathLike) -> ModelConfig:
    """Parse an InternVL config.json: native `text_config` or remote-code `llm_config`."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelDirError(f"config file {path} does not exist; point --model-dir at the "
                            "folder that holds the InternVL config.json") from None
    except (OSError, ValueError) as exc:
        raise ModelDirError(
            f"config file {path} is not valid JSON ({exc}); re-download it") from None
    if not isinstance(raw, dict):
        raise ModelDirError(f"config file {path} must hold a JSON object")

    if isinstance(raw.get("llm_config"), dict):
        text, text_field, layout = raw["llm_config"], "llm_config", "remote"
    elif isinstance(raw.get("text_config"), dict):
        text, text_field, layout = raw["text_config"], "text_config", "native"
    elif "hidden_size" in raw and "num_hidden_layers" in raw:
        text, text_field, layout = raw, "(top level)", "flat"
    else:
        raise ModelDirError(
            f"{path} has neither 'text_config' (native InternVL) nor 'llm_config' (remote-code "
            "InternVLChatModel); this is not an InternVL config.json")
    vision = raw.get("vision_config") if isinstance(raw.get("vision_config"), dict) else {}

    def need(key):
        if key not in text or text[key] is None:
            raise ModelDirError(f"{path}: field {text_field}.{key} is missing; the runtime needs "
                                "it to size the model. Use the config.json of the checkpoint")
        return text[key]

    hidden = int(need("hidden_size"))
    heads = int(need("num_attention_heads"))
    layers = int(need("num_hidden_layers"))
    kv_heads = int(_first(text, "num_key_value_heads", default=heads))
    head_dim = int(_first(text, "head_dim", default=hidden // heads))
    image_size = _as_int_size(_first(raw, "force_image_size", default=None)
                              or _first(vision, "image_size", default=448), "image_size", path)
    patch_size = _as_int_size(_first(vision, "patch_size", default=14), "patch_size", path)
    ratio = float(_first(raw, "downsample_ratio", default=0.5))
    eos = _eos_list(_first(text, "eos_token_id")) + _eos_list(_first(raw, "eos_token_id"))
    return ModelConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=head_dim,
        vocab_size=_first(text, "vocab_size"),
        max_position_embeddings=_first(text, "max_position_embeddings"),
        image_size=image_size, patch_size=patch_size, downsample_ratio=ratio,
        eos_token_ids=tuple(dict.fromkeys(eos)), layout=layout, text_field=text_field,
    )


# --------------------------------------------------------------------------------------------
# discovery


def _search_dirs(root: Path) -> list:
    """The root first, then its immediate (non-hidden) subfolders, sorted by name."""
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [root] + subdirs


def _find_unique(dirs: Sequence[Path], match, role: str, hint: str) -> Path | None:
    """The single file matching `match` at the shallowest level; None when nothing matches."""
    root_hits = [p for p in sorted(dirs[0].iterdir()) if p.is_file() and match(p.name)]
    if len(root_hits) == 1:
        return root_hits[0]
    hits = root_hits
    if not hits:
        hits = [p for d in dirs[1:] for p in sorted(d.iterdir()) if p.is_file() and match(p.name)]
    if len(hits) > 1:
        listed = ", ".join(str(p) for p in hits)
        raise ModelDirError(f"several candidates for the {role}: {listed}; pass the one to use "
                            f"explicitly ({hint})")
    return hits[0] if hits else None


def _is_internvl_config(path: Path) -> bool:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and ("llm_config" in raw or "text_config" in raw)


def _find_config(dirs: Sequence[Path], root) -> Path:
    """The InternVL config.json, shallowest first; other JSON named config.json is ignored."""
    levels = [[dirs[0] / "config.json"], [d / "config.json" for d in dirs[1:]]]
    for level in levels:
        hits = [p for p in level if p.is_file() and _is_internvl_config(p)]
        if len(hits) > 1:  # prefer the one with a tokenizer beside it
            with_tok = [p for p in hits if (p.parent / "tokenizer.json").is_file()
                        or (p.parent / "vocab.json").is_file()]
            hits = with_tok if len(with_tok) == 1 else hits
        if len(hits) > 1:
            raise ModelDirError(f"several InternVL config.json files: {', '.join(map(str, hits))}"
                                "; pass the one to use explicitly (config=...)")
        if hits:
            return hits[0]
    if any((d / "config.json").is_file() for d in dirs):
        raise ModelDirError(f"config.json below {root} is not an InternVL config (no "
                            "'text_config' or 'llm_config'); point at the InternVL checkpoint")
    raise ModelDirError(f"no config.json in {root} or its subfolders; the HF folder of the "
                        "checkpoint (config.json, tokenizer.json) must be there")


def _layer_files(folder: Path, ext: str) -> dict:
    """{(prefix, chunk): {index: path}} of the layer files of one extension in `folder`."""
    groups: dict = {}
    for p in folder.iterdir():
        m = LAYER_RE.match(p.name)
        if m and p.is_file() and "." + m.group("ext") == ext:
            key = (m.group("prefix"), int(m.group("chunk")))
            groups.setdefault(key, {})[int(m.group("index"))] = p
    return groups


def _pick_layer_group(folder: Path, ext: str) -> tuple:
    groups = _layer_files(folder, ext)
    if len(groups) > 1:
        with_post = {k: v for k, v in groups.items() if (folder / f"{k[0]}_post{ext}").exists()}
        if len(with_post) == 1:
            groups = with_post
        else:
            names = ", ".join(f"{p}_p{c}_l*_together{ext}" for p, c in sorted(groups))
            raise ModelDirError(f"{folder} holds layer files of several models ({names}); "
                                "keep one model per folder or pass the layer files explicitly")
    (prefix, _chunk), files = next(iter(groups.items()))
    return prefix, files


def _check_layer_indices(files: dict, folder: Path, prefix: str, chunk_name: str, ext: str):
    n = max(files) + 1
    missing = [i for i in range(n) if i not in files]
    if missing:
        names = ", ".join(f"{prefix}_{chunk_name}_l{i}_together{ext}" for i in missing)
        raise ModelDirError(
            f"missing decoder layer file(s) {names} in {folder}: found layers l0..l{n - 1} "
            f"except {', '.join(f'l{i}' for i in missing)}. The download or export is "
            "incomplete; fetch or re-export the missing files")
    return [files[i] for i in range(n)]


def _resolve_layers(layers, dirs, ext: str, backend: str, root) -> tuple:
    """Layer file list and prefix, from an explicit list/folder or by discovery."""
    if layers is not None and not isinstance(layers, (str, Path)):
        paths = [Path(p) for p in layers]
        for p in paths:
            if not p.is_file():
                raise ModelDirError(f"layer file {p} does not exist")
        m = LAYER_RE.match(paths[0].name) if paths else None
        return tuple(paths), (m.group("prefix") if m else "")
    if layers is not None:
        folders = [Path(layers)]
        if not folders[0].is_dir():
            raise ModelDirError(f"layers folder {layers} does not exist")
    else:
        folders = [d for d in dirs if _layer_files(d, ext)]
    if not folders:
        other = ".axmodel" if ext == ".onnx" else ".onnx"
        if any(_layer_files(d, other) for d in dirs):
            want = "axengine" if other == ".axmodel" else "onnxruntime"
            raise ModelDirError(
                f"{root} holds *{other} layer files but backend '{backend}' needs *{ext}; "
                f"use --backend {want}, or export the model for this backend")
        raise ModelDirError(
            f"no decoder layer files (<prefix>_p128_l<i>_together{ext}) in {root} or its "
            "subfolders; run internvl-export (host) or point --model-dir at the root of the "
            "AXERA-TECH download (NPU)")
    if len(folders) > 1:
        listed = ", ".join(map(str, folders))
        raise ModelDirError(f"decoder layer files in several folders ({listed}); pass the layers "
                            "folder explicitly")
    folder = folders[0]
    prefix, files = _pick_layer_group(folder, ext)
    chunk = LAYER_RE.match(next(iter(files.values())).name).group("chunk")
    return tuple(_check_layer_indices(files, folder, prefix, f"p{chunk}", ext)), prefix


def _explicit_file(value, role: str) -> Path:
    p = Path(value)
    if not p.is_file():
        raise ModelDirError(f"{role} file {p} does not exist; check the path you passed")
    return p


def discover(
    root: PathLike | None = None,
    backend: str = "onnxruntime",
    *,
    config: PathLike | None = None,
    tokenizer: PathLike | None = None,
    layers=None,
    post: PathLike | None = None,
    vit: PathLike | None = None,
    embeddings: PathLike | None = None,
) -> ModelPaths:
    """Find every role's file below `root`; explicit paths override discovery.

    `config`/`tokenizer` may be files or folders; `layers` a folder or a list of files.
    """
    if backend not in BACKEND_EXTENSIONS:
        raise ModelDirError(f"unknown backend '{backend}'; use one of "
                            f"{', '.join(BACKEND_EXTENSIONS)}")
    ext = BACKEND_EXTENSIONS[backend]
    dirs: list = []
    if root is not None:
        root = Path(root)
        if not root.is_dir():
            raise ModelDirError(f"model dir {root} does not exist or is not a folder")
        dirs = _search_dirs(root)
    elif None in (config, tokenizer, layers, post, embeddings):
        raise ModelDirError("no model dir given: pass --model-dir, or every role explicitly")

    def find(name_match, role, hint):
        if not dirs:
            return None
        return _find_unique(dirs, name_match, role, hint)

    # config.json
    if config is not None:
        config_path = Path(config)
        if config_path.is_dir():
            config_path = config_path / "config.json"
        config_path = _explicit_file(config_path, "config")
    else:
        config_path = _find_config(dirs, root)

    # tokenizer: tokenizer.json, else a folder with vocab.json + merges.txt
    if tokenizer is not None:
        tok_path = Path(tokenizer)
        if tok_path.is_dir() and (tok_path / "tokenizer.json").is_file():
            tok_path = tok_path / "tokenizer.json"
        if not tok_path.exists():
            raise ModelDirError(f"tokenizer {tok_path} does not exist")
    else:
        tok_path = config_path.parent / "tokenizer.json"
        if not tok_path.is_file():
            tok_path = find(lambda n: n == "tokenizer.json", "tokenizer.json", "tokenizer=...")
        if tok_path is None:
            if (config_path.parent / "vocab.json").is_file():
                tok_path = config_path.parent
            else:
                raise ModelDirError(
                    f"no tokenizer.json (or vocab.json + merges.txt) next to {config_path} or "
                    f"in {root}; copy the tokenizer files of the checkpoint there")

    host = None
    if backend == "onnxruntime" and layers is None and post is None:
        host = find(lambda n: bool(HOST_LM_RE.match(n)), "host-layout model (*_host_lm.onnx)",
                    "layers=... or post=...")
    if host is not None:
        if _layer_files(host.parent, ext):
            raise ModelDirError(
                f"{host.parent} holds both a host-layout model ({host.name}) and per-layer "
                "files; keep one layout per folder (internvl-export removes the other layout "
                "when it writes into a folder)")
        layer_paths, prefix = (), HOST_LM_RE.match(host.name).group("prefix")
        layer_dir = host.parent
    else:
        layer_paths, prefix = _resolve_layers(layers, dirs, ext, backend, root)
        layer_dir = layer_paths[0].parent

    def beside_layers(explicit, role, name, name_match, what, missing):
        """The explicit file, else `name` next to the layers, else a unique match below root."""
        if explicit is not None:
            return _explicit_file(explicit, role)
        path = layer_dir / name
        if not path.is_file():
            path = find(name_match, what, f"{role}=...")
        if path is None:
            raise ModelDirError(missing)
        return path

    post_path = host or beside_layers(
        post, "post", f"{prefix}_post{ext}",
        lambda n: bool(POST_RE.match(n)) and n.endswith(ext), f"post model (*_post{ext})",
        f"no post model ({prefix}_post{ext}: final norm + lm_head) in {layer_dir}; "
        "the download or export is incomplete")
    emb_path = beside_layers(
        embeddings, "embeddings", EMBEDDINGS_NAME, lambda n: n == EMBEDDINGS_NAME,
        "token embeddings",
        f"no token embeddings ({EMBEDDINGS_NAME}) in {layer_dir} or below {root}; "
        "the download or export is incomplete")

    # vit (optional: text-only use works without it)
    if vit is not None:
        vit_path = _explicit_file(vit, "vit")
    else:
        vit_path = find(lambda n: "vit" in n.lower() and n.endswith(ext),
                        f"ViT model (*vit*{ext})", "vit=...")

    return ModelPaths(root=Path(root) if root is not None else None, config=config_path,
                      tokenizer=tok_path, layers=layer_paths, post=post_path,
                      embeddings=emb_path, vit=vit_path, backend=backend, prefix=prefix,
                      layout="host" if host is not None else "split")


def embeddings_shape(path: Path) -> tuple:
    """Shape of the embeddings .npy, read from its header (the matrix is memory-mapped)."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise ModelDirError(f"token embeddings {path} is not a readable .npy file ({exc}); "
                            "re-download or re-export it") from None
    return tuple(arr.shape)


def validate(paths: ModelPaths, config: ModelConfig) -> tuple:
    """File-level checks: layer count vs config, embeddings shape vs hidden size."""
    n = len(paths.layers)
    if paths.layout == "split" and n != config.num_hidden_layers:
        raise ModelDirError(
            f"{paths.layers[0].parent} has {n} decoder layer files (l0..l{n - 1}) but "
            f"{paths.config} says {config.text_field}.num_hidden_layers="
            f"{config.num_hidden_layers}; the layer files and config.json belong to different "
            "models (or the download is incomplete)")
    shape = embeddings_shape(paths.embeddings)
    if len(shape) != 2:
        raise ShapeMismatchError(f"token embeddings {paths.embeddings} has shape {shape}; "
                                 "expected (vocab, hidden). Re-export it")
    if shape[1] != config.hidden_size:
        raise ShapeMismatchError(
            f"token embeddings {paths.embeddings} has hidden size {shape[1]} (shape {shape}) but "
            f"{paths.config} says {config.text_field}.hidden_size={config.hidden_size}; the "
            "embeddings and config.json belong to different models")
    return shape


def load_model_dir(root: PathLike | None = None, backend: str = "onnxruntime",
                   **overrides) -> ModelDir:
    """Discover (see `discover`), parse config.json, validate the files, load the tokenizer
    (which must have InternVL's chat and image tokens)."""
    from .tokenizer import Tokenizer

    paths = discover(root, backend, **overrides)
    config = load_config(paths.config)
    shape = validate(paths, config)
    tokenizer = Tokenizer.from_path(paths.tokenizer, hf_dir=paths.hf_dir,
                                    extra_eos=config.eos_token_ids)
    return ModelDir(paths=paths, config=config, embeddings_shape=shape, tokenizer=tokenizer)
