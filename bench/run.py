"""Benchmark: our pipeline (onnxruntime, float32 and int4) against transformers `generate`
(float32 and bfloat16) on the same weights, in one run, against the machine's memory-bandwidth
limit, with a projection of decode speed on the AX650N NPU.

    python bench/run.py --quick [--json PATH]     # tiny model, < 1 minute
    python bench/run.py --full  [--json PATH]     # InternVL3.5-1B shape, < 10 minutes on 2 cores

Prints a markdown table and writes the numbers to JSON (default bench/results/<mode>.json).
Method and results: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ask as ask_bench
import npu_feed
from bandwidth import measure_bandwidth
from common import CACHE_DIR, RESULTS_DIR, run_worker, write_json
from report import derive, markdown

#: seed README figures for the AX650N (NPU time only)
NPU_DECODE_MS_PER_LAYER = 0.987
NPU_POST_MS = 7.954
NPU_LAYERS = 28
#: Axera's measured decode of this Python path (full-cache feed; Gradio screenshots): ~217 ms
#: per token. The copy rate is calibrated on it (bench/report.py npu_projection).
VENDOR_FULL_MS_PER_TOKEN = 217.0
#: our quantised builds (bench/build.py VARIANTS, HOST_VARIANTS); the primary one carries the
#: issue's keys: the host layout's int8 (one graph, KV cache kept in the session)
QUANT_VARIANTS = ("host-q8", "host-q4", "q8", "q4")
PRIMARY = "host-q8"

MODES = {
    # tokens: new tokens per request (both sides); npu_tokens: decode tokens on the double
    "quick": dict(tokens=8, npu_tokens=6, bw_mib=256, bw_repeats=3, study_tokens=8,
                  anchor_rounds=1),
    "full": dict(tokens=32, npu_tokens=8, bw_mib=1024, bw_repeats=5, study_tokens=16,
                 anchor_rounds=3),
}


def machine_info() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "L3 cache",
                               "Flags"):
                value = value.strip()
                if key.strip() == "Flags":
                    value = " ".join(f for f in value.split()
                                     if f.startswith(("avx", "fma", "amx", "f16c", "vnni")))
                info[key.strip()] = value
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["mem_total_bytes"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    for dist in ("onnxruntime", "torch", "transformers", "numpy"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    info["OPENBLAS_CORETYPE"] = os.environ.get("OPENBLAS_CORETYPE")
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="tiny model (default)")
    mode.add_argument("--full", action="store_true", help="InternVL3.5-1B-shaped weights")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per request")
    ap.add_argument("--threads", type=int, default=2,
                    help="onnxruntime intra-op threads per session and torch threads")
    ap.add_argument("--copy-rate-gbs", type=float, default=None,
                    help="AX650N memmove+flush rate for the bytes fed (GB/s); default: "
                         "calibrated on Axera's measured ~217 ms/token full-feed decode")
    ap.add_argument("--skip-hf", action="store_true", help="skip transformers (debugging)")
    ap.add_argument("--no-thread-study", action="store_true",
                    help="skip the 1- vs 2-thread decode comparison")
    ap.add_argument("--llamacpp", action="store_true",
                    help="also run llama.cpp (llama-cpp-python) Q8_0/Q4_0 on the same weights, "
                         "alternating with our host builds (bench/llamacpp.py)")
    args = ap.parse_args(argv)
    mode_name = "full" if args.full else "quick"
    cfg = dict(MODES[mode_name])
    if args.tokens:
        cfg["tokens"] = args.tokens
    t_start = time.perf_counter()
    json_path = args.json or RESULTS_DIR / f"{mode_name}.json"

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    log(f"bench --{mode_name}: building or reusing the model dirs (cache {CACHE_DIR})")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=CACHE_DIR))
    try:
        t0 = time.perf_counter()
        build = _build(mode_name, work, log)
        build["wall_s"] = time.perf_counter() - t0

        log("measuring memory bandwidth")
        bw = measure_bandwidth(cfg["bw_mib"] << 20, cfg["bw_repeats"], threads=args.threads)

        n, th = cfg["tokens"], args.threads
        ref = str(work / "fp32_ref.npz")
        log(f"running the workers ({n} new tokens per request, {th} threads)")
        ours = {"fp32": run_worker("measure.py", "ours", dict(
            label="fp32", model_dir=build["onnx"], threads=th, tokens=n, capture=ref),
            work, timeout=900, log=log)}
        agreement = {}
        for variant in QUANT_VARIANTS:
            ours[variant] = run_worker("measure.py", "ours", dict(
                label=variant, model_dir=build[variant], threads=th, tokens=n), work,
                timeout=900, log=log)
            agreement[variant] = run_worker("measure.py", "agree", dict(
                label=variant, model_dir=build[variant], threads=th, reference=ref), work,
                timeout=600, log=log)
        study = {}
        if not args.no_thread_study:
            for threads in (1, 2):
                r = run_worker("measure.py", "ours", dict(
                    label=f"{PRIMARY}-study-{threads}t", decode_only=True,
                    model_dir=build[PRIMARY], threads=threads, tokens=cfg["study_tokens"]),
                    work, timeout=600, log=log)
                study[str(threads)] = {k: r[k] for k in (
                    "decode_tok_s", "session_ms_per_token", "overhead_ms_per_token",
                    "overhead_frac", "machine_load")}
        hf = {}
        if not args.skip_hf:
            for dtype in ("float32", "bfloat16"):
                hf[dtype] = run_worker("measure.py", "hf", dict(
                    label=dtype, hf_dir=build["hf"], dtype=dtype, threads=th, tokens=n),
                    work, timeout=1200, log=log)
        npu = run_worker("measure.py", "npu", dict(
            label="axera", model_dir=build["axera"], tokens=cfg["npu_tokens"]), work,
            timeout=900, log=log)
        npu["feed"] = run_worker("npu_feed.py", "feed", dict(label="kv", tokens=8), work,
                                 timeout=900, log=log)
        ask = {side: run_worker("ask.py", side, dict(
            label=side, model_dir=build[PRIMARY if side == "host" else "axera"], threads=th,
            tokens=ask_bench.ASK_TOKENS), work, timeout=900, log=log) for side in ("host", "npu")}
        anchor = None
        if args.llamacpp:
            from llamacpp import run_anchor

            anchor = run_anchor(build, ours[PRIMARY]["prompt_ids"], work, th, n,
                                cfg["anchor_rounds"], CACHE_DIR / mode_name, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    settings = {
        "mode": mode_name, "tokens": n, "threads": th,
        "ort_session": "intra_op threads = --threads, allow_spinning=0 (backend default), "
                       "sequential, ORT_ENABLE_ALL",
        "torch_threads": th, "eos": "ignored on both sides (exactly `tokens` new tokens)",
        "copy_rate_bytes_s": args.copy_rate_gbs * 1e9 if args.copy_rate_gbs else None,
        "vendor_full_ms_per_token": VENDOR_FULL_MS_PER_TOKEN,
        "npu_seed": {"decode_ms_per_layer": NPU_DECODE_MS_PER_LAYER, "layers": NPU_LAYERS,
                     "post_ms": NPU_POST_MS},
        "primary": PRIMARY, "study_variant": PRIMARY, "study_tokens": cfg["study_tokens"],
    }
    results = derive(settings=settings, machine=machine_info(), build=build, bandwidth=bw,
                     ours=ours, hf=hf, npu=npu, agreement=agreement, study=study,
                     anchor=anchor)
    results.update(npu_feed.summary(npu["feed"]))
    results.update(ask_bench.derive(ask["host"], ask["npu"],
                                     results["npu_projection"]["copy_rate_bytes_s"]))
    results["targets"].append(results["ask_target"])
    results["total_s"] = time.perf_counter() - t_start
    results["command"] = "python bench/run.py " + " ".join(argv if argv is not None
                                                            else sys.argv[1:])
    write_json(json_path, results)
    print(markdown(results) + "\n" + ask_bench.markdown(results))
    print(npu_feed.markdown(npu["feed"]))
    log(f"wrote {json_path} ({results['total_s']:.0f} s)")
    return 0


def _build(mode_name: str, work: Path, log) -> dict:
    """bench/build.py in a subprocess (the full-size build needs GBs that should be freed)."""
    from common import child_env, read_json

    out = work / "build.json"
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "build.py"), mode_name,
           "--json", str(out)]
    proc = subprocess.run(cmd, env=child_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError("model build failed:\n" + "\n".join(proc.stdout.splitlines()[-40:]))
    build = read_json(out)
    log("  build: " + ", ".join(f"{k} {v:.0f} s" + (" (cached)" if build["cached"].get(k) else "")
                                for k, v in build["build_s"].items()))
    return build


if __name__ == "__main__":
    sys.exit(main())
