"""internvl-caption: describe images or a video offline, from the command line.

    internvl-caption --model-dir DIR --image a.jpg --prompt "What is in front of the robot?"
    internvl-caption --model-dir AXERA_ROOT --backend axengine --image a.jpg --prompt ... --stream
    internvl-caption --model-dir AXERA_ROOT --backend axengine --kv-feed rows --json ...
    internvl-caption --model-dir DIR --video clip.mp4 --prompt ... --json

--video samples as many frames as fit the model's prompt limit, at most 8 (256 image tokens
each: 4 on the AX650N build, 7 with the host's default 2048-token context); --frames N sets it.

Errors of the runtime print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="internvl-caption", description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", required=True,
                   help="host export dir, or the root of the AXERA-TECH download")
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "axengine"))
    p.add_argument("--provider", default=None,
                   help="onnxruntime execution provider, or AxEngineExecutionProvider / "
                        "AXCLRTExecutionProvider")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--kv-feed", default="auto", choices=("auto", "full", "rows"),
                   help="NPU only: feed the whole KV cache every step (full) or only the new "
                        "rows (rows); auto = rows where the runtime allows it and its "
                        "self-check passes. --json reports the mode really used")
    p.add_argument("--device-id", type=int, default=None,
                   help="the Axera M.2 card to use (AXCLRTExecutionProvider; default: card 0)")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image file (repeat for several images)")
    p.add_argument("--video", default=None, metavar="PATH", help="a video file")
    p.add_argument("--frames", type=int, default=None,
                   help="frames sampled from --video (default: as many as fit the prompt "
                        "limit, at most 8: 4 on the AX650N build, 7 on the host's 2048-token "
                        "context)")
    p.add_argument("--max-tiles", type=int, default=1,
                   help="max 448x448 tiles per image (dynamic tiling; 1 on the AX650N)")
    p.add_argument("--prompt", required=True, help="the question")
    p.add_argument("--system-prompt", default=None, help="default: InternVL's")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="penalty on tokens already generated (1 = off)")
    p.add_argument("--penalize-prompt", action="store_true",
                   help="the repetition penalty also covers the prompt's tokens")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-context", type=int, default=None,
                   help="context window in tokens (host default 2048; NPU: the build's)")
    p.add_argument("--stream", action="store_true",
                   help="print text as it is generated (to stderr with --json)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the result")
    return p


def run(args: argparse.Namespace) -> int:
    from internvl_ros.core import GenerationConfig, Pipeline, load_image, sample_video_frames
    from internvl_ros.core.errors import ImageDecodeError

    if args.image and args.video:
        raise ImageDecodeError("use either --image or --video, not both")
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p,
                              repetition_penalty=args.repetition_penalty, seed=args.seed,
                              penalize_prompt=args.penalize_prompt)
    images, video = [], bool(args.video)
    if video:  # fail before loading the model
        if not Path(args.video).is_file():
            raise ImageDecodeError(f"video file {args.video} does not exist")
        if args.frames is not None and args.frames < 1:
            raise ImageDecodeError(f"--frames {args.frames}: must be >= 1")
    else:
        images = [load_image(p) for p in args.image]
    pipe = Pipeline.from_model_dir(args.model_dir, backend=args.backend, provider=args.provider,
                                   num_threads=args.threads, max_context=args.max_context,
                                   max_tiles=args.max_tiles, kv_feed=args.kv_feed,
                                   device_id=args.device_id)
    try:
        if video:
            frames = args.frames
            if frames is None:  # as many as fit; none fitting is reported by generate()
                frames = max(1, pipe.fit_frames(args.prompt, args.system_prompt))
            images = sample_video_frames(args.video, frames)
        gen = pipe.generate(args.prompt, images=images, video=video,
                            system_prompt=args.system_prompt, config=config)
        out = sys.stderr if args.json else sys.stdout
        for step in gen:
            if args.stream and step.text_delta:
                out.write(step.text_delta)
                out.flush()
        result = gen.result
        kv_feed = pipe.kv_feed.to_dict()  # after the run: a failed self-check shows here
    finally:
        pipe.close()
    if args.stream:
        out.write(result.text_tail + "\n")
        out.flush()
    if args.json:
        record = result.to_dict()
        record["backend"] = args.backend
        record["kv_feed"] = kv_feed
        print(json.dumps(record, ensure_ascii=False))
    elif not args.stream:
        print(result.text)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from internvl_ros.core.errors import InternVLError

    try:
        return run(args)
    except InternVLError as exc:
        print(f"internvl-caption: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("internvl-caption: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
