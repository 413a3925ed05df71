"""The llama.cpp anchor (opt-in: `make bench-full LLAMACPP=1`): llama.cpp on the same weights.

    python bench/llamacpp.py llamacpp ARGS.json OUT.json     # one measurement (a bench worker)

- llama.cpp comes from PyPI: `llama-cpp-python`, built from its sdist by pip (the Makefile
  installs it into .venv; about 9 minutes on 2 cores, then pip's wheel cache has it).
- The language model of the benchmark checkpoint is written out as a plain Qwen3ForCausalLM
  folder (`lm_checkpoint`) and converted with the `convert_hf_to_gguf.py` that the same
  version's sdist ships (`pip download --no-binary :all:`, unpacked under .cache). The tiny
  benchmark tokenizer is a locally trained BPE whose pre-tokenizer hash llama.cpp cannot know,
  so the converter is told it is Qwen2's ("qwen2", which Qwen3 uses too); the token ids are
  only fed, never re-tokenised, so this changes nothing measured.
- f16 GGUF from the converter, then Q8_0 and Q4_0 with llama.cpp's own quantiser
  (`llama_model_quantize`, default parameters: as `llama-quantize`, the output matrix of Q4_0
  gets a higher-precision type).
- The worker feeds the same prompt ids as our image request (about 455 tokens), times the
  prefill, then `tokens` greedy decode steps of one token each (median step = decode tok/s),
  with n_threads = n_threads_batch = our --threads.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE_DIR, child_env, ensure_import_path, peak_rss_bytes, serve_worker

ensure_import_path()

DIST = "llama-cpp-python"
VARIANTS = {"q8": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4": "LLAMA_FTYPE_MOSTLY_Q4_0"}


def version() -> str | None:
    """The installed llama-cpp-python version, None when it is not installed."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None
    return metadata.version(DIST)


def converter_dir(cache: Path) -> Path:
    """vendor/llama.cpp of the installed version's sdist (convert_hf_to_gguf.py + gguf-py)."""
    ver = version()
    root = cache / f"llama-cpp-python-{ver}-sdist"
    llama_dir = root / f"llama_cpp_python-{ver}" / "vendor" / "llama.cpp"
    if (llama_dir / "convert_hf_to_gguf.py").is_file():
        return llama_dir
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--no-binary", ":all:", f"{DIST}=={ver}", "-d", str(root)], check=True)
    (sdist,) = root.glob("*.tar.gz")
    prefix = f"llama_cpp_python-{ver}/vendor/llama.cpp/"
    keep = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers()
                   if m.name.startswith(prefix) and m.name[len(prefix):].startswith(keep)]
        tar.extractall(root, members=members, filter="data")
    sdist.unlink()
    return llama_dir


def lm_checkpoint(hf_dir: Path, out: Path) -> Path:
    """The language model of an InternVL checkpoint as a Qwen3ForCausalLM folder (float16)."""
    import numpy as np
    from safetensors.numpy import save_file

    from internvl_ros.export.checkpoint import Weights

    cfg = json.loads((hf_dir / "config.json").read_text())
    text = dict(cfg.get("text_config") or cfg["llm_config"])
    text.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3",
                torch_dtype="float16")
    weights = Weights(hf_dir)
    tensors = {}
    for name in weights.names():
        if name.startswith("lm."):
            tensors["model." + name[3:]] = weights.get(name).astype(np.float16)
        elif name.startswith("lm_head."):
            tensors[name] = weights.get(name).astype(np.float16)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(text, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json", "vocab.json", "merges.txt"):
        if (hf_dir / f).is_file():
            shutil.copyfile(hf_dir / f, out / f)
    return out


_CONVERT = """
import sys
sys.path[:0] = [{d!r}, {d!r} + "/gguf-py"]
from conversion import base
for cls in vars(base).values():  # the tiny tokenizer's pre-tokenizer is Qwen2's byte BPE
    if isinstance(cls, type) and "get_vocab_base_pre" in vars(cls):
        cls.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", {src!r}, "--outfile", {out!r}, "--outtype", "f16"]
convert_hf_to_gguf.main()
"""


def quantize(src: Path, dst: Path, ftype_name: str, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype_name)
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                        ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {ftype_name} failed ({rc})")


def build(hf_dir: Path, root: Path, threads: int = 2, log=print) -> dict:
    """Q8_0 and Q4_0 GGUF files of `hf_dir`'s language model, cached in `root`."""
    done = root / "BUILD_OK"
    out = {k: root / f"lm-{k}.gguf" for k in VARIANTS}
    if done.is_file():
        return out
    log(f"  building llama.cpp GGUF files -> {root}")
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    lm = lm_checkpoint(hf_dir, root / "lm-hf")
    f16 = root / "lm-f16.gguf"
    d = str(converter_dir(CACHE_DIR))
    proc = subprocess.run([sys.executable, "-c", _CONVERT.format(d=d, src=str(lm),
                                                                 out=str(f16))],
                          env=child_env(threads), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError("convert_hf_to_gguf.py failed:\n" + proc.stderr[-3000:])
    shutil.rmtree(lm)
    for name, ftype in VARIANTS.items():
        quantize(f16, out[name], ftype, threads)
    f16.unlink()
    done.write_text("ok\n")
    return out


def task_llamacpp(a: dict) -> dict:
    """Prefill of the prompt ids, then greedy decode of single tokens, timed per step."""
    import llama_cpp
    import numpy as np

    th = a["threads"]
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=a["gguf"], n_ctx=2048, n_batch=512, n_ubatch=512,
                          n_threads=th, n_threads_batch=th, verbose=False)
    load_s = time.perf_counter() - t0
    ids = [int(t) for t in a["prompt_ids"]]
    llm.eval(ids[:32])  # warm-up
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids)
    prefill_s = time.perf_counter() - t
    def last_logits():  # llama-cpp-python keeps no scores unless logits_all: read the row
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))

    steps, tokens = [], []
    for _ in range(a["tokens"]):
        tok = int(np.argmax(last_logits()))
        tokens.append(tok)
        t = time.perf_counter()
        llm.eval([tok])
        steps.append(time.perf_counter() - t)
    return {"label": a["label"], "threads": th, "gguf": a["gguf"],
            "gguf_bytes": Path(a["gguf"]).stat().st_size, "load_s": load_s,
            "prompt_tokens": len(ids), "prefill_s": prefill_s,
            "prefill_tok_s": len(ids) / prefill_s, "decode_steps": len(steps),
            "decode_tok_s": 1.0 / statistics.median(steps),
            "decode_tok_s_mean": len(steps) / sum(steps), "tokens": tokens,
            "llama_cpp_python": metadata.version(DIST), "peak_rss_bytes": peak_rss_bytes()}


#: (our build, llama.cpp build) pairs of the anchor, and the JSON key stems
PAIRS = (("host-q8", "q8"), ("host-q4", "q4"))


def run_anchor(build: dict, prompt_ids: list, work: Path, threads: int, tokens: int,
               rounds: int, cache: Path, log=print) -> dict:
    """Build the GGUFs, then `rounds` rounds of alternating runs (llama.cpp and ours on the
    same prompt ids, the order flipped every round); medians of each side and their ratios."""
    from common import run_worker

    ver = version()
    if ver is None:
        raise RuntimeError("llama-cpp-python is not installed; run `make bench-full "
                           "LLAMACPP=1` (it installs it into .venv) or pip install "
                           f"{DIST} into this interpreter")
    t0 = time.perf_counter()
    ggufs = build_cached(Path(build["hf"]), cache, ver, threads, log)
    build_s = time.perf_counter() - t0
    runs = {side: {k: [] for k in VARIANTS} for side in ("ours", "llamacpp")}
    for r in range(rounds):
        for ours_name, name in PAIRS:
            common_args = dict(threads=threads, tokens=tokens, prompt_ids=prompt_ids)
            jobs = [("llamacpp", "llamacpp.py", "llamacpp",
                     dict(label=f"{name}-r{r}", gguf=str(ggufs[name]), **common_args)),
                    ("ours", "host.py", "ours_ids",
                     dict(label=f"{ours_name}-ids-r{r}", model_dir=build[ours_name],
                          **common_args))]
            for side, script, task, args in (jobs if r % 2 == 0 else jobs[::-1]):
                runs[side][name].append(run_worker(script, task, args, work, timeout=900,
                                                   log=log))
    return summarize(runs, threads, ver, build_s)


def build_cached(hf_dir: Path, cache: Path, ver: str, threads: int, log) -> dict:
    import hashlib

    h = hashlib.sha256(f"{hf_dir.resolve()}|{ver}|{sorted(VARIANTS.items())}".encode())
    return build(hf_dir, cache / f"llamacpp-{h.hexdigest()[:12]}", threads, log)


def _median(runs: list, key: str):
    vals = [x[key] for x in runs if x.get(key) is not None]
    return statistics.median(vals) if vals else None


def summarize(runs: dict, threads: int, ver: str, build_s: float) -> dict:
    """The issue's JSON keys (medians over the rounds) and the per-run detail."""
    out = {"llamacpp_threads": threads, "llamacpp_version": ver, "llamacpp_build_s": build_s,
           "llamacpp_rounds": len(runs["ours"]["q8"]), "llamacpp_runs": runs}
    for _, name in PAIRS:
        ll, ours = runs["llamacpp"][name], runs["ours"][name]
        for what in ("decode", "prefill"):
            a, b = _median(ours, f"{what}_tok_s"), _median(ll, f"{what}_tok_s")
            out[f"llamacpp_{name}_{what}_tok_s"] = b
            out[f"ours_host_{name}_{what}_tok_s"] = a
            stem = f"{what}_vs_llamacpp_q8" if name == "q8" else f"q4_{what}_vs_llamacpp_q4"
            out[stem] = a / b if a and b else None
        out[f"llamacpp_{name}_gguf_bytes"] = ll[0]["gguf_bytes"] if ll else None
        out[f"llamacpp_{name}_others_cpu"] = [x["machine_load"]["others_frac"]
                                              for x in ll + ours if x.get("machine_load")]
    return out


def markdown_lines(r: dict) -> list:
    """The anchor table of the report."""
    def f(x):
        return "n/a" if x is None else f"{x:.3g}"

    lines = [f"**llama.cpp anchor** (llama-cpp-python {r['llamacpp_version']}, same weights, "
             f"same prompt ids, {r['llamacpp_threads']} threads on both sides, "
             f"{r['llamacpp_rounds']} alternating rounds, medians)", "",
             "| build | decode tok/s | prefill tok/s | ours host vs llama.cpp (decode) | "
             "(prefill) | other processes' CPU use |", "|---|---|---|---|---|---|"]
    for _, name in PAIRS:
        label = {"q8": "Q8_0 vs our int8", "q4": "Q4_0 vs our int4"}[name]
        dec = r["decode_vs_llamacpp_q8"] if name == "q8" else r["q4_decode_vs_llamacpp_q4"]
        pre = r["prefill_vs_llamacpp_q8"] if name == "q8" else r["q4_prefill_vs_llamacpp_q4"]
        load = r[f"llamacpp_{name}_others_cpu"]
        lines.append(f"| llama.cpp {label.split()[0]} | {f(r[f'llamacpp_{name}_decode_tok_s'])} "
                     f"| {f(r[f'llamacpp_{name}_prefill_tok_s'])} | {f(dec)}x | {f(pre)}x | "
                     + (f"{100 * min(load):.0f}-{100 * max(load):.0f}%" if load else "n/a")
                     + " |")
        lines.append(f"| ours host {label.split()[-1]} | "
                     f"{f(r[f'ours_host_{name}_decode_tok_s'])} | "
                     f"{f(r[f'ours_host_{name}_prefill_tok_s'])} | | | |")
    return lines + [""]


if __name__ == "__main__":
    sys.exit(serve_worker({"llamacpp": task_llamacpp}, "llamacpp.py"))
