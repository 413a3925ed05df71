"""Model-dir discovery and validation: both layouts, explicit overrides, actionable errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from internvl_ros.core.errors import ModelDirError, ShapeMismatchError
from internvl_ros.core.modeldir import discover, load_config, load_model_dir

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 32, 4, 4, 2, 8


def remote_config(layers=LAYERS, hidden=HIDDEN):
    return {"architectures": ["InternVLChatModel"], "downsample_ratio": 0.5,
            "force_image_size": 448, "template": "internvl2_5",
            "llm_config": {"hidden_size": hidden, "num_hidden_layers": layers,
                           "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
                           "head_dim": HEAD_DIM, "vocab_size": 100, "eos_token_id": 7},
            "vision_config": {"image_size": 448, "patch_size": 14}}


def native_config(layers=LAYERS, hidden=HIDDEN):
    return {"architectures": ["InternVLForConditionalGeneration"], "downsample_ratio": 0.5,
            "text_config": {"hidden_size": hidden, "num_hidden_layers": layers,
                            "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
                            "head_dim": HEAD_DIM, "vocab_size": 100},
            "vision_config": {"image_size": [448, 448], "patch_size": [14, 14]}}


TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]


def write_tokenizer(path: Path, tokens=TOKENS) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens(list(tokens))
    tok.save(str(path))


def write_hf(folder: Path, config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    write_tokenizer(folder / "tokenizer.json")


def write_models(folder: Path, ext: str, layers=LAYERS, skip=(), hidden=HIDDEN, prefix="qwen3"):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(layers):
        if i not in skip:
            (folder / f"{prefix}_p128_l{i}_together{ext}").write_bytes(b"x")
    (folder / f"{prefix}_post{ext}").write_bytes(b"x")
    np.save(folder / "model.embed_tokens.weight.npy", np.zeros((100, hidden), np.float32))


def axera_layout(root: Path, layers=LAYERS, skip=(), config=None, hidden=HIDDEN) -> Path:
    """The published AXERA-TECH download, as downloaded."""
    write_hf(root / "InternVL3_5-1B_GPTQ_INT4", config or remote_config(layers))
    write_models(root / "InternVL3_5-1B_GPTQ_INT4_axmodel", ".axmodel", layers, skip, hidden)
    (root / "vit-models").mkdir()
    (root / "vit-models" / "internvl_vit_model_1x3x448x448.axmodel").write_bytes(b"x")
    (root / "README.md").write_text("model card")
    return root


def host_layout(root: Path, layers=LAYERS, config=None) -> Path:
    write_hf(root, config or native_config(layers))
    write_models(root, ".onnx", layers)
    (root / "internvl_vit_model_1x3x448x448.onnx").write_bytes(b"x")
    return root


def test_axera_download_is_discovered_without_rearranging(tmp_path):
    root = axera_layout(tmp_path)
    md = load_model_dir(root, "axengine")
    p = md.paths
    assert p.config == root / "InternVL3_5-1B_GPTQ_INT4" / "config.json"
    assert p.tokenizer == root / "InternVL3_5-1B_GPTQ_INT4" / "tokenizer.json"
    ax = root / "InternVL3_5-1B_GPTQ_INT4_axmodel"
    assert p.layers == tuple(ax / f"qwen3_p128_l{i}_together.axmodel" for i in range(LAYERS))
    assert p.post == ax / "qwen3_post.axmodel"
    assert p.embeddings == ax / "model.embed_tokens.weight.npy"
    assert p.vit == root / "vit-models" / "internvl_vit_model_1x3x448x448.axmodel"
    assert md.config.layout == "remote" and md.config.kv_dim == KV_HEADS * HEAD_DIM
    assert md.config.num_image_token == 256 and md.config.eos_token_ids == (7,)


def test_host_layout_flat(tmp_path):
    root = host_layout(tmp_path)
    md = load_model_dir(root, "onnxruntime")
    assert md.paths.layers[0] == root / "qwen3_p128_l0_together.onnx"
    assert md.paths.vit == root / "internvl_vit_model_1x3x448x448.onnx"
    assert md.config.layout == "native" and md.config.image_size == 448
    assert md.embeddings_shape == (100, HIDDEN)


def test_layers_sorted_numerically_not_lexically(tmp_path):
    root = host_layout(tmp_path, layers=12, config=native_config(12))
    layers = load_model_dir(root).paths.layers
    assert [int(p.name.split("_l")[1].split("_")[0]) for p in layers] == list(range(12))


def test_missing_layer_is_named(tmp_path):
    root = axera_layout(tmp_path, layers=28, skip={13}, config=remote_config(28))
    with pytest.raises(ModelDirError) as e:
        load_model_dir(root, "axengine")
    msg = str(e.value)
    assert "qwen3_p128_l13_together.axmodel" in msg and "l0..l27" in msg
    assert "except l13" in msg


def test_layer_count_must_match_config(tmp_path):
    root = axera_layout(tmp_path, layers=3, config=remote_config(layers=28))
    with pytest.raises(ModelDirError) as e:
        load_model_dir(root, "axengine")
    msg = str(e.value)
    assert "3 decoder layer files" in msg and "llm_config.num_hidden_layers=28" in msg


def test_layer_count_native_config_field_named(tmp_path):
    root = host_layout(tmp_path, layers=2, config=native_config(layers=5))
    with pytest.raises(ModelDirError, match=r"text_config\.num_hidden_layers=5"):
        load_model_dir(root)


def test_embedding_hidden_size_mismatch(tmp_path):
    root = axera_layout(tmp_path, hidden=48)  # embeddings (100, 48), config hidden 32
    with pytest.raises(ShapeMismatchError) as e:
        load_model_dir(root, "axengine")
    msg = str(e.value)
    assert "model.embed_tokens.weight.npy" in msg and "48" in msg
    assert "llm_config.hidden_size=32" in msg


def test_wrong_backend_extension_says_which_backend(tmp_path):
    root = axera_layout(tmp_path)
    with pytest.raises(ModelDirError, match="--backend axengine"):
        load_model_dir(root, "onnxruntime")


def test_missing_files_are_named(tmp_path):
    root = host_layout(tmp_path)
    (root / "qwen3_post.onnx").unlink()
    with pytest.raises(ModelDirError, match="qwen3_post.onnx"):
        discover(root)
    host_layout(tmp_path)
    (root / "model.embed_tokens.weight.npy").unlink()
    with pytest.raises(ModelDirError, match="model.embed_tokens.weight.npy"):
        discover(root)
    with pytest.raises(ModelDirError, match="does not exist"):
        discover(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    write_hf(empty, native_config())
    with pytest.raises(ModelDirError, match="internvl-export"):
        discover(empty)


def test_config_errors(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ModelDirError, match="not valid JSON"):
        load_config(bad)
    bad.write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelDirError, match="neither 'text_config'"):
        load_config(bad)
    cfg = native_config()
    del cfg["text_config"]["hidden_size"]
    bad.write_text(json.dumps(cfg))
    with pytest.raises(ModelDirError, match=r"text_config\.hidden_size is missing"):
        load_config(bad)


def test_explicit_paths_override_discovery(tmp_path):
    root = host_layout(tmp_path / "model")
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copy(root / "qwen3_post.onnx", other / "custom_post.onnx")
    shutil.copy(root / "model.embed_tokens.weight.npy", other / "emb.npy")
    p = discover(root, post=other / "custom_post.onnx", embeddings=other / "emb.npy",
                 vit=root / "internvl_vit_model_1x3x448x448.onnx")
    assert p.post == other / "custom_post.onnx" and p.embeddings == other / "emb.npy"
    # every role explicit, no root at all
    p = discover(None, config=root, tokenizer=root / "tokenizer.json", layers=root,
                 post=root / "qwen3_post.onnx", embeddings=root / "model.embed_tokens.weight.npy")
    assert len(p.layers) == LAYERS and p.vit is None
    with pytest.raises(ModelDirError, match="does not exist"):
        discover(root, post=other / "missing.onnx")


def test_non_internvl_config_json_is_ignored(tmp_path):
    root = axera_layout(tmp_path)
    # a config.json of another kind beside the axmodels must not make discovery ambiguous
    (root / "InternVL3_5-1B_GPTQ_INT4_axmodel" / "config.json").write_text('{"x": 1}')
    assert load_model_dir(root, "axengine").paths.config.parent.name == "InternVL3_5-1B_GPTQ_INT4"


def test_two_models_in_one_folder_is_an_error(tmp_path):
    root = host_layout(tmp_path)
    write_models(root, ".onnx", prefix="other")
    (root / "other_post.onnx").unlink()
    (root / "qwen3_post.onnx").unlink()
    with pytest.raises(ModelDirError, match="several models"):
        discover(root)


def test_tokenizer_without_image_tokens(tmp_path):
    root = axera_layout(tmp_path)
    tok_path = root / "InternVL3_5-1B_GPTQ_INT4" / "tokenizer.json"
    for missing in ("<img>", "<IMG_CONTEXT>"):
        write_tokenizer(tok_path, [t for t in TOKENS if t != missing])
        with pytest.raises(ModelDirError) as e:
            load_model_dir(root, "axengine")
        assert f"no token '{missing}'" in str(e.value) and str(tok_path) in str(e.value)
    write_tokenizer(tok_path)
    md = load_model_dir(root, "axengine")
    assert md.tokenizer.img_context_id == TOKENS.index("<IMG_CONTEXT>")
    assert md.tokenizer.eos_token_ids[0] == TOKENS.index("<|im_end|>")
    assert 7 in md.tokenizer.eos_token_ids  # llm_config.eos_token_id
