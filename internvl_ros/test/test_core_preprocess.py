"""Preprocessing against the PIL/torchvision-style reference.

Reference: PIL's `Image.resize(..., BICUBIC)` when Pillow is installed (bit-exact expected:
checked against Pillow 10.4), otherwise torch's PIL-compatible uint8 antialiased bicubic
(`F.interpolate(uint8, mode="bicubic", antialias=True)`), which itself differs from PIL by at most
a couple of grey levels. Tolerance: max abs diff <= 2/255 before normalisation, i.e.
2/255/0.225 = 0.035 after ImageNet normalisation; mean abs diff < 0.01 grey levels.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from internvl_ros.core.errors import ImageDecodeError
from internvl_ros.core.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    closest_grid,
    decode_image,
    load_image,
    preprocess_image,
    resize_bicubic,
    sample_video_frames,
    tile_image,
)


def natural_image(h, w, seed=0):
    """A smooth image with edges (closer to a photo than noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([np.sin(x / 17.0) * 90 + 128, np.cos(y / 11.0) * 90 + 128,
                    ((x + y) % 64 > 32) * 160 + 40], axis=-1)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def reference_resize(img, w, h):
    try:
        from PIL import Image
    except ImportError:
        t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None]
        out = torch.nn.functional.interpolate(t, size=(h, w), mode="bicubic", antialias=True,
                                              align_corners=False)
        return out[0].permute(1, 2, 0).numpy(), 2
    return np.asarray(Image.fromarray(img).resize((w, h), Image.BICUBIC)), 0


@pytest.mark.parametrize("shape", [(480, 640), (1080, 1920), (300, 200), (37, 41), (448, 448),
                                   (50, 900)])
def test_resize_matches_reference(shape):
    for img in (natural_image(*shape), np.random.default_rng(1).integers(0, 256, shape + (3,),
                                                                          dtype=np.uint8)):
        ours = resize_bicubic(img, 448, 448)
        ref, tol = reference_resize(img, 448, 448)
        diff = np.abs(ours.astype(int) - ref.astype(int))
        assert ours.shape == (448, 448, 3) and ours.dtype == np.uint8
        assert diff.max() <= tol
        assert diff.mean() < 0.01


def test_resize_is_antialiased():
    """Downscaling a fine checkerboard gives flat grey (a plain cubic would alias)."""
    board = ((np.indices((896, 896)).sum(0) % 2) * 255).astype(np.uint8)
    img = np.repeat(board[..., None], 3, axis=2)
    out = resize_bicubic(img, 448 // 4, 448 // 4).astype(int)
    assert abs(out.mean() - 127.5) < 2 and out.std() < 2


def test_normalised_pixels_against_reference():
    img = natural_image(360, 480)
    pv = preprocess_image(img)  # max_num = 1 (AX650N)
    assert pv.shape == (1, 3, 448, 448) and pv.dtype == np.float32
    ref, tol = reference_resize(img, 448, 448)
    ref = (ref.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    ref = ref.transpose(2, 0, 1)[None]
    assert np.abs(pv - ref).max() <= tol / 255.0 / 0.225 + 1e-5


def internvl_grid(width, height, max_num, image_size=448):
    """InternVL's find_closest_aspect_ratio, independently written for the test."""
    ratios = sorted({(i, j) for n in range(1, max_num + 1) for i in range(1, n + 1)
                     for j in range(1, n + 1) if 1 <= i * j <= max_num}, key=lambda r: r[0] * r[1])
    best, best_diff = (1, 1), float("inf")
    for r in ratios:
        diff = abs(width / height - r[0] / r[1])
        if diff < best_diff:
            best, best_diff = r, diff
        elif diff == best_diff and width * height > 0.5 * image_size ** 2 * r[0] * r[1]:
            best = r
    return best


@pytest.mark.parametrize("max_num", [1, 2, 4, 6, 12])
def test_tiling_grid_and_thumbnail(max_num):
    for (h, w) in [(480, 640), (1080, 1920), (448, 448), (1000, 300), (100, 1200), (896, 896)]:
        grid = closest_grid(w, h, max_num)
        assert grid == internvl_grid(w, h, max_num)
        tiles = tile_image(natural_image(h, w), max_num=max_num)
        n = grid[0] * grid[1]
        assert len(tiles) == (n + 1 if n > 1 else 1)  # thumbnail only with several tiles
        assert all(t.shape == (448, 448, 3) for t in tiles)
    # the tiles are crops of one resize, row by row; the thumbnail is the whole image
    img = natural_image(448, 896)
    tiles = tile_image(img, max_num=2)
    assert len(tiles) == 3
    full = resize_bicubic(img, 896, 448)
    assert np.array_equal(tiles[0], full[:, :448]) and np.array_equal(tiles[1], full[:, 448:])
    assert np.array_equal(tiles[2], resize_bicubic(img, 448, 448))


def test_decode_image_and_errors(tmp_path):
    img = natural_image(64, 80)
    ok, png = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    assert np.array_equal(decode_image(png.tobytes()), img)  # RGB order, lossless
    for bad in (b"", b"not an image at all", png.tobytes()[:40]):
        with pytest.raises(ImageDecodeError, match="could not be decoded"):
            decode_image(bad)
    with pytest.raises(ImageDecodeError, match="cannot read image file"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageDecodeError, match=r"\(H, W, 3\)"):
        preprocess_image(np.zeros((10, 10), np.uint8))
    with pytest.raises(ImageDecodeError, match="uint8"):
        preprocess_image(np.zeros((10, 10, 3), np.float32))


def internvl_get_index(max_frame: int, num_segments: int, fps: float = 10.0, bound=None):
    """InternVL's README/chat example `get_index` (the frame choice of its load_video)."""
    start, end = bound if bound else (-100000, 100000)
    start_idx = max(0, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    return [int(start_idx + seg_size / 2 + np.round(seg_size * i)) for i in range(num_segments)]


def write_grey_clip(path, count):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    assert writer.isOpened()
    for i in range(count):  # frame i is filled with grey level 8 * i
        writer.write(np.full((48, 64, 3), 8 * i, np.uint8))
    writer.release()


@pytest.mark.parametrize("count,num", [(30, 4), (20, 8), (9, 3)])
def test_video_frames_as_internvl(tmp_path, count, num):
    path = tmp_path / "clip.avi"
    write_grey_clip(path, count)
    frames = sample_video_frames(path, num)
    assert len(frames) == num and frames[0].shape == (48, 64, 3)
    levels = [int(round(f.mean() / 8)) for f in frames]
    assert levels == internvl_get_index(max_frame=count - 1, num_segments=num)  # len(vr) - 1
    if (count, num) == (20, 8):
        assert levels[3] == 8  # (len - 1) / segments, not len / segments (which gives 9)


def test_video_errors(tmp_path):
    with pytest.raises(ImageDecodeError, match="does not exist"):
        sample_video_frames(tmp_path / "none.mp4", 4)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(ImageDecodeError):
        sample_video_frames(junk, 2)
