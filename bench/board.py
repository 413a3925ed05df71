"""On the AX650N board (or a host with an Axera M.2 card): decode tok/s and TTFT with
kv_feed=full and kv_feed=rows side by side, and whether the rows self-check passed.

    python3 bench/board.py --model-dir ~/InternVL3_5-1B_GPTQ_INT4
    python3 bench/board.py --model-dir ~/InternVL3_5-1B_GPTQ_INT4 --device-id 0   # M.2 card
    python3 bench/board.py --model-dir ... --image photo.jpg --tokens 128 --json board.json

Each mode loads the pipeline, runs one short warm-up request, then `--runs` requests of one
image and a question with exactly `--tokens` new tokens (eos ignored, greedy), and reports the
medians. The rows pipeline checks itself (rows vs full, bit for bit) on its first decode steps
and then every `--verify-every` steps; "self-check" says whether it stayed in rows mode.
Needs only the runtime (numpy, OpenCV, tokenizers, pyaxengine): no torch. `--fake` runs it
through the pyaxengine double instead (CI; the numbers then mean nothing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_image, disable_eos, ensure_import_path

ensure_import_path()

QUESTION = "Describe the scene in front of the robot in detail."


def run_mode(args, mode: str, image) -> dict:
    from internvl_ros.core import GenerationConfig, Pipeline

    pipe = Pipeline.from_model_dir(args.model_dir, backend="axengine", provider=args.provider,
                                   device_id=args.device_id, kv_feed=mode)
    try:
        if args.verify_every is not None:
            pipe.llm.feeder.verify_every = args.verify_every
        disable_eos(pipe)
        _ = pipe.generate(QUESTION, images=[image],
                          config=GenerationConfig(max_new_tokens=4)).result  # warm-up
        runs = []
        for _ in range(args.runs):
            res = pipe.generate(QUESTION, images=[image],
                                config=GenerationConfig(max_new_tokens=args.tokens)).result
            runs.append(res)
        status = pipe.kv_feed.to_dict()
    finally:
        pipe.close()
    return {
        "mode": mode, "kv_feed": status,
        "decode_tok_s": statistics.median(r.timings.decode_tokens_per_s for r in runs),
        "ttft_s": statistics.median(r.timings.ttft_s for r in runs),
        "prefill_s": statistics.median(r.timings.prefill_s for r in runs),
        "vit_s": statistics.median(r.timings.vit_s for r in runs),
        "prompt_tokens": runs[0].timings.prompt_tokens,
        "generated_tokens": runs[0].timings.generated_tokens,
        "token_ids": runs[0].token_ids,
        "text": runs[0].text,
    }


def table(full: dict, rows: dict) -> str:
    st = rows["kv_feed"]
    check = ("passed" if st["mode"] == "rows" else "FAILED") + \
        f" ({st['verified_steps']} checked steps; {st['reason']})"
    same = "yes" if full["token_ids"] == rows["token_ids"] else "**no**"
    lines = ["| | kv_feed=full | kv_feed=rows |", "|---|---|---|",
             f"| decode tok/s (median) | {full['decode_tok_s']:.2f} | {rows['decode_tok_s']:.2f} |",
             f"| TTFT s (median; ViT + prefill) | {full['ttft_s']:.3f} | {rows['ttft_s']:.3f} |",
             f"| prefill s | {full['prefill_s']:.3f} | {rows['prefill_s']:.3f} |",
             f"| mode in use | {full['kv_feed']['mode']} | {st['mode']} |",
             "", f"prompt {full['prompt_tokens']} tokens, {full['generated_tokens']} new tokens; "
             f"same tokens in both modes: {same}; rows self-check: {check}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", required=True, help="root of the AXERA-TECH download")
    ap.add_argument("--provider", default=None,
                    help="AxEngineExecutionProvider (board) or AXCLRTExecutionProvider (card)")
    ap.add_argument("--device-id", type=int, default=None, help="the M.2 card")
    ap.add_argument("--image", default=None, help="an image file (default: a synthetic one)")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument("--runs", type=int, default=3, help="measured requests per mode")
    ap.add_argument("--verify-every", type=int, default=None,
                    help="rows self-check interval in decode steps (default 64)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--fake", action="store_true", help="use the pyaxengine double (CI)")
    args = ap.parse_args(argv)

    from internvl_ros.core import load_image

    image = load_image(args.image) if args.image else bench_image()
    if args.fake:
        from internvl_ros.backends import fake_axengine

        fake_axengine.install()
    results = {mode: run_mode(args, mode, image) for mode in ("full", "rows")}
    print(table(results["full"], results["rows"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if results["rows"]["kv_feed"]["mode"] == "rows" else 1


if __name__ == "__main__":
    sys.exit(main())
