"""Build a tiny random InternVL checkpoint (Qwen3 text model) for tests and demos.

    internvl-make-tiny-model --output DIR [--seed N] [--layers N] [--hidden N] [--heads N]
                             [--kv-heads N] [--vision-layers N] [--export DIR]

The checkpoint is a real transformers `InternVLForConditionalGeneration` (native layout, image
size 448, patch 14, downsample 0.5 -> 256 tokens per tile) with a byte-level BPE tokenizer trained
here on a built-in English corpus. Same arguments -> byte-identical files.

Random weights are scaled so that greedy decoding is robust across implementations: logits have
a large spread (top-1 margins far above float32 noise), and the projector output is calibrated to
the norm of the token embeddings, so the image content changes what the model says.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

IMAGE_SIZE = 448
PATCH_SIZE = 14
IMAGE_TOKENS = 256
BPE_VOCAB = 1500
LOGIT_STD = 16.0  # std of the logits of a random hidden state: decisive greedy choices
QUIET_ROW_SCALE = 0.05  # lm_head rows of tokens the tiny model should (almost) never say
SPECIAL_TOKENS = (  # appended after the BPE vocabulary, in Qwen/InternVL order
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
    "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
)
CHAT_TEMPLATE = (  # Qwen ChatML; an image part becomes <img> + 256 x <IMG_CONTEXT> + </img>\n
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}"
    "{{- '<img>' + '<IMG_CONTEXT>' * " + str(IMAGE_TOKENS) + " + '</img>\\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def build_tokenizer(vocab_size: int = BPE_VOCAB):
    """Train the byte-level BPE on the built-in corpus and append the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from internvl_ros.export.corpus import corpus_lines

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, show_progress=False, special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def _init_weight(name: str, shape: tuple[int, ...], rng: np.random.Generator,
                 hidden: int) -> np.ndarray:
    """Deterministic init by parameter name (see the module docstring for the scaling)."""
    def normal(std: float, mean: float = 0.0) -> np.ndarray:
        return (mean + std * rng.standard_normal(shape)).astype(np.float32)

    if name.endswith("embed_tokens.weight"):
        return normal(1.0)  # row norm ~ sqrt(hidden)
    if name.endswith("lm_head.weight"):
        return normal(LOGIT_STD / np.sqrt(hidden))
    if "lambda_" in name:
        return normal(0.05, mean=0.3)
    if name.endswith("cls_token"):
        return normal(1.0)
    if name.endswith("position_embeddings"):
        return normal(0.5)
    if "norm" in name and name.endswith("weight"):
        return normal(0.1, mean=1.0)
    if "norm" in name and name.endswith("bias"):
        return normal(0.1)
    if name.endswith("bias"):
        return normal(0.02)
    if len(shape) >= 2:  # linear (out, in) or conv (out, in, kh, kw): unit gain
        return normal(1.0 / np.sqrt(int(np.prod(shape[1:]))))
    raise ValueError(f"tiny model: no init rule for parameter {name} {shape}")


def _quiet_token_ids(tok, vocab_size: int) -> list[int]:
    """Tokens a random model should not emit: non-printable / partial-UTF-8 byte tokens, the
    special tokens other than the end-of-text ones and ids past the tokenizer (padded vocab),
    so that greedy text reads like words."""
    keep_special = {"<|im_end|>", "<|endoftext|>"}
    quiet = list(range(tok.get_vocab_size(), vocab_size))
    for i in range(tok.get_vocab_size()):
        token = tok.id_to_token(i)
        if token in SPECIAL_TOKENS:
            if token not in keep_special:
                quiet.append(i)
            continue
        text = tok.decode([i])
        if not text or not text.isascii() or not text.isprintable():
            quiet.append(i)
    return quiet


def _round_sig(x: float, digits: int = 2) -> float:
    return float(f"{x:.{digits}g}")


def make_tiny_model(output, seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 4,
                    kv_heads: int = 2, head_dim: int | None = None,
                    intermediate: int | None = None, vision_layers: int = 2,
                    vision_hidden: int | None = None, vocab_size: int | None = None,
                    vision_norm: str = "layer_norm", vision_qk_norm: bool = False) -> Path:
    """Write a tiny random native InternVL checkpoint (+ tokenizer) into `output`; return it."""
    import torch
    import transformers
    from transformers import (
        GenerationConfig,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLVisionConfig,
        PreTrainedTokenizerFast,
        Qwen3Config,
    )

    transformers.utils.logging.disable_progress_bar()
    output = Path(output)
    tok = build_tokenizer()
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    n_tok = tok.get_vocab_size()
    if vocab_size is not None and vocab_size < n_tok:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer ({n_tok}).")
    vision_hidden = vision_hidden or hidden
    if (head_dim is None and hidden % heads) or vision_hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden {hidden} (without head_dim) and vision_hidden {vision_hidden} "
                         f"must be multiples of heads {heads}, and heads a multiple of kv_heads "
                         f"{kv_heads}.")

    text_config = Qwen3Config(
        vocab_size=vocab_size or n_tok, hidden_size=hidden,
        intermediate_size=intermediate or 3 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim or hidden // heads, max_position_embeddings=40960, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision_config = InternVLVisionConfig(
        hidden_size=vision_hidden, num_hidden_layers=vision_layers, num_attention_heads=heads,
        intermediate_size=4 * vision_hidden, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
        norm_type=vision_norm, use_qk_norm=vision_qk_norm, attention_bias=True,
        layer_norm_eps=1e-6, hidden_act="gelu", use_mean_pooling=True,
    )
    config = InternVLConfig(
        text_config=text_config, vision_config=vision_config,
        image_token_id=ids["<IMG_CONTEXT>"], image_seq_length=IMAGE_TOKENS,
        downsample_ratio=0.5, projector_hidden_act="gelu", tie_word_embeddings=False,
    )
    config.architectures = ["InternVLForConditionalGeneration"]

    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    rng = np.random.default_rng(seed)
    state = {name: _init_weight(name, tuple(p.shape), rng, hidden)
             for name, p in sorted(model.state_dict().items())}

    # calibrate the projector: image features get the norm of a token embedding
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    probe = np.random.default_rng(1234).standard_normal((2, 3, IMAGE_SIZE, IMAGE_SIZE))
    with torch.no_grad():
        feats = model.get_image_features(
            torch.from_numpy(probe.astype(np.float32))).pooler_output  # (2, 256, hidden)
    emb = [v for k, v in state.items() if k.endswith("embed_tokens.weight")][0]
    scale = _round_sig(float(np.linalg.norm(emb, axis=-1).mean())
                       / float(feats.norm(dim=-1).mean()))
    for k in state:
        if "multi_modal_projector.linear_2" in k:
            state[k] = (state[k] * np.float32(scale)).astype(np.float32)
        if k.endswith("lm_head.weight"):
            state[k][_quiet_token_ids(tok, text_config.vocab_size)] *= np.float32(QUIET_ROW_SCALE)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)

    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"], do_sample=False,
    ).save_pretrained(output)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        model_max_length=40960, clean_up_tokenization_spaces=False,
        extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                              "context_image_token": "<IMG_CONTEXT>"},
        chat_template=CHAT_TEMPLATE,
    )
    hf_tok.save_pretrained(output)
    return output


# ---------------------------------------------------------------------------------------------
# remote-code layout (what the published OpenGVLab / AXERA-TECH checkpoints look like)

_NATIVE_TO_REMOTE_VIT = [  # (native suffix after "vision_tower.", remote replacement)
    ("embeddings.cls_token", "embeddings.class_embedding"),
    ("embeddings.position_embeddings", "embeddings.position_embedding"),
    ("embeddings.patch_embeddings.projection.", "embeddings.patch_embedding."),
    ("encoder.layer.", "encoder.layers."),
    (".attention.projection_layer.", ".attn.proj."),
    (".attention.", ".attn."),
    (".lambda_1", ".ls1"),
    (".lambda_2", ".ls2"),
    (".layernorm_before.", ".norm1."),
    (".layernorm_after.", ".norm2."),
]
_NATIVE_TO_REMOTE_PROJ = {"layer_norm": "0", "linear_1": "1", "linear_2": "3"}


def write_remote_layout(hf_dir, out_dir) -> Path:
    """Rewrite a native tiny checkpoint in the remote-code `InternVLChatModel` layout.

    Keys `vision_model.*` (fused `attn.qkv`), `mlp1.{0,1,3}.*`, `language_model.model.*`,
    `language_model.lm_head.*`; config with `llm_config` / `vision_config`. For tests of the
    exporter's remote-code path (the weights are unchanged).
    """
    from safetensors.numpy import load_file, save_file

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    cfg = json.loads((hf_dir / "config.json").read_text())
    tensors = load_file(str(hf_dir / "model.safetensors"))
    out: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        for prefix in ("model.", ""):  # tolerate the in-memory naming too
            if key.startswith(prefix + "language_model.model."):
                out["language_model.model." + key[len(prefix + "language_model.model."):]] = value
                break
            if key.startswith(prefix + "language_model.lm_head.") or key == "lm_head.weight":
                out["language_model.lm_head.weight"] = value
                break
            if key.startswith(prefix + "multi_modal_projector."):
                mod, param = key[len(prefix + "multi_modal_projector."):].split(".")
                out[f"mlp1.{_NATIVE_TO_REMOTE_PROJ[mod]}.{param}"] = value
                break
            if key.startswith(prefix + "vision_tower."):
                rest = key[len(prefix + "vision_tower."):]
                for src, dst in _NATIVE_TO_REMOTE_VIT:
                    rest = rest.replace(src, dst)
                out["vision_model." + rest] = value
                break
        else:
            raise ValueError(f"write_remote_layout: unexpected key {key}")
    for key in [k for k in out if ".attn.q_proj." in k]:  # fuse q/k/v into qkv
        out[key.replace(".q_proj.", ".qkv.")] = np.concatenate(
            [out.pop(key), out.pop(key.replace("q_proj", "k_proj")),
             out.pop(key.replace("q_proj", "v_proj"))], axis=0)

    tc, vc = dict(cfg["text_config"]), cfg["vision_config"]
    rope = tc.pop("rope_parameters", None) or {}
    tc.update(architectures=["Qwen3ForCausalLM"], rope_theta=rope.get("rope_theta", 1e6),
              rope_scaling=None)
    remote = {
        "architectures": ["InternVLChatModel"],
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel"},
        "model_type": "internvl_chat",
        "llm_config": tc,
        "vision_config": {
            "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
            "hidden_size": vc["hidden_size"], "num_attention_heads": vc["num_attention_heads"],
            "intermediate_size": vc["intermediate_size"],
            "num_hidden_layers": vc["num_hidden_layers"], "qkv_bias": vc["attention_bias"],
            "qk_normalization": vc["use_qk_norm"], "norm_type": vc["norm_type"],
            "layer_norm_eps": vc["layer_norm_eps"], "image_size": vc["image_size"][0],
            "patch_size": vc["patch_size"][0], "hidden_act": vc["hidden_act"],
            "use_flash_attn": False, "drop_path_rate": 0.0, "dropout": 0.0,
            "attention_dropout": 0.0, "initializer_factor": 0.1,
        },
        "select_layer": cfg.get("vision_feature_layer", -1),
        "force_image_size": vc["image_size"][0],
        "downsample_ratio": cfg["downsample_ratio"],
        "template": "internvl2_5",
        "ps_version": "v2",
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": 12,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "pad2square": False,
        "torch_dtype": "float32",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(remote, indent=2, sort_keys=True) + "\n")
    save_file(dict(sorted(out.items())), str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "special_tokens_map.json"):
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, out_dir / name)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """CLI: internvl-make-tiny-model --output DIR [...] [--export DIR]."""
    ap = argparse.ArgumentParser(
        prog="internvl-make-tiny-model",
        description="Write a tiny random InternVL (Qwen3) checkpoint with a trained BPE "
                    "tokenizer, for tests and demos without downloading weights.")
    ap.add_argument("--output", required=True, type=Path, help="checkpoint folder to write")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=2, help="decoder layers")
    ap.add_argument("--hidden", type=int, default=64, help="text hidden size")
    ap.add_argument("--heads", type=int, default=4, help="attention heads")
    ap.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA)")
    ap.add_argument("--vision-layers", type=int, default=2, help="InternViT layers")
    ap.add_argument("--layout", choices=("native", "remote"), default="native",
                    help="'remote' rewrites the checkpoint in the remote-code layout")
    ap.add_argument("--export", type=Path, default=None,
                    help="also export the ONNX model directory here (internvl-export)")
    args = ap.parse_args(argv)
    try:
        hf_dir = make_tiny_model(args.output, seed=args.seed, layers=args.layers,
                                 hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
                                 vision_layers=args.vision_layers)
    except ValueError as e:
        print(f"internvl-make-tiny-model: error: {e}", file=sys.stderr)
        return 2
    if args.layout == "remote":
        tmp = hf_dir.with_name(hf_dir.name + ".remote-tmp")
        write_remote_layout(hf_dir, tmp)
        shutil.rmtree(hf_dir)
        tmp.rename(hf_dir)
    print(hf_dir)
    if args.export is not None:
        from internvl_ros.export.exporter import export_model

        print(export_model(hf_dir, args.export))
    return 0


if __name__ == "__main__":
    sys.exit(main())
