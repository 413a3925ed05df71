"""Constrained answers: generation restricted to exactly one of a list of strings (`choices`).

A `ChoiceConstraint` is an automaton over token ids, built from the choices' UTF-8 bytes. Its
states are the nodes of the byte trie of the choices (a state = the bytes generated so far, a
prefix of at least one choice); from each state, every vocabulary token whose bytes continue
some choice is an edge. So it holds every tokenisation of every choice: the canonical one (what
the tokenizer produces, e.g. "yes" -> [yes]) and every other token sequence that decodes to the
same text ([y, es], [ye, s], ...), merged where they reach the same text. This matters when a
choice is a prefix of another ("no", "not sure"): the canonical "not sure" starts with the token
"not", but after the token "no" the model may still go on with "t sure".

- A state where a choice is complete also allows the eos tokens; one that continues no other
  choice (within the token budget) is final: the answer ends there without running the model
  for the eos (`ChoiceCursor.done`).
- Every state knows the fewest tokens that complete a choice from it, so an edge is allowed
  only if a choice can still be completed within `max_new_tokens`: a constrained answer never
  stops half-way for lack of tokens.
- Special and added tokens (`<|im_end|>`, `<img>`...) are never edges: a choice is plain text.

The per-token work is a dictionary lookup and a small array filter; the sampler then runs on
the allowed ids only (`Sampler(..., allowed=ids)`), greedy or sampled, with transformers'
semantics of a prefix-constrained logits processor (the mask applies before temperature, top-k
and top-p).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import ConfigError

#: limits of a `choices` list (a hostile request must not stall the node building the trie)
MAX_CHOICES = 256
MAX_CHOICE_BYTES = 1024
MAX_TOTAL_CHOICE_BYTES = 8192

_UNREACHABLE = np.iinfo(np.int32).max


def check_choices(choices, where: str = "choices") -> tuple[str, ...]:
    """Validate a choices list (a sequence of distinct non-empty strings, within the limits);
    return it as a tuple. Raises ConfigError naming the offending entry."""
    if isinstance(choices, (str, bytes)) or not isinstance(choices, Sequence):
        raise ConfigError(f"{where} must be a list of strings, got {type(choices).__name__}")
    out = tuple(choices)
    if len(out) > MAX_CHOICES:
        raise ConfigError(f"{where} has {len(out)} entries; at most {MAX_CHOICES} are allowed")
    seen: dict[str, int] = {}
    total = 0
    for i, c in enumerate(out):
        if not isinstance(c, str):
            raise ConfigError(f"{where}[{i}] must be a string, got {type(c).__name__}")
        if not c:
            raise ConfigError(f"{where}[{i}] is empty; an empty answer cannot be generated. "
                              "Remove it, or give every choice some text")
        if c in seen:
            raise ConfigError(f"{where}[{i}] {c!r} repeats {where}[{seen[c]}]; each choice must "
                              "be unique (choice_index would be ambiguous)")
        seen[c] = i
        try:
            n = len(c.encode("utf-8"))
        except UnicodeEncodeError:
            raise ConfigError(f"{where}[{i}] {c!r} is not valid Unicode text (a lone "
                              "surrogate)") from None
        if n > MAX_CHOICE_BYTES:
            raise ConfigError(f"{where}[{i}] is {n} bytes long; at most {MAX_CHOICE_BYTES} are "
                              "allowed")
        total += n
    if total > MAX_TOTAL_CHOICE_BYTES:
        raise ConfigError(f"{where} totals {total} bytes; at most {MAX_TOTAL_CHOICE_BYTES} are "
                          "allowed")
    return out


def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level alphabet: the character standing for each byte -> the byte."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return {c: b for b, c in chars.items()}


class TokenTable:
    """The bytes of every plain vocabulary token, for the constraint automaton.

    Byte-level BPE (Qwen, the tiny test tokenizer) maps each token string back through the
    GPT-2 byte alphabet; any other tokenizer decodes each token on its own (tokens that decode
    to an incomplete character are left out). Added and special tokens are left out.
    """

    def __init__(self, tokenizer):
        vocab = tokenizer.vocab()  # {token string: id}, plain tokens only
        self.by_bytes: dict[bytes, int] = {}
        if tokenizer.byte_level:
            # str.translate + latin-1 is ~10x faster than a per-character lookup (151k tokens);
            # a character outside the alphabet maps past 255, so encoding it fails
            table = {ord(c): b for c, b in _byte_decoder().items()}
            table.update({i: 0x100 for i in range(256) if i not in table})
            for token, tid in vocab.items():
                try:
                    data = token.translate(table).encode("latin-1")
                except UnicodeEncodeError:  # not a byte-level token string
                    continue
                self.by_bytes.setdefault(data, tid)
        else:
            for _token, tid in sorted(vocab.items(), key=lambda kv: kv[1]):
                text = tokenizer.decode([tid], skip_special_tokens=False)
                if text and "\ufffd" not in text:
                    self.by_bytes.setdefault(text.encode("utf-8"), tid)
        self.max_len = max((len(b) for b in self.by_bytes), default=0)
        self.eos_ids = tuple(int(i) for i in tokenizer.eos_token_ids)


class ChoiceConstraint:
    """The token automaton of one choices list (see the module docstring). Immutable; a
    generation walks it with a `ChoiceCursor` (`start()`)."""

    def __init__(self, choices: Sequence[str], table: TokenTable):
        self.choices = check_choices(choices)
        if not self.choices:
            raise ConfigError("choices is empty; without choices generation is not constrained")
        targets = [c.encode("utf-8") for c in self.choices]
        # byte trie: children[node] = {byte: child}; final[node] = choice index or -1
        children: list[dict[int, int]] = [{}]
        depth = [0]
        final = [-1]
        for i, data in enumerate(targets):
            node = 0
            for b in data:
                nxt = children[node].get(b)
                if nxt is None:
                    nxt = len(children)
                    children.append({})
                    depth.append(depth[node] + 1)
                    final.append(-1)
                    children[node][b] = nxt
                node = nxt
            final[node] = i
        # token edges: from each node, every token whose bytes follow the trie from it
        n_nodes = len(children)
        edges: list[dict[int, int]] = [{} for _ in range(n_nodes)]
        for node in range(n_nodes):
            stack = [(node, b"")]
            while stack:
                at, text = stack.pop()
                for b, child in children[at].items():
                    piece = text + bytes((b,))
                    tid = table.by_bytes.get(piece)
                    if tid is not None:
                        edges[node][tid] = child
                    if len(piece) < table.max_len:
                        stack.append((child, piece))
        # fewest tokens from each node to a complete choice (edges only go deeper in the trie)
        dist = np.full(n_nodes, _UNREACHABLE, dtype=np.int64)
        for node in sorted(range(n_nodes), key=lambda v: -depth[v]):
            if final[node] >= 0:
                dist[node] = 0
            else:
                best = min((dist[c] for c in edges[node].values()), default=_UNREACHABLE)
                if best < _UNREACHABLE:
                    dist[node] = best + 1
        # choices no token path from the root spells: which cannot be generated
        reach = np.zeros(n_nodes, dtype=bool)
        reach[0] = True
        for node in sorted(range(n_nodes), key=lambda v: depth[v]):
            if reach[node]:
                for child in edges[node].values():
                    reach[child] = True
        terminal_of = {final[v]: v for v in range(n_nodes) if final[v] >= 0}
        bad = [self.choices[i] for i in range(len(targets)) if not reach[terminal_of[i]]]
        if bad:
            raise ConfigError(f"choice(s) {bad} cannot be tokenised with this model's "
                              "vocabulary; use plain text the model can write")
        eos = set(table.eos_ids)
        # per node, by ascending id: allowed ids, the tokens each still needs after it (-1 for
        # an eos, allowed where a choice is complete) and which of them are eos
        self._ids: list[np.ndarray] = []
        self._need: list[np.ndarray] = []
        self._is_eos: list[np.ndarray] = []
        for node in range(n_nodes):
            rows = {tid: int(dist[child]) for tid, child in edges[node].items()
                    if dist[child] < _UNREACHABLE}
            if final[node] >= 0:
                rows.update({e: -1 for e in eos})
            ids = np.array(sorted(rows), dtype=np.int64)
            self._ids.append(ids)
            self._need.append(np.array([rows[t] for t in ids.tolist()], dtype=np.int64))
            self._is_eos.append(np.array([t in eos for t in ids.tolist()], dtype=bool))
        self._edges = edges
        self._final = final
        self.min_tokens = int(dist[0])  # fewest tokens of any choice

    @property
    def num_states(self) -> int:
        return len(self._edges)

    def check_budget(self, max_new_tokens: int) -> None:
        if self.min_tokens > max_new_tokens:
            raise ConfigError(
                f"max_new_tokens={max_new_tokens} is too small for these choices: the shortest "
                f"takes {self.min_tokens} tokens. Raise max_new_tokens or shorten the choices")

    def start(self) -> ChoiceCursor:
        return ChoiceCursor(self)


class ChoiceCursor:
    """A generation's position in a ChoiceConstraint."""

    def __init__(self, constraint: ChoiceConstraint):
        self._c = constraint
        self.state = 0

    def allowed(self, budget: int) -> np.ndarray:
        """Token ids (ascending) allowed next, when `budget` >= 1 tokens may still be
        generated (this one included): those from which a choice completes in time."""
        c = self._c
        ids, need = c._ids[self.state], c._need[self.state]
        return ids[need <= budget - 1]

    def done(self, budget: int) -> bool:
        """A choice is complete and none continues it within `budget` tokens: the eos is the
        only allowed token, so the answer ends without running the model."""
        c, s = self._c, self.state
        if c._final[s] < 0:
            return False
        return not np.any(~c._is_eos[s] & (c._need[s] <= budget - 1))

    def advance(self, token_id: int) -> None:
        """Follow the edge of a sampled (allowed, non-eos) token."""
        nxt = self._c._edges[self.state].get(int(token_id))
        if nxt is None:
            raise ConfigError(f"token {token_id} is not allowed by the choices here (internal "
                              "error: the sampler must pick among allowed())")
        self.state = nxt

    @property
    def choice_index(self) -> int:
        """The index of the choice the text so far equals, or -1."""
        return self._c._final[self.state]
