"""Tokenizer wrapper: special ids, eos ids, plain encoding, UTF-8-safe streaming."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer

from internvl_ros.core.errors import ModelDirError
from internvl_ros.core.tokenizer import DecodeStream, StreamDecoder, Tokenizer
from internvl_ros.export.testing import tiny_model_dirs

TEXTS = ["The robot sees a red cup on the table.", "  two  spaces\nnew line\t tab",
         "Numbers 12345 and symbols #$%&*!", "déjà vu — naïve café", "机器人看到一个红色的杯子。",
         "emoji 🙂🤖 mixed ünïcödé 😀"]


@pytest.fixture(scope="module")
def tok_dir():
    return tiny_model_dirs("a")[1]


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_path(tok_dir / "tokenizer.json")


@pytest.fixture(params=["library", "fallback"])
def stream_decoder(request, tok):
    """tokenizers' DecodeStream (installed here), and the fallback for older tokenizers."""
    if request.param == "library":
        assert DecodeStream is not None  # the pinned tokenizers has it
    return lambda: StreamDecoder(tok, use_library=request.param == "library")


def test_special_ids_and_eos(tok, tok_dir):
    raw = HFTokenizer.from_file(str(tok_dir / "tokenizer.json"))
    assert tok.im_start_id == raw.token_to_id("<|im_start|>")
    assert tok.im_end_id == raw.token_to_id("<|im_end|>")
    assert tok.img_context_id == raw.token_to_id("<IMG_CONTEXT>")
    assert tok.img_start_id == raw.token_to_id("<img>")
    gen = json.loads((tok_dir / "generation_config.json").read_text())["eos_token_id"]
    gen = [gen] if isinstance(gen, int) else gen
    assert tok.eos_token_ids[0] == tok.im_end_id
    assert set(gen) <= set(tok.eos_token_ids)


def test_encode_plain_equals_encode_on_ordinary_text(tok, tok_dir):
    raw = HFTokenizer.from_file(str(tok_dir / "tokenizer.json"))
    for text in TEXTS:
        assert tok.encode_plain(text) == raw.encode(text, add_special_tokens=False).ids, text


def test_encode_plain_never_produces_control_tokens(tok):
    text = "a <|im_end|> b <img><IMG_CONTEXT></img> <|im_start|>system"
    ids = tok.encode_plain(text)
    assert not set(ids) & set(tok.special_ids.values())
    assert tok.decode(ids) == text  # still the same characters


def test_stream_decoder_multibyte(tok, stream_decoder):
    text = "héllo 机器人 🙂🤖 ok"
    ids = tok.encode_plain(text)
    dec = stream_decoder()
    deltas = [dec.push(i) for i in ids]
    deltas.append(dec.flush())
    assert "".join(deltas) == tok.decode(ids) == text
    for d in deltas:
        assert "\ufffd" not in d
        d.encode("utf-8")  # every delta is valid text on its own
    # at least one token was held back because it ended inside a multi-byte character
    assert any(d == "" for d in deltas[:-1])


def test_stream_decoder_dangling_bytes_flush(tok, stream_decoder):
    ids = tok.encode_plain("🙂")
    dec = stream_decoder()
    out = [dec.push(i) for i in ids[:-1]]  # an incomplete 4-byte sequence
    assert "".join(out) == ""
    assert dec.flush() == tok.decode(ids[:-1])  # replacement chars only at the very end


def test_missing_image_tokens_is_an_error(tmp_path, tok_dir):
    raw = json.loads((tok_dir / "tokenizer.json").read_text())
    for entry in raw["added_tokens"]:
        if entry["content"] == "<IMG_CONTEXT>":
            entry["content"] = "<SOMETHING_ELSE>"
    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(ModelDirError) as e:
        Tokenizer.from_path(bad)
    assert "<IMG_CONTEXT>" in str(e.value) and str(bad) in str(e.value)
    bad.write_text("{broken")
    with pytest.raises(ModelDirError, match="could not be loaded"):
        Tokenizer.from_path(bad)


def test_vocab_merges_fallback(tmp_path, tok_dir, tok):
    """A checkpoint folder without tokenizer.json: vocab.json + merges.txt + added tokens."""
    raw = HFTokenizer.from_file(str(tok_dir / "tokenizer.json"))
    raw.model.save(str(tmp_path))  # vocab.json, merges.txt
    added = {str(k): {"content": v.content, "special": v.special}
             for k, v in raw.get_added_tokens_decoder().items()}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": added}))
    fallback = Tokenizer.from_path(tmp_path)
    assert fallback.img_context_id == tok.img_context_id
    assert fallback.im_end_id == tok.im_end_id
    text = "The robot sees a red cup on the table."
    assert fallback.encode_plain(text) == tok.encode_plain(text)
    assert fallback.decode(tok.encode_plain(text)) == text


def test_stream_decoder_uses_the_library_when_it_has_it(tok):
    dec = tok.stream_decoder()
    assert dec._stream is not None
    calls = []
    tok.decode = lambda *a, **kw: calls.append(a)  # the library decodes: we don't
    try:
        assert [dec.push(i) for i in tok.encode_plain("a cat")] and not calls
    finally:
        del tok.decode
    assert dec.text == "a cat"


def test_stream_decoder_decodes_a_short_window(tok):
    """The fallback: O(1) work per token: each push decodes a few ids, never the whole text."""
    text = ("The robot sees a red cup 机器人 on the table 🙂🤖, then déjà vu. " * 12).strip()
    ids = tok.encode_plain(text)
    assert len(ids) > 300
    dec = StreamDecoder(tok, use_library=False)
    windows = []
    real_decode = tok.decode

    def spy(chunk, *a, **kw):
        windows.append(len(chunk))
        return real_decode(chunk, *a, **kw)

    tok.decode = spy
    try:
        deltas = [dec.push(i) for i in ids]
        pushes = windows[:]
        deltas.append(dec.flush())
    finally:
        del tok.decode
    assert "".join(deltas) == text == dec.text
    assert all("\ufffd" not in d for d in deltas)
    assert max(pushes) <= 8, max(pushes)  # a 4-byte emoji spans at most a few tokens
