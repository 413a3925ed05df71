"""Test fixtures: cached tiny InternVL checkpoints + their ONNX export, and a transformers oracle.

    from internvl_ros.export.testing import tiny_model_dirs, hf_greedy
    hf_dir, onnx_dir = tiny_model_dirs("a")

Builds happen once per (spec, source of the build modules, library versions) and are cached under
`<repo>/.cache/tiny-models/` (override with the env var INTERNVL_TEST_CACHE). Two pytest processes
may race: each builds into its own temporary folder and the first atomic rename wins.
The cache hit path imports neither torch nor transformers.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[3]
CACHE_ENV = "INTERNVL_TEST_CACHE"

# spec -> make_tiny_model arguments
SPECS: dict[str, dict] = {
    # GQA 2, layer-norm ViT: the InternVL3.5-1B shape family
    "a": dict(seed=0, layers=2, hidden=64, heads=4, kv_heads=2, vision_layers=2),
    # GQA 3, RMSNorm ViT with qk-norm (the InternViT-6B variant), other seed
    "b": dict(seed=1, layers=3, hidden=96, heads=6, kv_heads=2, vision_layers=1,
              vision_norm="rms_norm", vision_qk_norm=True),
}
_DONE_MARKER = "BUILD_OK"


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else REPO_ROOT / ".cache" / "tiny-models"


# The modules whose code decides the built files; add any new module the build imports.
# (Other modules of the package, e.g. quantize.py, don't invalidate the cache.)
BUILD_SOURCES = ("checkpoint.py", "corpus.py", "exporter.py", "graphs.py", "tiny.py",
                 "testing.py")


def _build_key(spec: str) -> str:
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in BUILD_SOURCES:
        h.update(name.encode() + b"\0" + (here / name).read_bytes() + b"\0")
    h.update(spec.encode() + json.dumps(SPECS[spec], sort_keys=True).encode())
    for dist in ("transformers", "tokenizers", "onnx", "numpy"):
        try:
            h.update(f"{dist}={metadata.version(dist)}".encode())
        except metadata.PackageNotFoundError:
            pass
    return h.hexdigest()[:16]


def tiny_model_dirs(spec: str = "a") -> tuple[Path, Path]:
    """Return `(hf_dir, onnx_dir)` of tiny model `spec` ("a" or "b"), building it on first use."""
    if spec not in SPECS:
        raise ValueError(f"unknown tiny model spec {spec!r}; known: {sorted(SPECS)}")
    root = cache_root()
    final = root / f"{spec}-{_build_key(spec)}"
    if (final / _DONE_MARKER).is_file():
        try:
            os.utime(final / _DONE_MARKER)  # mark as in use (see _prune)
        except OSError:
            pass
    else:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec}-building-", dir=root))
        try:
            from internvl_ros.export.exporter import export_model
            from internvl_ros.export.tiny import make_tiny_model

            make_tiny_model(tmp / "hf", **SPECS[spec])
            export_model(tmp / "hf", tmp / "onnx")
            (tmp / _DONE_MARKER).write_text("ok\n")
            try:
                os.rename(tmp, final)
            except OSError:  # another process won the race (or a stale partial folder exists)
                if not (final / _DONE_MARKER).is_file():
                    shutil.rmtree(final, ignore_errors=True)
                    os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _prune(root, spec, keep=final)
    return final / "hf", final / "onnx"


def _prune(root: Path, spec: str, keep: Path, max_idle_s: float = 3600.0) -> None:
    """Remove builds of `spec` (other sources) and abandoned build folders unused for an hour.

    Every `tiny_model_dirs` call touches its build's marker, so a build that another pytest
    process still uses is never removed.
    """
    now = time.time()
    for path in list(root.glob(f"{spec}-*")) + list(root.glob(f".{spec}-building-*")):
        if path == keep:
            continue
        marker = path / _DONE_MARKER
        try:
            last_used = (marker if marker.is_file() else path).stat().st_mtime
        except OSError:
            continue
        if now - last_used > max_idle_s:
            shutil.rmtree(path, ignore_errors=True)


@functools.lru_cache(maxsize=4)
def _load_hf(hf_dir: str):
    import transformers
    from transformers import InternVLForConditionalGeneration

    transformers.utils.logging.disable_progress_bar()
    return InternVLForConditionalGeneration.from_pretrained(
        hf_dir, dtype="float32", attn_implementation="eager").eval()


def _eos_ids(hf_dir: Path) -> list[int]:
    gen = hf_dir / "generation_config.json"
    eos = json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else None
    if eos is None:
        eos = json.loads((hf_dir / "config.json").read_text())["text_config"]["eos_token_id"]
    return [eos] if isinstance(eos, int) else list(eos)


def hf_greedy(hf_dir, input_ids, pixel_values=None, max_new_tokens: int = 32,
              eos_token_ids: list[int] | None = None) -> list[int]:
    """Greedy continuation of `input_ids` by transformers (float32): the new ids only.

    `pixel_values` is (n_tiles, 3, 448, 448) float32 (ImageNet-normalised), one tile per 256
    `<IMG_CONTEXT>` ids in the prompt. Stops only at an eos id (included as the last element)
    or after `max_new_tokens`. eos ids default to generation_config.json.

    For the cached tiny models, results are kept beside the build (`refs/`), so a leg of the
    tests without torch (the board leg, `make test-board`) reuses the references the default leg
    computed for the same inputs.
    """
    hf_dir = Path(hf_dir)
    eos = list(eos_token_ids) if eos_token_ids is not None else _eos_ids(hf_dir)
    pv = None if pixel_values is None else np.ascontiguousarray(pixel_values, dtype=np.float32)
    if not (hf_dir.parent / _DONE_MARKER).is_file():  # not a cached build: no cache
        return _hf_generate(hf_dir, input_ids, pv, max_new_tokens, eos)
    key = hashlib.sha256(json.dumps([list(map(int, input_ids)), int(max_new_tokens), eos,
                                     None if pv is None else list(pv.shape)]).encode())
    if pv is not None:
        key.update(pv.tobytes())
    ref = hf_dir.resolve().parent / "refs" / f"{key.hexdigest()[:24]}.json"
    if ref.is_file():
        return json.loads(ref.read_text())
    ids = _hf_generate(hf_dir, input_ids, pv, max_new_tokens, eos)
    ref.parent.mkdir(exist_ok=True)
    tmp = ref.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(ids))
    os.replace(tmp, ref)
    return ids


def _hf_generate(hf_dir: Path, input_ids, pv, max_new_tokens: int, eos: list[int]) -> list[int]:
    import torch
    from transformers import GenerationConfig

    model = _load_hf(str(hf_dir))
    ids = torch.tensor([list(map(int, input_ids))], dtype=torch.long)  # (1, L)
    config = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=int(max_new_tokens), min_new_tokens=0,
        eos_token_id=eos, pad_token_id=eos[0], repetition_penalty=1.0, use_cache=True,
    )
    kwargs = {}
    if pv is not None:
        kwargs["pixel_values"] = torch.from_numpy(pv)  # (n_tiles, 3, 448, 448)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             generation_config=config, **kwargs)
    return out[0, ids.shape[1]:].tolist()
