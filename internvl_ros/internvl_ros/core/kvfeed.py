"""How the KV cache reaches a fixed-shape (NPU) decoder layer: `kv_feed`.

- `full`: every run feeds the K_cache/V_cache inputs whole (the decode group: all 2047 rows of
  every layer, 235 MB per token on the published build); the runtime copies them into the
  layer's persistent input buffers.
- `rows`: the layer session offers `kv_rows` (backends/axengine_rows.py), which writes rows
  straight into those persistent buffers. Before a run, only the rows the buffer does not hold
  yet are written (the new row of the previous step, the previous prefill slice's 128 rows);
  the small inputs (indices, input, mask) are written whole as before; the group runs on the
  buffers as they are.
- `auto` (default): `rows` where the sessions offer it and the self-check passes, `full`
  otherwise.

The host `KVCache` stays the source of truth. Per layer, `stale[layer]` lists the row ranges
whose host bytes the input buffers may not hold: all rows at first (fresh buffers hold garbage),
then every range the cache writes or zeroes (the cache calls `rows_changed`). So a prefill that
keeps the first N cached rows and continues at row N rewrites only rows from N on, and a full
feed can run at any time.

Self-check: on the first decode steps (`verify_first`), on the prefill slices before them, and
then every `verify_every` decode steps, each layer runs in rows mode and then with the full
feed; the outputs must be equal bit for bit (the NPU is deterministic). On a mismatch (or an
error of the rows path) the full-feed outputs are kept, the pipeline switches to `full` for
good, and one warning names the layer and the step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from .errors import ConfigError

KV_FEED_MODES = ("auto", "full", "rows")
ROW_INPUTS = ("K_cache", "V_cache")
VERIFY_FIRST = 2  # decode steps checked at the start (and the prefill slices before them)
VERIFY_EVERY = 64  # then every N-th decode step

log = logging.getLogger("internvl_ros.kv_feed")


def check_kv_feed(value) -> str:
    if value not in KV_FEED_MODES:
        raise ConfigError(f"kv_feed={value!r} must be one of {', '.join(KV_FEED_MODES)} (auto: "
                          "new KV rows only where the NPU runtime allows it and its self-check "
                          "passes; full: the whole cache every step; rows: as auto, and warn "
                          "when it is not possible)")
    return value


@dataclass(frozen=True)
class KVFeedStatus:
    """The mode in use (`rows` or `full`), what was asked, and why."""

    requested: str
    mode: str
    reason: str
    verified_steps: int = 0
    verify_every: int = VERIFY_EVERY

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.mode} ({self.reason})"


class KVFeeder:
    """Runs the decoder layers of a LanguageModel in `full` or `rows` mode."""

    def __init__(self, layers: Sequence, cache, requested: str = "auto", fixed: bool = True,
                 verify_first: int = VERIFY_FIRST, verify_every: int = VERIFY_EVERY):
        self.requested = check_kv_feed(requested)
        self.cache = cache
        self.verify_first, self.verify_every = int(verify_first), int(verify_every)
        self.rows_io = [getattr(layer, "kv_rows", None) for layer in layers]
        self.decode_steps = 0  # over the life of the pipeline
        self.prefill_slices = 0
        self.verified_steps = 0
        self._verifying = False
        self._step = ""
        self.stale = None
        self.mode, self.reason = self._choose(layers, fixed)
        if self.mode == "rows":
            # per layer: sorted, disjoint [start, stop) row ranges the buffers may not hold
            self.stale = [[(0, cache.max_ctx)] for _ in layers]
            cache.listeners.append(self.rows_changed)
        level = logging.WARNING if requested == "rows" and self.mode != "rows" else logging.INFO
        log.log(level, "kv_feed: %s (%s)", self.mode, self.reason)

    def _choose(self, layers, fixed: bool) -> tuple[str, str]:
        if not fixed:
            return "full", "dynamic shapes: the host backend feeds only the filled rows"
        if self.requested == "full":
            return "full", "kv_feed=full was asked for"
        for i, io in enumerate(self.rows_io):
            if io is None:
                why = getattr(layers[i], "kv_rows_reason", None) or \
                    "the backend's sessions cannot write KV rows"
                return "full", f"rows mode is off: {why}"
            for name in ROW_INPUTS:
                if io.dtype[name] != self.cache.dtype:
                    return "full", (f"rows mode is off: the {name} buffer holds "
                                    f"{io.dtype[name]}, the cache {self.cache.dtype}")
        what = getattr(layers[0], "kv_rows_reason", "") or "rows"
        return "rows", (f"{what}; self-check on the first {self.verify_first} decode steps, "
                        f"then every {self.verify_every}")

    @property
    def status(self) -> KVFeedStatus:
        return KVFeedStatus(self.requested, self.mode, self.reason, self.verified_steps,
                            self.verify_every)

    # ------------------------------------------------------------------ bookkeeping

    def rows_changed(self, layer: int | None, start: int, stop: int) -> None:
        """The host cache rewrote rows [start, stop) of `layer` (None: of every layer)."""
        if self.stale is None or stop <= start:
            return
        for i in range(len(self.stale)) if layer is None else (layer,):
            self._mark(i, start, stop)

    def _mark(self, index: int, start: int, stop: int) -> None:
        merged = []
        for a, b in self.stale[index]:
            if b < start or a > stop:  # disjoint and not adjacent
                merged.append((a, b))
            else:
                start, stop = min(a, start), max(b, stop)
        merged.append((start, stop))
        merged.sort()
        self.stale[index] = merged

    def begin(self, kind: str, where: int) -> None:
        """Start a decode step (`where` = its position) or a prefill slice (its first row)."""
        if self.mode != "rows":
            self._verifying = False
            return
        if kind == "decode":
            n = self.decode_steps
            self.decode_steps += 1
            self._verifying = n < self.verify_first or (
                self.verify_every > 0 and n % self.verify_every == 0)
            self._step = f"decode step {n} (position {where})"
        else:
            n = self.prefill_slices
            self.prefill_slices += 1
            self._verifying = self.decode_steps < self.verify_first or (
                self.verify_every > 0 and n % self.verify_every == 0)
            self._step = f"prefill slice at row {where}"
        if self._verifying:
            self.verified_steps += 1

    # ------------------------------------------------------------------ running

    def run(self, index: int, feed: dict, group: int, rows: int,
            run_full: Callable[[], list]) -> list:
        """Run layer `index` on shape group `group`, which reads cache rows [0, rows) (0: the
        dummy cache of the first slice). `feed` is the full feed; `run_full()` runs it."""
        if self.mode != "rows":
            return run_full()
        io = self.rows_io[index]
        try:
            if rows == 0:  # the dummy (1, 1, kv_dim) cache: write it as the full feed does
                for name in ROW_INPUTS:
                    io.write_rows(name, 0, feed[name])
                self._mark(index, 0, 1)  # the buffer's row 0 is the dummy, not the cache
            else:
                self._sync(index, io, rows)
            out = io.run({k: v for k, v in feed.items() if k not in ROW_INPUTS}, group)
        except Exception as exc:  # the rows path failed: the full feed is always possible
            self._switch_to_full(index, f"the rows path failed ({type(exc).__name__}: {exc})")
            return run_full()
        if not self._verifying:
            return out
        full = run_full()
        same = len(out) == len(full) and all(
            a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()
            for a, b in zip(out, full, strict=False))
        if not same:
            self._switch_to_full(index, "rows and full outputs differ")
        return full

    def _sync(self, index: int, io, rows: int) -> None:
        """Write the stale rows among [0, rows) of layer `index` into its input buffers."""
        ranges = self.stale[index]
        if not ranges or ranges[0][0] >= rows:
            return
        k, v = self.cache.k, self.cache.v
        keep = []
        for a, b in ranges:
            if a >= rows:
                keep.append((a, b))
                continue
            end = min(b, rows)
            io.write_rows("K_cache", a, k[index, :, a:end])  # (1, end - a, kv_dim)
            io.write_rows("V_cache", a, v[index, :, a:end])
            if b > end:
                keep.append((end, b))
        self.stale[index] = keep

    def _switch_to_full(self, index: int, what: str) -> None:
        self.mode = "full"
        self.reason = (f"self-check failed at {self._step or 'the first run'}, decoder layer "
                       f"{index}: {what}; using full from now on")
        self.stale = None
        log.warning("kv_feed: switching to full for good: %s", self.reason)
