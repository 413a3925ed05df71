"""Benchmark side of the host layout (one graph, KV cache kept in the onnxruntime session).

`wrap_host_llm` puts a `TimedKVSession` around a HostLanguageModel's session, from the outside
(the model looks its session up at call time), so the workers of bench/measure.py time the
session's `step()` the way `common.TimedSession` times `run()`: host overhead per decode token
= wall time of the step minus the time inside `step()`; bytes fed = the embeddings and the two
int32 scalars a step hands over (the cache never crosses).
"""

from __future__ import annotations

import time


class TimedKVSession:
    """A core.host_llm.KVSession wrapper: times `step()` and counts the bytes fed."""

    def __init__(self, inner, meter, capture: bool = False):
        self._inner = inner
        self.meter = meter
        self.capture = capture
        self.captured = []
        for name in ("path", "num_layers", "hidden", "vocab", "max_positions"):
            setattr(self, name, getattr(inner, name))

    @property
    def rows(self) -> int:
        return self._inner.rows

    def allocate(self, rows: int) -> None:
        self._inner.allocate(rows)

    def clear(self) -> None:
        self._inner.clear()

    def step(self, embeds, past: int):
        nbytes = embeds.nbytes + 8  # + seqlens_k and total_sequence_length (int32)
        t = time.perf_counter()
        out = self._inner.step(embeds, past)
        m = self.meter
        m.run_s += time.perf_counter() - t
        m.calls += 1
        m.bytes_fed += nbytes
        if m.by_input is not None:
            m.by_input["inputs_embeds"] = m.by_input.get("inputs_embeds", 0) + embeds.nbytes
        if self.capture:
            self.captured.append(out.copy())
        return out

    def close(self) -> None:
        self._inner.close()


def wrap_host_llm(llm, meter, capture_logits: bool = False) -> TimedKVSession:
    llm.session = TimedKVSession(llm.session, meter, capture=capture_logits)
    return llm.session


# --------------------------------------------------------------------------------------------
# worker: python bench/host.py ours_ids ARGS.json OUT.json


def task_ours_ids(a: dict) -> dict:
    """Our language model alone on given prompt ids (no ViT: the anchor comparison with
    llama.cpp, which gets the same ids): prefill, then `tokens` greedy decode steps, timed per
    step, with the session time split out (host overhead)."""
    import statistics

    import numpy as np
    from common import Meter, disable_eos, peak_rss_bytes, wrap_pipeline

    from internvl_ros.core import Pipeline

    pipe = Pipeline.from_model_dir(a["model_dir"], backend="onnxruntime",
                                   num_threads=a["threads"])
    meter = Meter()
    wrap_pipeline(pipe, meter)
    disable_eos(pipe)
    llm = pipe.llm
    embeds = llm.embed([int(t) for t in a["prompt_ids"]])  # (L, hidden)
    llm.prefill(embeds[:32])  # warm-up
    llm.reset()
    t = time.perf_counter()
    logits = llm.prefill(embeds)
    prefill_s = time.perf_counter() - t
    walls, runs, tokens = [], [], []
    for _ in range(a["tokens"]):
        tok = int(np.argmax(logits))
        tokens.append(tok)
        r0 = meter.run_s
        t = time.perf_counter()
        logits = llm.decode(tok)
        walls.append(time.perf_counter() - t)
        runs.append(meter.run_s - r0)
    over = [w - r for w, r in zip(walls, runs, strict=True)]
    pipe.close()
    return {"label": a["label"], "model_dir": a["model_dir"], "threads": a["threads"],
            "prompt_tokens": len(embeds), "prefill_s": prefill_s,
            "prefill_tok_s": len(embeds) / prefill_s, "decode_steps": len(walls),
            "decode_tok_s": 1.0 / statistics.median(walls),
            "decode_tok_s_mean": len(walls) / sum(walls),
            "overhead_ms_per_token": 1e3 * sum(over) / len(over),
            "overhead_frac": sum(over) / sum(runs), "tokens": tokens,
            "peak_rss_bytes": peak_rss_bytes()}


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import ensure_import_path, serve_worker

    ensure_import_path()
    sys.exit(serve_worker({"ours_ids": task_ours_ids}, "host.py"))
