"""Benchmark workers, one measurement per process (so peak RSS is not mixed):

    python bench/measure.py ours|hf|npu|agree ARGS.json OUT.json

- `ours`: our Pipeline on onnxruntime (a float32 or int4 model dir): TTFT (text, one image),
  ViT ms per tile, prefill tokens/s, decode tokens/s, host overhead and bytes fed per decode
  token, peak RSS.
- `hf`: transformers `InternVLForConditionalGeneration.generate` on the same weights (float32 or
  bfloat16), with the same prompt ids and pixel values.
- `npu`: our Pipeline with backend "axengine" over the axengine-contract double
  (`backends.fake_axengine`): host overhead and bytes fed per decode token on the NPU code path.
- `agree`: logits of a quantised build against float32 along the float32 greedy path
  (teacher-forced): cosine similarity and top-1 agreement.

Every request ignores eos (`common.disable_eos`, and eos_token_id=None for transformers), so
both sides generate exactly `tokens` new tokens.
"""

from __future__ import annotations

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
    disable_eos,
    ensure_import_path,
    peak_rss_bytes,
    serve_worker,
    wrap_pipeline,
)

ensure_import_path()


def model_files_bytes(model_dir: Path, backend: str = "onnxruntime") -> dict:
    """Bytes of the model files the runtime loads, by role (layers, post, vit, embeddings)."""
    from internvl_ros.core.modeldir import discover

    paths = discover(model_dir, backend)

    def size(p: Path) -> int:
        data = p.with_name(p.name + ".data")
        return p.stat().st_size + (data.stat().st_size if data.is_file() else 0)

    out = {"layers": sum(size(p) for p in paths.layers), "post": size(paths.post),
           "embeddings": paths.embeddings.stat().st_size,
           "vit": size(paths.vit) if paths.vit is not None else 0}
    out["total"] = sum(out.values())
    return out


def _decode_loop(gen, meter: Meter) -> tuple:
    """Run the prefill step, then time each decode step.

    Returns (bytes by input name fed by the decode steps or None, [(wall, run, bytes)]).
    """
    next(gen)
    start = dict(meter.by_input) if meter.by_input is not None else None
    steps = []
    while True:
        r0, _, b0 = meter.snapshot()
        t = time.perf_counter()
        try:
            next(gen)
        except StopIteration:
            break
        wall = time.perf_counter() - t
        r1, _, b1 = meter.snapshot()
        steps.append((wall, r1 - r0, b1 - b0))
    by_input = None
    if start is not None:
        by_input = {k: v - start.get(k, 0) for k, v in meter.by_input.items()}
    return by_input, steps


def _decode_stats(steps: list) -> dict:
    walls = [s[0] for s in steps]
    runs = [s[1] for s in steps]
    over = [w - r for w, r, _ in steps]
    return {
        "decode_steps": len(steps),
        "decode_tok_s": 1.0 / statistics.median(walls) if steps else None,
        "decode_tok_s_mean": len(steps) / sum(walls) if steps else None,
        "decode_ms_median": 1e3 * statistics.median(walls) if steps else None,
        "session_ms_per_token": 1e3 * sum(runs) / len(steps) if steps else None,
        "overhead_ms_per_token": 1e3 * sum(over) / len(steps) if steps else None,
        "overhead_ms_median": 1e3 * statistics.median(over) if steps else None,
        "overhead_frac": sum(over) / sum(runs) if steps else None,
        "bytes_fed_per_token": sum(s[2] for s in steps) / len(steps) if steps else None,
    }


# --------------------------------------------------------------------------------------------


def task_ours(a: dict) -> dict:
    """Our pipeline on onnxruntime."""
    import numpy as np

    from internvl_ros.core import GenerationConfig, Pipeline

    t0 = time.perf_counter()
    pipe = Pipeline.from_model_dir(a["model_dir"], backend="onnxruntime",
                                   num_threads=a["threads"])
    load_s = time.perf_counter() - t0
    meter = Meter()
    wrapped = wrap_pipeline(pipe, meter, capture_logits=a.get("capture", False),
                            capture_vit=a.get("capture", False))
    disable_eos(pipe)
    n = a["tokens"]
    emb = pipe.llm.embeddings  # (vocab, hidden), memory-mapped
    out = {"label": a["label"], "model_dir": a["model_dir"], "threads": a["threads"],
           "load_s": load_s, "files": model_files_bytes(Path(a["model_dir"])),
           "embed_row_bytes": int(emb.shape[1] * emb.dtype.itemsize)}

    _ = pipe.generate(TEXT_QUESTION, system_prompt=WARMUP_SYSTEM,
                      config=GenerationConfig(max_new_tokens=2)).result  # warm-up
    if a.get("decode_only"):  # thread study: text prompt, decode speed of a second request
        for _ in range(2):  # the first one grows onnxruntime's arenas to this context
            gen = pipe.generate(TEXT_QUESTION, config=GenerationConfig(max_new_tokens=n))
            _, steps = _decode_loop(gen, meter)
        out.update(_decode_stats(steps))
        out["peak_rss_bytes"] = peak_rss_bytes()
        return out

    res = pipe.generate(TEXT_QUESTION, config=GenerationConfig(max_new_tokens=2)).result
    out["ttft_text_s"] = res.timings.ttft_s
    out["text_prompt_tokens"] = res.timings.prompt_tokens

    image = bench_image()
    wrapped["post"].captured.clear()
    gen = pipe.generate(QUESTION, images=[image], config=GenerationConfig(max_new_tokens=n))
    _, steps = _decode_loop(gen, meter)
    res = gen.result
    tm = res.timings
    out.update(_decode_stats(steps))
    out.update({
        "ttft_image_s": tm.ttft_s,
        "vit_ms_per_tile": 1e3 * tm.vit_s / max(tm.image_tiles, 1),
        "prefill_s": tm.prefill_s,
        "prefill_tok_s": tm.prompt_tokens / tm.prefill_s,
        "image_prompt_tokens": tm.prompt_tokens,
        "preprocess_s": tm.preprocess_s,
        "tokens": list(res.token_ids),
        "prompt_ids": list(res.prompt_token_ids),
    })
    if a.get("capture"):
        logits = np.concatenate([x.reshape(1, -1) for x in wrapped["post"].captured])
        feats = wrapped["vit"].captured[-1]  # (1, 256, hidden)
        np.savez(a["capture"], logits=logits.astype(np.float32), feats=feats,
                 tokens=np.asarray(res.token_ids), prompt=np.asarray(res.prompt_token_ids))
    pipe.close()
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


def task_agree(a: dict) -> dict:
    """Teacher-forced logits of a (quantised) build along the reference greedy path."""
    import numpy as np

    from internvl_ros.core import Pipeline

    ref = np.load(a["reference"])
    pipe = Pipeline.from_model_dir(a["model_dir"], backend="onnxruntime",
                                   num_threads=a["threads"])
    llm = pipe.llm
    prompt = [int(t) for t in ref["prompt"]]
    embeds = llm.embed(prompt)  # (L, hidden)
    where = np.flatnonzero(np.asarray(prompt) == pipe.tokenizer.img_context_id)
    embeds[where] = ref["feats"].reshape(-1, embeds.shape[1])  # float32 ViT features
    logits = [llm.prefill(embeds)]
    for t in ref["tokens"][:-1]:
        logits.append(llm.decode(int(t)))
    q = np.stack(logits)  # (T, vocab)
    f = ref["logits"][:len(q)]  # (T, vocab)
    cos = (q * f).sum(-1) / (np.linalg.norm(q, axis=-1) * np.linalg.norm(f, axis=-1))
    top1 = q.argmax(-1) == f.argmax(-1)
    pipe.close()
    return {"label": a["label"], "positions": len(q), "cosine_mean": float(cos.mean()),
            "cosine_min": float(cos.min()), "top1_agreement": float(top1.mean()),
            "max_abs_logit_diff": float(np.abs(q - f).max()),
            "logit_std": float(f.std())}


# --------------------------------------------------------------------------------------------


class _Stamps:
    """A transformers streamer that records when each new token arrives."""

    def __init__(self):
        self.times = []
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:  # generate() first puts the prompt ids
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self):
        pass


def task_hf(a: dict) -> dict:
    """transformers InternVLForConditionalGeneration.generate on the same checkpoint."""
    import numpy as np
    import torch
    import transformers
    from transformers import InternVLForConditionalGeneration

    from internvl_ros.core import Tokenizer, build_prompt_ids, preprocess_image

    torch.set_num_threads(a["threads"])
    transformers.utils.logging.disable_progress_bar()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[a["dtype"]]
    hf_dir = Path(a["hf_dir"])
    t0 = time.perf_counter()
    model = InternVLForConditionalGeneration.from_pretrained(str(hf_dir), dtype=dtype).eval()
    load_s = time.perf_counter() - t0
    model.generation_config.eos_token_id = None  # exactly `tokens` new tokens, as ours
    tok = Tokenizer.from_path(hf_dir / "tokenizer.json", hf_dir=hf_dir)
    n = a["tokens"]

    # time the vision tower + projector and each language-model forward inside generate()
    marks = {"vit": [], "lm": []}
    inner = model.model
    inner.vision_tower.register_forward_pre_hook(
        lambda m, i: marks["vit"].append([time.perf_counter(), None]))
    inner.multi_modal_projector.register_forward_hook(
        lambda m, i, o: marks["vit"][-1].__setitem__(1, time.perf_counter()))
    inner.language_model.register_forward_pre_hook(
        lambda m, i: marks["lm"].append([time.perf_counter(), None]))
    inner.language_model.register_forward_hook(
        lambda m, i, o: marks["lm"][-1].__setitem__(1, time.perf_counter()))

    def generate(question, images, new_tokens, system_prompt=None):
        for v in marks.values():
            v.clear()
        stamps = _Stamps()
        t_start = time.perf_counter()
        pixels = [preprocess_image(img) for img in images]  # (1, 3, 448, 448) each
        ids = build_prompt_ids(tok, question, [len(p) for p in pixels],
                               system_prompt=system_prompt)
        kwargs = {}
        if pixels:
            kwargs["pixel_values"] = torch.from_numpy(np.concatenate(pixels)).to(dtype)
        input_ids = torch.tensor([ids], dtype=torch.long)  # (1, L)
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 do_sample=False, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, eos_token_id=None,
                                 pad_token_id=0, streamer=stamps, **kwargs)
        new = out[0, len(ids):].tolist()
        if len(new) != new_tokens:
            raise RuntimeError(f"transformers generated {len(new)} tokens, not {new_tokens}")
        return t_start, stamps.times, new, ids

    generate(TEXT_QUESTION, [], 2, WARMUP_SYSTEM)  # warm-up
    t_start, times, _, ids = generate(TEXT_QUESTION, [], 2)
    out = {"label": a["label"], "dtype": a["dtype"], "threads": a["threads"], "load_s": load_s,
           "ttft_text_s": times[0] - t_start, "text_prompt_tokens": len(ids)}
    t_start, times, new, ids = generate(QUESTION, [bench_image()], n)
    vit = [e - s for s, e in marks["vit"] if e is not None]
    lm = [e - s for s, e in marks["lm"] if e is not None]
    decode = times[-1] - times[0]
    gaps = np.diff(times)  # (n - 1,) seconds per decode token
    out.update({
        "ttft_image_s": times[0] - t_start,
        "vit_ms_per_tile": 1e3 * vit[0] if vit else None,
        "prefill_s": lm[0],
        "prefill_tok_s": len(ids) / lm[0],
        "image_prompt_tokens": len(ids),
        "decode_steps": len(gaps),
        "decode_tok_s": 1.0 / float(np.median(gaps)) if len(gaps) else None,
        "decode_tok_s_mean": len(gaps) / decode if len(gaps) else None,
        "decode_ms_median": 1e3 * float(np.median(gaps)) if len(gaps) else None,
        "tokens": new,
        "files_bytes": sum(p.stat().st_size for p in hf_dir.glob("*.safetensors")),
        "peak_rss_bytes": peak_rss_bytes(),
    })
    return out


# --------------------------------------------------------------------------------------------


def task_npu(a: dict) -> dict:
    """The NPU code path (fixed shape groups, bf16, full-cache decode feed) over the double."""
    from internvl_ros.backends import fake_axengine
    from internvl_ros.core import GenerationConfig, Pipeline

    with fake_axengine.installed():
        # kv_feed="full": the wrappers count what run() is fed (bench/npu_feed.py: rows mode)
        pipe = Pipeline.from_model_dir(a["model_dir"], backend="axengine", kv_feed="full")
        meter = Meter(by_input=True)
        wrap_pipeline(pipe, meter)
        disable_eos(pipe)
        _ = pipe.generate(TEXT_QUESTION, system_prompt=WARMUP_SYSTEM,
                          config=GenerationConfig(max_new_tokens=2)).result
        gen = pipe.generate(TEXT_QUESTION, config=GenerationConfig(max_new_tokens=a["tokens"]))
        by_input, steps = _decode_loop(gen, meter)
        res = gen.result
        llm = pipe.llm
        out = {"label": a["label"], "prompt_tokens": res.timings.prompt_tokens,
               "kv_cache_len": llm.decode_cache_len, "kv_dim": llm.config.kv_dim,
               "cache_dtype": str(llm.cache_dtype), "layers": len(llm.layers)}
        out.update(_decode_stats(steps))
        out["bytes_by_input_per_token"] = {k: v / len(steps) for k, v in by_input.items()}
        pipe.close()
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


TASKS = {"ours": task_ours, "hf": task_hf, "npu": task_npu, "agree": task_agree}


def main(argv=None) -> int:
    return serve_worker(TASKS, "measure.py", argv)


if __name__ == "__main__":
    sys.exit(main())
