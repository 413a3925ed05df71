"""Exporter and tiny-model tests: the exported ONNX split must reproduce transformers exactly.

Tiny checkpoints come from `internvl_ros.export.testing.tiny_model_dirs` (built once, cached).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from internvl_ros.core.errors import ConfigError, ModelDirError
from internvl_ros.export import exporter
from internvl_ros.export.checkpoint import read_spec
from internvl_ros.export.exporter import export_model, layer_file, post_file, round_bf16, vit_file
from internvl_ros.export.testing import SPECS, _load_hf, hf_greedy, tiny_model_dirs
from internvl_ros.export.tiny import make_tiny_model, write_remote_layout

MASKED = -65536.0


# ---------------------------------------------------------------------------------------------
# helpers


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class OnnxModel:
    """The exported split, run the way the runtime does (embeddings -> layers -> post)."""

    def __init__(self, onnx_dir: Path):
        cfg = json.loads((onnx_dir / "config.json").read_text())
        self.n_layers = cfg["text_config"]["num_hidden_layers"]
        self.image_token_id = cfg["image_token_id"]
        self.layers = [session(onnx_dir / layer_file(i)) for i in range(self.n_layers)]
        self.post = session(onnx_dir / post_file())
        self.vit = session(onnx_dir / vit_file())
        self.embed = np.load(onnx_dir / exporter.EMBED_FILE)  # (vocab, hidden)
        self.kv_dim = self.layers[0].get_inputs()[0].shape[2]
        self.reset()

    def reset(self):
        empty = np.zeros((1, 0, self.kv_dim), np.float32)
        self.cache = [(empty, empty) for _ in range(self.n_layers)]

    def embed_prompt(self, ids, pixel_values=None) -> np.ndarray:
        x = self.embed[np.asarray(ids)][None].copy()  # (1, L, hidden)
        if pixel_values is not None:
            feats = np.concatenate([self.vit.run(None, {"image": tile[None]})[0][0]
                                    for tile in pixel_values])  # (tiles*256, hidden)
            x[0, np.asarray(ids) == self.image_token_id] = feats
        return x

    def step(self, x: np.ndarray) -> list[np.ndarray]:
        """Run (1, n, hidden) through all layers after the cached tokens; return each output."""
        n, past = x.shape[1], self.cache[0][0].shape[1]
        mask = np.zeros((1, n, past + n), np.float32)
        mask[0, :, past:] = np.triu(np.full((n, n), MASKED, np.float32), 1)
        indices = np.arange(past, past + n, dtype=np.uint32)[None]  # (1, n)
        outs = []
        for i, layer in enumerate(self.layers):
            k_cache, v_cache = self.cache[i]
            k_new, v_new, x = layer.run(None, {"K_cache": k_cache, "V_cache": v_cache,
                                               "indices": indices, "input": x, "mask": mask})
            self.cache[i] = (np.concatenate([k_cache, k_new], 1),
                             np.concatenate([v_cache, v_new], 1))
            outs.append(x)
        return outs

    def logits(self, x_last: np.ndarray) -> np.ndarray:
        return self.post.run(None, {"input": x_last})[0]  # (1, n, vocab)

    def greedy(self, ids, pixel_values=None, max_new_tokens=16, eos=()) -> list[int]:
        self.reset()
        x = self.embed_prompt(ids, pixel_values)
        new = []
        for _ in range(max_new_tokens):
            h = self.step(x)[-1]
            tok = int(np.argmax(self.logits(h[:, -1:])[0, -1]))
            new.append(tok)
            if tok in eos:
                break
            x = self.embed[[tok]][None]  # (1, 1, hidden)
        return new


def hf_layer_outputs(model, ids, pixel_values=None):
    """transformers forward with hooks on every decoder layer: (layer outputs, logits)."""
    captured = []
    hooks = [layer.register_forward_hook(
        lambda mod, args, out: captured.append((out[0] if isinstance(out, tuple) else out)
                                               .detach().numpy().copy()))
        for layer in model.model.language_model.layers]
    kwargs = {} if pixel_values is None else {"pixel_values": torch.from_numpy(pixel_values)}
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([list(ids)]), **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return captured, out.logits.numpy()


def assert_close(actual, expected, tol=2e-5, what=""):
    """max |a - e| <= tol * max(1, max |e|): float32 noise of the same computation."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = float(np.abs(actual - expected).max())
    bound = tol * max(1.0, float(np.abs(expected).max()))
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


def make_prompt(hf_dir: Path, question: str, n_tiles: int = 1) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    image = "<img>" + "<IMG_CONTEXT>" * (256 * n_tiles) + "</img>"
    text = f"<|im_start|>user\n{question}\n{image}<|im_end|>\n<|im_start|>assistant\n"
    return tok.encode(text).ids


def images(seed: int, n: int = 1) -> np.ndarray:
    """ImageNet-normalised-looking tiles: smooth colour fields plus noise. (n, 3, 448, 448)"""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:448, 0:448].astype(np.float32) / 448.0
    out = []
    for _ in range(n):
        a = rng.uniform(-2, 2, (3, 3)).astype(np.float32)
        base = a[:, 0, None, None] + a[:, 1, None, None] * xx + a[:, 2, None, None] * yy
        out.append(base + 0.3 * rng.standard_normal((3, 448, 448)).astype(np.float32))
    return np.stack(out).astype(np.float32)


@pytest.fixture(scope="module", params=sorted(SPECS))
def tiny(request):
    hf_dir, onnx_dir = tiny_model_dirs(request.param)
    return request.param, hf_dir, onnx_dir


@pytest.fixture(scope="module")
def tiny_a():
    return tiny_model_dirs("a")


# ---------------------------------------------------------------------------------------------
# the contract


def test_files_follow_the_model_dir_contract(tiny):
    spec, hf_dir, onnx_dir = tiny
    cfg = json.loads((hf_dir / "config.json").read_text())["text_config"]
    hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]
    kv_dim = cfg["num_key_value_heads"] * cfg["head_dim"]
    for i in range(cfg["num_hidden_layers"]):
        m = onnx.load(str(onnx_dir / layer_file(i)))
        ins = [(v.name, v.type.tensor_type.elem_type,
                [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
               for v in m.graph.input]
        assert [n for n, _, _ in ins] == ["K_cache", "V_cache", "indices", "input", "mask"]
        types = {n: t for n, t, _ in ins}
        assert types["indices"] == onnx.TensorProto.UINT32
        assert all(types[n] == onnx.TensorProto.FLOAT for n in ("K_cache", "V_cache", "input",
                                                                  "mask"))
        shapes = {n: s for n, _, s in ins}
        assert shapes["K_cache"][0] == 1 and isinstance(shapes["K_cache"][1], str)
        assert shapes["K_cache"][2] == kv_dim and shapes["input"][2] == hidden
        assert isinstance(shapes["input"][1], str) and isinstance(shapes["mask"][2], str)
        assert len(m.graph.output) == 3
    post = session(onnx_dir / post_file())
    assert [i.name for i in post.get_inputs()] == ["input"]
    assert post.get_outputs()[0].shape[2] == vocab
    vit = onnx.load(str(onnx_dir / vit_file()))
    assert [d.dim_value for d in vit.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 448, 448]
    assert vit.graph.input[0].name == "image"
    assert [d.dim_value for d in vit.graph.output[0].type.tensor_type.shape.dim] == [1, 256, hidden]
    assert not {"Resize", "Upsample"} & {n.op_type for n in vit.graph.node}
    embed = np.load(onnx_dir / exporter.EMBED_FILE)
    assert embed.dtype == np.float32 and embed.shape == (vocab, hidden)
    for name in ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", exporter.INFO_FILE):
        assert (onnx_dir / name).is_file(), name


# ---------------------------------------------------------------------------------------------
# numerics against transformers


def test_prefill_and_decode_match_transformers(tiny):
    spec, hf_dir, onnx_dir = tiny
    model, ox = _load_hf(str(hf_dir)), OnnxModel(onnx_dir)
    ids = make_prompt(hf_dir, "What is in front of the robot?")
    pv = images(seed=11)
    ref_layers, ref_logits = hf_layer_outputs(model, ids, pv)

    # prefill everything at once (past = 0)
    outs = ox.step(ox.embed_prompt(ids, pv))
    for i, (a, e) in enumerate(zip(outs, ref_layers, strict=True)):
        assert_close(a, e, what=f"spec {spec} prefill layer {i}")
    assert_close(ox.logits(outs[-1]), ref_logits, what=f"spec {spec} prefill logits")

    # one decode step with the cache (past = L, n = 1)
    tok = int(np.argmax(ref_logits[0, -1]))
    outs = ox.step(ox.embed[[tok]][None])
    ref_layers, ref_logits = hf_layer_outputs(model, ids + [tok], pv)
    for i, (a, e) in enumerate(zip(outs, ref_layers, strict=True)):
        assert_close(a, e[:, -1:], what=f"spec {spec} decode layer {i}")
    assert_close(ox.logits(outs[-1]), ref_logits[:, -1:], what=f"spec {spec} decode logits")


def test_chunked_prefill_equals_one_shot(tiny_a):
    hf_dir, onnx_dir = tiny_a
    ox = OnnxModel(onnx_dir)
    ids = make_prompt(hf_dir, "Describe the scene.")
    x = ox.embed_prompt(ids, images(seed=3))
    one_shot = ox.step(x)[-1]
    ox.reset()
    chunks = [ox.step(x[:, s:s + 128])[-1] for s in range(0, x.shape[1], 128)]
    assert len(chunks) >= 3
    assert_close(np.concatenate(chunks, 1), one_shot, what="chunked prefill")


def test_vit_matches_transformers(tiny):
    spec, hf_dir, onnx_dir = tiny
    model, vit = _load_hf(str(hf_dir)), session(onnx_dir / vit_file())
    pv = images(seed=5, n=2)
    with torch.no_grad():
        ref = model.get_image_features(torch.from_numpy(pv)).pooler_output.numpy()
    got = np.concatenate([vit.run(None, {"image": tile[None]})[0] for tile in pv])
    assert_close(got, ref, what=f"spec {spec} vit")
    assert np.abs(got[0] - got[1]).max() > 0.1  # different images, different features


def test_onnx_greedy_equals_hf_greedy_and_images_matter(tiny):
    spec, hf_dir, onnx_dir = tiny
    ox = OnnxModel(onnx_dir)
    eos = json.loads((hf_dir / "generation_config.json").read_text())["eos_token_id"]
    ids = make_prompt(hf_dir, "What colour is the box?", n_tiles=2)
    runs = []
    for seed in (21, 22):
        pv = images(seed=seed, n=2)
        ref = hf_greedy(hf_dir, ids, pv, max_new_tokens=12)
        assert 1 <= len(ref) <= 12 and (len(ref) == 12 or ref[-1] in eos)
        assert ox.greedy(ids, pv, max_new_tokens=12, eos=eos) == ref
        runs.append(ref)
    assert runs[0] != runs[1], f"spec {spec}: the image content must change the answer"


def test_tiny_logits_are_decisive(tiny_a):
    hf_dir, _ = tiny_a
    _, logits = hf_layer_outputs(_load_hf(str(hf_dir)), make_prompt(hf_dir, "Hello"),
                                 images(seed=1))
    top2 = np.sort(logits[0], axis=-1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]  # (L,)
    assert np.median(margin) > 1.0, f"median top-1 margin {np.median(margin):.3f} too small"


# ---------------------------------------------------------------------------------------------
# layouts, dtypes, determinism, errors


def _file_hashes(folder: Path, pattern: str = "*") -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.glob(pattern)) if p.is_file()}


def _write_bf16_safetensors(src: Path, dst: Path) -> None:
    """Re-save a float32 safetensors file with every tensor in BF16 (rounded by ml_dtypes)."""
    from safetensors.numpy import load_file

    header, blobs, offset = {}, [], 0
    for name, arr in sorted(load_file(str(src)).items()):
        raw = arr.astype(ml_dtypes.bfloat16).tobytes()
        header[name] = {"dtype": "BF16", "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    dst.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def test_remote_code_layout_exports_identically(tiny_a, tmp_path):
    hf_dir, onnx_dir = tiny_a
    remote = write_remote_layout(hf_dir, tmp_path / "remote")
    cfg = json.loads((remote / "config.json").read_text())
    assert "llm_config" in cfg and "text_config" not in cfg
    from safetensors import safe_open

    with safe_open(str(remote / "model.safetensors"), "np") as f:
        keys = set(f.keys())
    assert "vision_model.encoder.layers.0.attn.qkv.weight" in keys and "mlp1.1.weight" in keys
    assert not any(k.startswith(("vision_tower.", "multi_modal_projector.")) for k in keys)
    assert read_spec(remote).layout == "remote"

    out = export_model(remote, tmp_path / "onnx_remote")
    want = _file_hashes(onnx_dir, "*.onnx") | _file_hashes(onnx_dir, "*.npy")
    got = _file_hashes(out, "*.onnx") | _file_hashes(out, "*.npy")
    assert len(want) >= 4 and got == want

    # published checkpoints are bf16: a BF16 file exports like --dtype bfloat16 of the f32 one
    _write_bf16_safetensors(remote / "model.safetensors", remote / "model.safetensors")
    from_bf16 = export_model(remote, tmp_path / "from_bf16")
    rounded = export_model(hf_dir, tmp_path / "rounded", dtype="bfloat16")
    assert (_file_hashes(from_bf16, "*.onnx") | _file_hashes(from_bf16, "*.npy")
            == _file_hashes(rounded, "*.onnx") | _file_hashes(rounded, "*.npy"))


def test_tokenizer_json_is_converted_when_missing(tiny_a, tmp_path):
    """Checkpoints that ship only vocab.json + merges.txt still get a tokenizer.json."""
    from tokenizers import Tokenizer

    hf_dir, _ = tiny_a
    original = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    remote = write_remote_layout(hf_dir, tmp_path / "remote")
    (remote / "tokenizer.json").unlink()
    original.model.save(str(remote))  # vocab.json, merges.txt
    specials = {str(original.token_to_id(t)): {"content": t, "special": True}
                for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>",
                          "<IMG_CONTEXT>")}
    (remote / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>",
         "pad_token": "<|endoftext|>", "added_tokens_decoder": specials}))
    out = export_model(remote, tmp_path / "onnx")
    converted = Tokenizer.from_file(str(out / "tokenizer.json"))
    text = "<|im_start|>user\nIs the path clear?\n<img><IMG_CONTEXT></img><|im_end|>\n"
    assert converted.encode(text).ids == original.encode(text).ids


def test_bfloat16_export_via_cli(tiny_a, tmp_path):
    hf_dir, onnx_dir = tiny_a
    out = tmp_path / "bf16"
    assert exporter.main(["--hf-model", str(hf_dir), "--output", str(out),
                          "--dtype", "bfloat16", "-q"]) == 0
    assert json.loads((out / exporter.INFO_FILE).read_text())["dtype"] == "bfloat16"
    embed = np.load(out / exporter.EMBED_FILE)
    assert embed.dtype == np.float32 and not (embed.view(np.uint32) & 0xFFFF).any()
    layer = onnx.load(str(out / layer_file(0)))
    big = [onnx.numpy_helper.to_array(t) for t in layer.graph.initializer if t.dims
           and np.prod(t.dims) >= 64 and t.data_type == onnx.TensorProto.FLOAT]
    assert big and all(not (w.view(np.uint32) & 0xFFFF).any() for w in big)
    # bf16 weights: close to the float32 export, but not identical
    x = np.random.default_rng(0).standard_normal((1, 5, embed.shape[1])).astype(np.float32)
    bf16_layer = session(out / layer_file(0))
    empty = np.zeros((1, 0, bf16_layer.get_inputs()[0].shape[2]), np.float32)
    feeds = {"K_cache": empty, "V_cache": empty,
             "indices": np.arange(5, dtype=np.uint32)[None], "input": x,
             "mask": np.triu(np.full((5, 5), MASKED, np.float32), 1)[None]}
    a = bf16_layer.run(None, feeds)[2]
    b = session(onnx_dir / layer_file(0)).run(None, feeds)[2]
    assert 0 < np.abs(a - b).max() < 0.05 * np.abs(b).max()


def test_round_bf16_matches_ml_dtypes():
    x = np.random.default_rng(0).standard_normal(10000).astype(np.float32) * 100
    x[:4] = [0.0, -0.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8]  # ties round to even
    ref = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    assert np.array_equal(round_bf16(x).view(np.uint32), ref.view(np.uint32))


def test_tiny_builder_is_deterministic(tiny_a, tmp_path):
    hf_dir, _ = tiny_a
    rebuilt = make_tiny_model(tmp_path / "again", **SPECS["a"])
    assert _file_hashes(rebuilt) == _file_hashes(hf_dir)
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= set(_file_hashes(rebuilt))


def test_tiny_checkpoint_loads_in_transformers(tiny_a):
    from transformers import AutoTokenizer

    hf_dir, _ = tiny_a
    tok = AutoTokenizer.from_pretrained(hf_dir)
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert tok.convert_tokens_to_ids("<IMG_CONTEXT>") == cfg["image_token_id"]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    text = "The red robot picks up a small blue box."
    assert tok.decode(tok(text)["input_ids"]) == text
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "Hi\n"}, {"type": "image"}]}],
        add_generation_prompt=True, tokenize=False)
    assert prompt.count("<IMG_CONTEXT>") == 256 and prompt.endswith("<|im_start|>assistant\n")
    assert 1000 <= len(tok) <= 2100
    model = _load_hf(str(hf_dir))
    assert type(model).__name__ == "InternVLForConditionalGeneration"


def test_export_errors_are_clear(tmp_path, tiny_a):
    hf_dir, _ = tiny_a
    with pytest.raises(ModelDirError, match="config.json"):
        export_model(tmp_path, tmp_path / "out")
    bad = tmp_path / "qwen2"
    bad.mkdir()
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["text_config"]["model_type"] = "qwen2"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="not Qwen3"):
        export_model(bad, tmp_path / "out")
    assert exporter.main(["--hf-model", str(bad), "--output", str(tmp_path / "o"), "-q"]) == 2
