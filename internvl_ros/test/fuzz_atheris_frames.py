"""Coverage-guided fuzzing of frame intake with atheris (libFuzzer), for `make fuzz`.

    python internvl_ros/test/fuzz_atheris_frames.py -atheris_runs=100000 CORPUS_DIR

The same target and allowed outcomes as test_fuzz_frames.py (a frame, a CdrError, a
BadFrameError; nothing else, within the allocation bound), but guided by the coverage of
``ros/cdr.py`` and ``ros/image_conv.py``. An input's first byte picks the message type (even:
sensor_msgs/Image, odd: CompressedImage), the rest is the serialized message. The corpus starts
from valid frames of every encoding and the JPEG/PNG seeds. A crasher is written as
``crash-<sha1>`` in the working directory: add it to test_fuzz_frames.py as a regression case.
Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from internvl_ros.ros import cdr, image_conv  # noqa: F401 (instrumented for coverage)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_fuzz_frames as t


def seed_corpus(corpus: Path) -> None:
    """Valid frames of every raw encoding (both byte orders, with row padding) and every
    compressed seed, each behind its type byte."""
    corpus.mkdir(parents=True, exist_ok=True)
    seeds = []
    for enc, (channels, depth) in image_conv.RAW_ENCODINGS.items():
        w, h = 4, 3
        step = w * channels * depth + 1
        for big in (False, True):
            seeds.append(b"\x00" + t.image_cdr(height=h, width=w, encoding=enc.encode(),
                                               step=step, data=bytes(range(h * step)),
                                               big_endian=big))
    for data in t.SEEDS.values():
        seeds.append(b"\x01" + t.compressed_cdr(fmt=b"jpeg", data=data))
    for s in seeds:
        (corpus / hashlib.sha1(s).hexdigest()).write_bytes(s)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    t._allowed(t.intake(data[1:], compressed=bool(data[0] & 1)))


def main() -> None:
    corpora = [a for a in sys.argv[1:] if not a.startswith("-")]
    for c in corpora:
        seed_corpus(Path(c))
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
