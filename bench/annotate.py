"""What an annotated image adds per caption: drawing (core/annotate.py) and building the bgr8
sensor_msgs/Image (ros/outputs.py ``image_msg``), at 640x480 and 1920x1080.

The node does this on its own drawing thread, after the caption was published, so neither image
intake nor the answer waits for it; this is the CPU time it costs (target: <= 10 ms at 1080p).
A two-line caption and three boxes; the median and the slowest of the repeats.

    python bench/annotate.py [--repeats 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from common import ensure_import_path, write_json

CAPTION = ("A person in a red jacket stands next to a wooden table with two chairs; a cup and a "
           "laptop are on the table, and a door is open behind them.")


def measure(width: int, height: int, repeats: int) -> dict:
    from internvl_ros.core.annotate import annotate
    from internvl_ros.core.grounding import parse_grounding
    from internvl_ros.ros.outputs import image_msg

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    boxes = parse_grounding("<ref>a cup</ref><box>[[100, 200, 300, 400]]</box> "
                            "<ref>chairs</ref><box>[[500, 500, 700, 900], [750, 500, 950, 900]]"
                            "</box>", width, height).boxes
    draw, total = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        bgr = annotate(rgb, CAPTION, boxes)
        t1 = time.perf_counter()
        image_msg(bgr, None)
        t2 = time.perf_counter()
        draw.append(t1 - t0)
        total.append(t2 - t0)
    ms = lambda xs: round(1000 * statistics.median(xs), 2)  # noqa: E731
    return {"size": f"{width}x{height}", "draw_ms": ms(draw), "draw_and_msg_ms": ms(total),
            "slowest_ms": round(1000 * max(total), 2), "repeats": repeats}


def main(argv=None) -> int:
    ensure_import_path()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    rows = [measure(640, 480, args.repeats), measure(1920, 1080, args.repeats)]
    print("| frame | draw (ms, median) | draw + Image msg (ms, median) | slowest (ms) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['draw_ms']} | {r['draw_and_msg_ms']} | {r['slowest_ms']} |")
    if args.json:
        write_json(args.json, {"annotate": rows})
    else:
        print(json.dumps({"annotate": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
