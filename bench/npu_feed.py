"""kv_feed on the NPU code path, at the published build's size, through the pyaxengine double.

    python bench/npu_feed.py feed ARGS.json OUT.json     # a bench/run.py worker
    python bench/npu_feed.py                             # standalone: prints the table

The layers are shape-only `.axmodel` doubles of InternVL3.5-1B on the AX650N (28 layers,
hidden 1024, K/V rows of 1024 bfloat16, a 2047-row cache, 9 prefill groups of 128) that
compute zeros, so what is measured is the runtime's traffic, not the model: the bytes written
into the layers' persistent input buffers (`fake_axengine.counters`: memmove into CMM, as
pyaxengine's `run()` and the rows door do) per decode token and per 1024-token prefill, in
`full` and `rows` modes, and the host time per decode token through the double: wall time
minus the time inside the emulated NPU (so: our Python, the memmoves into the buffers, and the
double's emulation of the cache flushes, a copy here where the board only writes back lines).
Method and numbers: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ensure_import_path, read_json, write_json

ensure_import_path()

#: InternVL3.5-1B's language model (Qwen3-0.6B) as the published AX650N build feeds it
PUBLISHED = dict(layers=28, hidden=1024, kv_heads=8, head_dim=128, heads=16)
VOCAB = 1000  # only the embedding rows used; the post model's input is what is fed
MODES = ("full", "rows")


def measure(mode: str, workdir: Path, decode_tokens: int = 8, prefill_tokens: int = 1024,
            shape: dict = PUBLISHED) -> dict:
    import numpy as np

    from internvl_ros.backends import fake_axengine, get_backend
    from internvl_ros.core.llm import LanguageModel
    from internvl_ros.core.modeldir import ModelConfig

    kv_dim = shape["kv_heads"] * shape["head_dim"]
    layer_paths, post_path = fake_axengine.make_shape_only_layers(
        workdir, shape["layers"], shape["hidden"], kv_dim, VOCAB)
    cfg = ModelConfig(hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                      num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                      head_dim=shape["head_dim"], vocab_size=VOCAB, max_position_embeddings=None,
                      image_size=448, patch_size=14, downsample_ratio=0.5)
    rng = np.random.default_rng(0)
    emb = (0.02 * rng.standard_normal((VOCAB, shape["hidden"]))).astype(np.float32)
    counters = fake_axengine.counters
    with fake_axengine.installed():
        backend = get_backend("axengine")
        layers = [backend.open(str(p)) for p in layer_paths]
        llm = LanguageModel(layers, backend.open(str(post_path)), emb, cfg, kv_feed=mode)
        x = llm.embed(rng.integers(0, VOCAB, prefill_tokens))  # (L, hidden)
        # warm-up request: the self-checks and, in rows mode, the one full sync of the buffers
        llm.prefill(x)
        for t in range(3):
            llm.decode(t)
        status = llm.kv_feed
        llm.feeder.verify_every = 0  # steady state: no self-check steps measured
        counters.reset()
        t0 = time.perf_counter()
        llm.prefill(x)
        prefill_s = time.perf_counter() - t0
        prefill_bytes = counters.input_bytes
        counters.reset()
        llm.decode(1)  # also writes the last prefill slice's rows in rows mode
        first_bytes = counters.input_bytes
        counters.reset()
        walls = []
        for t in range(decode_tokens):
            npu0 = counters.npu_s
            t0 = time.perf_counter()
            llm.decode(t + 2)
            walls.append(time.perf_counter() - t0 - (counters.npu_s - npu0))
        out = {
            "mode": mode, "status": status.to_dict(), "layers": shape["layers"],
            "kv_dim": kv_dim, "kv_cache_len": llm.decode_cache_len,
            "prefill_groups": llm.num_groups - 1, "prefill_tokens": prefill_tokens,
            "bytes_per_token": counters.input_bytes / decode_tokens,
            "flushed_bytes_per_token": counters.flushed_bytes / decode_tokens,
            "bytes_prefill": prefill_bytes, "bytes_first_decode": first_bytes,
            "host_ms_per_token": 1e3 * statistics.mean(walls),
            "host_ms_per_token_median": 1e3 * statistics.median(walls),
            "prefill_host_s": prefill_s, "decode_tokens": decode_tokens,
        }
        llm.close()
    return out


def run_all(decode_tokens: int = 8) -> dict:
    with tempfile.TemporaryDirectory(prefix="npu-feed-") as tmp:
        return {m: measure(m, Path(tmp) / m, decode_tokens=decode_tokens) for m in MODES}


def summary(feed: dict) -> dict:
    """The JSON keys of issue 9."""
    full, rows = feed["full"], feed["rows"]
    return {
        "npu_bytes_per_token_full": full["bytes_per_token"],
        "npu_bytes_per_token_rows": rows["bytes_per_token"],
        "npu_host_ms_per_token_full": full["host_ms_per_token"],
        "npu_host_ms_per_token_rows": rows["host_ms_per_token"],
        "npu_bytes_prefill_1024_full": full["bytes_prefill"],
        "npu_bytes_prefill_1024_rows": rows["bytes_prefill"],
    }


def _mb(n: float) -> str:
    return f"{n / 1e6:.3f} MB" if n < 10e6 else f"{n / 1e6:.1f} MB"


def markdown(feed: dict) -> str:
    full, rows = feed["full"], feed["rows"]
    lines = [f"**kv_feed through the double** (published shape: {full['layers']} layers, "
             f"{full['kv_cache_len']}-row cache of {full['kv_dim']} bfloat16, "
             f"{full['prefill_groups']} prefill groups; layers compute zeros)", "",
             "| | full | rows |", "|---|---|---|",
             f"| bytes written into input buffers per decode token | "
             f"{_mb(full['bytes_per_token'])} | {_mb(rows['bytes_per_token'])} |",
             f"| bytes per 1024-token prefill | {_mb(full['bytes_prefill'])} | "
             f"{_mb(rows['bytes_prefill'])} (+ {_mb(rows['bytes_first_decode'])} at the first "
             "decode step: the last slice's rows) |",
             f"| host ms per decode token, this machine, through the double | "
             f"{full['host_ms_per_token']:.2f} | {rows['host_ms_per_token']:.2f} |",
             f"| mode in use after the self-checks | {full['status']['mode']} | "
             f"{rows['status']['mode']} |", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "feed" and len(argv) == 3:
        args = read_json(argv[1])
        write_json(argv[2], run_all(int(args.get("tokens", 8))))
        return 0
    if argv:
        print("usage: npu_feed.py [feed ARGS.json OUT.json]", file=sys.stderr)
        return 2
    print(markdown(run_all()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
