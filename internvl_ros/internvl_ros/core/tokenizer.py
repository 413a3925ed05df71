"""Tokenizer wrapper over `tokenizers` (no transformers): special ids, eos ids, plain-text
encoding that never matches special tokens, and UTF-8-safe incremental detokenisation."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from .errors import ModelDirError

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
ENDOFTEXT = "<|endoftext|>"

#: tokens the chat prompt needs, and why (for the error message)
REQUIRED_TOKENS = {
    IM_START: "ChatML turn start",
    IM_END: "ChatML turn end / stop token",
    IMG_START: "image block start",
    IMG_END: "image block end",
    IMG_CONTEXT: "image embedding placeholder",
}

# Qwen2/Qwen3 pre-tokenizer split pattern (used only when building from vocab.json + merges.txt)
_QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
               r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _from_vocab_merges(folder: Path) -> HFTokenizer:
    """A Qwen2-style byte-level BPE from vocab.json + merges.txt (+ added tokens)."""
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        raise ModelDirError(f"{folder} has neither tokenizer.json nor vocab.json + merges.txt; "
                            "copy the tokenizer files of the checkpoint there")
    tok = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    added = _read_json(folder / "tokenizer_config.json").get("added_tokens_decoder", {})
    if added:
        from tokenizers import AddedToken

        for _id, info in sorted(added.items(), key=lambda kv: int(kv[0])):
            token = AddedToken(info["content"], special=bool(info.get("special", True)),
                               normalized=bool(info.get("normalized", False)))
            tok.add_tokens([token])
    else:
        extra = _read_json(folder / "added_tokens.json")
        tok.add_special_tokens([t for t, _ in sorted(extra.items(), key=lambda kv: kv[1])])
    return tok


class Tokenizer:
    """InternVL tokenizer: ids of the chat/image control tokens, eos ids, encode/decode."""

    def __init__(self, tokenizer: HFTokenizer, eos_token_ids: Sequence[int] = (),
                 source: str = "tokenizer"):
        self._tok = tokenizer
        self.source = source
        self.special_ids = {}
        for token, role in REQUIRED_TOKENS.items():
            tid = tokenizer.token_to_id(token)
            if tid is None:
                raise ModelDirError(
                    f"{source} has no token '{token}' ({role}); InternVL prompts need it. Use "
                    "the tokenizer files that came with the InternVL checkpoint")
            self.special_ids[token] = tid
        self.im_start_id = self.special_ids[IM_START]
        self.im_end_id = self.special_ids[IM_END]
        self.img_start_id = self.special_ids[IMG_START]
        self.img_end_id = self.special_ids[IMG_END]
        self.img_context_id = self.special_ids[IMG_CONTEXT]
        eos = [self.im_end_id] + [int(i) for i in eos_token_ids]
        self.eos_token_ids = tuple(dict.fromkeys(eos))
        self._added = {int(k): v for k, v in tokenizer.get_added_tokens_decoder().items()}

    @classmethod
    def from_path(cls, path: str | Path, hf_dir: str | Path | None = None,
                  extra_eos: Iterable[int] = ()) -> Tokenizer:
        """Load tokenizer.json (or a folder with vocab.json + merges.txt).

        eos ids: <|im_end|> (InternVL's stop token), generation_config.json's eos_token_id and
        `extra_eos` (e.g. from config.json).
        """
        path = Path(path)
        if path.is_dir():
            folder = path
            tok = (_load_json_tokenizer(path / "tokenizer.json")
                   if (path / "tokenizer.json").is_file() else _from_vocab_merges(path))
            source = str(path)
        else:
            folder = path.parent
            tok = _load_json_tokenizer(path)
            source = str(path)
        hf_dir = Path(hf_dir) if hf_dir is not None else folder
        eos = list(extra_eos)
        gen = _read_json(hf_dir / "generation_config.json").get("eos_token_id")
        if gen is not None:
            eos += [gen] if isinstance(gen, int) else list(gen)
        return cls(tok, eos_token_ids=eos, source=source)

    # ---------------------------------------------------------------- encode / decode

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def vocab(self) -> dict[str, int]:
        """{token string: id} of the plain vocabulary (added and special tokens left out)."""
        return self._tok.get_vocab(with_added_tokens=False)

    @property
    def byte_level(self) -> bool:
        """Token strings are in the GPT-2 byte-level alphabet (Qwen's byte-level BPE)."""
        return isinstance(self._tok.decoder, decoders.ByteLevel)

    def encode_plain(self, text: str) -> list[int]:
        """Encode text with no special/added-token matching: `<|im_end|>` or `<img>` in the
        text become ordinary characters. Equal to `encode(text)` for text without them."""
        if not text:
            return []
        tok = self._tok
        if tok.normalizer is not None:
            text = tok.normalizer.normalize_str(text)
        pieces = (tok.pre_tokenizer.pre_tokenize_str(text) if tok.pre_tokenizer is not None
                  else [(text, (0, len(text)))])
        ids: list[int] = []
        for piece, _span in pieces:
            ids.extend(t.id for t in tok.model.tokenize(piece))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def is_special(self, token_id: int) -> bool:
        """True for added special tokens (skipped when decoding)."""
        added = self._added.get(int(token_id))
        return bool(added is not None and added.special)

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


def _load_json_tokenizer(path: Path) -> HFTokenizer:
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on parse errors
        raise ModelDirError(f"tokenizer file {path} could not be loaded ({exc}); re-download "
                            "it from the checkpoint") from None


try:  # tokenizers >= 0.21 (requirements/runtime.txt pins 0.23.3)
    from tokenizers.decoders import DecodeStream
except ImportError:  # older tokenizers, as requirements/board.txt still allows (>= 0.19)
    DecodeStream = None


class StreamDecoder:
    """Incremental detokenisation for streaming, O(1) work per token.

    `push(token_id)` returns the new text since the last call, never half a UTF-8 character:
    text that ends in an incomplete sequence is held back until the next tokens complete it;
    `flush()` returns what is left (a dangling partial character, as U+FFFD). The concatenated
    deltas equal `decode(all ids)`.

    The work is tokenizers' own `DecodeStream` where the installed version has it (0.21 on).
    Older versions get the same algorithm here (what transformers' TextStreamer and
    onnxruntime-genai's TokenizerStream do): decode only a short window of ids, from `prefix`
    (the start of the last emitted piece, for context) to the end, and emit what follows the
    decoded `prefix:read` part.
    """

    def __init__(self, tokenizer: Tokenizer, use_library: bool = True):
        self._tok = tokenizer
        self.ids: list[int] = []
        self._pieces: list[str] = []  # the deltas emitted so far
        use = use_library and DecodeStream is not None
        self._stream = DecodeStream(skip_special_tokens=True) if use else None
        self._prefix = 0  # (fallback) ids[prefix:read] decode to the end of the emitted text
        self._read = 0

    @property
    def text(self) -> str:
        """The text emitted so far."""
        return "".join(self._pieces)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        if self._stream is not None:
            delta = self._stream.step(self._tok._tok, int(token_id)) or ""
        else:
            delta = self._push_window()
        if delta:
            self._pieces.append(delta)
        return delta

    def _push_window(self) -> str:
        window = self.ids[self._prefix:]
        seen = (self._tok.decode(window[:self._read - self._prefix])
                if self._read > self._prefix else "")
        now = self._tok.decode(window)
        if len(now) <= len(seen) or now.endswith("\ufffd") or not now.startswith(seen):
            return ""  # nothing new yet, or a character is still incomplete
        self._prefix, self._read = self._read, len(self.ids)
        return now[len(seen):]

    def flush(self) -> str:
        """The rest of the text (e.g. a dangling partial character, as U+FFFD)."""
        full = self._tok.decode(self.ids)
        text = self.text
        if not full.startswith(text):  # cannot happen with byte-level BPE; be safe
            return ""
        delta = full[len(text):]
        if delta:
            self._pieces.append(delta)
        self._prefix = self._read = len(self.ids)
        return delta
