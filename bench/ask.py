"""Benchmark of several questions about one frame (issue 13): TTFT of the first and the later
questions of an Ask, and of a repeated Describe on a cached frame.

    python bench/ask.py host|npu ARGS.json OUT.json      # one worker (bench/run.py runs both)

- `host`: our pipeline on onnxruntime (the primary build). An Ask of three questions on one
  image (`ask_first_ttft_s`, `ask_followup_ttft_s` = median of the later two), then the same
  questions as separate requests (nothing reused: their tokens must be equal), then a Describe
  twice on one frame key (`describe_repeat_ttft_s`: the second skips preprocessing and the ViT
  through the frame cache, and keeps the KV rows of the whole prompt but its last token).
- `npu`: the same through the axengine double (fixed 128-row prefill slices: only whole slices
  of the prefix are kept), with the bytes fed and session time per question, for the AX650N
  projection in `derive()`.

`derive()` / `markdown()` turn both into the report keys and the table (bench/run.py).
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    QUESTION,
    TEXT_QUESTION,
    WARMUP_SYSTEM,
    Meter,
    bench_image,
    ensure_import_path,
    peak_rss_bytes,
    serve_worker,
    wrap_pipeline,
)

ensure_import_path()

#: the Ask: a free question, a yes/no question, another free one
ASK_QUESTIONS = [
    {"prompt": QUESTION},
    {"prompt": "Is the path in front of the robot clear?", "choices": ["yes", "no"]},
    {"prompt": "Which objects are on the left side of the image?"},
]
TARGET_FOLLOWUP_RATIO = 0.2  # follow-up TTFT <= 20% of the first (issue 13)
ASK_TOKENS = 8  # new tokens per answer on the host (TTFT is the measure, not decode)
#: AX650N seed figures (DESIGN.md): prefill per layer and 128-row slice, 2.2 ms at past 0 up to
#: 4.7 ms at the last slice; post (final norm + lm_head) once
NPU_PREFILL_MS_FIRST, NPU_PREFILL_MS_LAST = 2.2, 4.7
NPU_POST_MS = 7.954


def _questions():
    from internvl_ros.core import Question

    return [Question(q["prompt"], choices=tuple(q.get("choices", ()))) for q in ASK_QUESTIONS]


def _answer_row(a, meter_delta=None) -> dict:
    tm = a.timings
    row = {"prompt": a.prompt, "success": a.success, "message": a.message, "text": a.text,
           "choice_index": a.choice_index, "finish_reason": a.finish_reason,
           "ttft_s": tm.ttft_s, "preprocess_s": tm.preprocess_s, "vit_s": tm.vit_s,
           "prefill_s": tm.prefill_s, "prompt_tokens": tm.prompt_tokens,
           "cached_prompt_tokens": tm.cached_prompt_tokens,
           "tokens": list(a.result.token_ids) if a.result is not None else []}
    if meter_delta is not None:
        row.update(meter_delta)
    return row


def _run(pipe, tokens: int, meter: Meter | None = None, vit_meter: Meter | None = None):
    """The Ask, the separate requests and the repeated Describe on one pipeline."""
    from internvl_ros.core import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=tokens)
    _ = pipe.generate(TEXT_QUESTION, system_prompt=WARMUP_SYSTEM,
                      config=GenerationConfig(max_new_tokens=2)).result  # warm-up
    image = bench_image(seed=1)
    questions = _questions()
    rows = []
    ask = pipe.ask(questions, images=[image], config=cfg)
    t0 = time.perf_counter()
    while True:
        before = (meter.snapshot(), vit_meter.snapshot()) if meter else None
        try:
            answer = next(ask)
        except StopIteration:
            break
        delta = None
        if meter:  # with max_new_tokens=1 these are the prefill's (and the ViT's) runs
            (r0, c0, b0), (v0, _, _) = before
            r1, c1, b1 = meter.snapshot()
            delta = {"session_s": r1 - r0, "session_calls": c1 - c0, "bytes_fed": b1 - b0,
                     "vit_session_s": vit_meter.snapshot()[0] - v0}
        rows.append(_answer_row(answer, delta))
    ask_wall = time.perf_counter() - t0
    # the same questions as separate requests: nothing reused
    separate = []
    for q in questions:
        pipe.reset()
        res = pipe.generate(q.prompt, images=[image], config=q.config(cfg)).result
        separate.append({"ttft_s": res.timings.ttft_s, "tokens": list(res.token_ids),
                         "cached_prompt_tokens": res.timings.cached_prompt_tokens})
    # a Describe twice on one frame key (another image: nothing of it is cached yet)
    image2, key = bench_image(seed=2), ("bench", "frame-2")
    describes = []
    for _ in range(2):
        res = pipe.generate(QUESTION, images=[image2], config=cfg, frame_key=key).result
        tm = res.timings
        describes.append({"ttft_s": tm.ttft_s, "vit_s": tm.vit_s, "prefill_s": tm.prefill_s,
                          "preprocess_s": tm.preprocess_s, "prompt_tokens": tm.prompt_tokens,
                          "cached_prompt_tokens": tm.cached_prompt_tokens,
                          "tokens": list(res.token_ids)})
    equal = sum(r["tokens"] == s["tokens"] for r, s in zip(rows, separate, strict=True))
    return {
        "answers": rows, "separate": separate, "describe": describes, "ask_wall_s": ask_wall,
        "tokens_per_answer": tokens,
        "ask_first_ttft_s": rows[0]["ttft_s"],
        "ask_followup_ttft_s": statistics.median(r["ttft_s"] for r in rows[1:]),
        "separate_ttft_s": statistics.median(s["ttft_s"] for s in separate),
        "describe_first_ttft_s": describes[0]["ttft_s"],
        "describe_repeat_ttft_s": describes[1]["ttft_s"],
        "ask_tokens_equal_separate": f"{equal}/{len(rows)}",
        "describe_repeat_tokens_equal": describes[0]["tokens"] == describes[1]["tokens"],
        "all_answers_ok": all(r["success"] for r in rows),
        "choice_answer_valid": rows[1]["text"] in ASK_QUESTIONS[1]["choices"],
    }


def task_host(a: dict) -> dict:
    from internvl_ros.core import Pipeline

    t0 = time.perf_counter()
    pipe = Pipeline.from_model_dir(a["model_dir"], backend="onnxruntime",
                                   num_threads=a["threads"])
    out = {"label": a["label"], "model_dir": a["model_dir"], "threads": a["threads"],
           "load_s": time.perf_counter() - t0}
    out.update(_run(pipe, a["tokens"]))
    pipe.close()
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


def task_npu(a: dict) -> dict:
    from internvl_ros.backends import fake_axengine
    from internvl_ros.core import Pipeline

    with fake_axengine.installed():
        pipe = Pipeline.from_model_dir(a["model_dir"], backend="axengine")
        meter = Meter()
        wrapped = wrap_pipeline(pipe, meter)
        llm = pipe.llm
        out = {"label": a["label"], "layers": len(llm.layers), "chunk": llm.chunk,
               "max_prefill": llm.max_prefill, "kv_dim": llm.config.kv_dim}
        # one token per answer: the meter deltas are the prefill's runs
        out.update(_run(pipe, 1, meter=meter, vit_meter=wrapped["vit"].meter))
        pipe.close()
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


TASKS = {"host": task_host, "npu": task_npu}


# --------------------------------------------------------------------------------------------
# report


def npu_prefill_ms(past: int, length: int, layers: int, chunk: int, max_prefill: int) -> float:
    """Seed NPU time of the prefill slices [past, length) and the post."""
    last = max(max_prefill - chunk, chunk)
    ms = 0.0
    for p in range(past, length, chunk):
        ms += layers * (NPU_PREFILL_MS_FIRST + (NPU_PREFILL_MS_LAST - NPU_PREFILL_MS_FIRST)
                        * min(p / last, 1.0))
    return ms + NPU_POST_MS


def project_npu(npu: dict, copy_rate: float) -> dict:
    """AX650N TTFT per answer: seed NPU time of the slices run + the measured host work (wall
    minus session time, the ViT's included) + the bytes fed at the assumed copy rate. The ViT's
    NPU time has no seed figure: it is left out, which favours the first question (so the
    projected ratio is an upper bound)."""
    rows = []
    for r in npu["answers"]:
        kept = r["cached_prompt_tokens"]
        slices = math.ceil((r["prompt_tokens"] - kept) / npu["chunk"])
        host_ms = 1e3 * (r["ttft_s"] - r["session_s"] - r["vit_session_s"])
        npu_ms = npu_prefill_ms(kept, r["prompt_tokens"], npu["layers"], npu["chunk"],
                                npu["max_prefill"])
        copy_ms = 1e3 * r["bytes_fed"] / copy_rate
        rows.append({"kept": kept, "slices": slices, "npu_ms": npu_ms, "host_ms": host_ms,
                     "copy_ms": copy_ms, "ttft_ms": npu_ms + host_ms + copy_ms})
    first, later = rows[0], rows[1:]
    follow = statistics.median(r["ttft_ms"] for r in later)
    return {"answers": rows, "first_ttft_ms": first["ttft_ms"], "followup_ttft_ms": follow,
            "followup_vs_first": follow / first["ttft_ms"], "copy_rate_bytes_s": copy_rate,
            "vit": "not included (no seed figure for the AX650N ViT)"}


def derive(host: dict, npu: dict, copy_rate: float) -> dict:
    """The report keys of issue 13 (host = the primary build on onnxruntime)."""
    ratio = host["ask_followup_ttft_s"] / host["ask_first_ttft_s"]
    proj = project_npu(npu, copy_rate)
    return {
        "ask": {"host": host, "npu": npu, "npu_projection": proj},
        "ask_first_ttft_s": host["ask_first_ttft_s"],
        "ask_followup_ttft_s": host["ask_followup_ttft_s"],
        "describe_repeat_ttft_s": host["describe_repeat_ttft_s"],
        "ask_followup_vs_first": ratio,
        "npu_ask_first_ttft_s": npu["ask_first_ttft_s"],
        "npu_ask_followup_ttft_s": npu["ask_followup_ttft_s"],
        "npu_describe_repeat_ttft_s": npu["describe_repeat_ttft_s"],
        "projected_ax650_ask_followup_vs_first": proj["followup_vs_first"],
        "ask_target": {"name": "Ask follow-up TTFT <= 20% of the first", "value": ratio,
                       "limit": TARGET_FOLLOWUP_RATIO, "op": "<=",
                       "met": ratio <= TARGET_FOLLOWUP_RATIO},
    }


def markdown(r: dict) -> str:
    host, npu, proj = r["ask"]["host"], r["ask"]["npu"], r["ask"]["npu_projection"]

    def s(x):
        return f"{x:.3g} s"

    lines = [
        "**Several questions about one frame** (an Ask of 3 questions on one 640x480 image; "
        "a Describe repeated on one frame key)", "",
        "| | host (onnxruntime) | axengine double | AX650N projection |", "|---|---|---|---|",
        f"| TTFT, first question | {s(host['ask_first_ttft_s'])} | "
        f"{s(npu['ask_first_ttft_s'])} | {proj['first_ttft_ms']:.0f} ms + ViT |",
        f"| TTFT, later questions (median) | {s(host['ask_followup_ttft_s'])} | "
        f"{s(npu['ask_followup_ttft_s'])} | {proj['followup_ttft_ms']:.0f} ms |",
        f"| follow-up / first | {100 * r['ask_followup_vs_first']:.1f}% | "
        f"{100 * npu['ask_followup_ttft_s'] / npu['ask_first_ttft_s']:.1f}% | "
        f"<= {100 * proj['followup_vs_first']:.1f}% |",
        f"| TTFT of the same questions as separate requests (median) | "
        f"{s(host['separate_ttft_s'])} | {s(npu['separate_ttft_s'])} | |",
        f"| Describe on a new frame / repeated on it | {s(host['describe_first_ttft_s'])} / "
        f"{s(host['describe_repeat_ttft_s'])} | {s(npu['describe_first_ttft_s'])} / "
        f"{s(npu['describe_repeat_ttft_s'])} | |",
        "| prompt tokens kept from the prefix (questions 2, 3) | " + ", ".join(
            f"{a['cached_prompt_tokens']}/{a['prompt_tokens']}" for a in host["answers"][1:])
        + " | " + ", ".join(f"{a['cached_prompt_tokens']}/{a['prompt_tokens']}"
                             for a in npu["answers"][1:]) + " | whole 128-row slices |",
        f"| greedy tokens equal to separate requests | {host['ask_tokens_equal_separate']} | "
        f"{npu['ask_tokens_equal_separate']} | |",
        f"| yes/no answer | {host['answers'][1]['text']!r} | {npu['answers'][1]['text']!r} | |",
        "",
        f"The projection: seed NPU time of the slices run ({NPU_PREFILL_MS_FIRST} to "
        f"{NPU_PREFILL_MS_LAST} ms per layer and slice, post {NPU_POST_MS} ms), host work "
        f"measured through the double, and the bytes fed at "
        f"{proj['copy_rate_bytes_s'] / 1e9:g} GB/s; the ViT's NPU time has no seed figure and "
        "is left out of the first question, so the real ratio is lower.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    return serve_worker(TASKS, "ask.py", argv)


if __name__ == "__main__":
    sys.exit(main())
