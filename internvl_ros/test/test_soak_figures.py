"""bench/soak.py's memory figures: the per-minute floors and the slope fitted to them.

The soak's target is an RSS slope under 5 MB/h; these check that the estimator finds a known
slope under request-sized spikes and reports its own uncertainty (issue 16)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

SOAK = Path(__file__).resolve().parents[2] / "bench" / "soak.py"


@pytest.fixture(scope="module")
def soak():
    """bench/soak.py as a module (it puts bench/ on sys.path for its `common`: undone after)."""
    path, had_common = list(sys.path), "common" in sys.modules
    spec = importlib.util.spec_from_file_location("soak_bench", SOAK)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)
        if not had_common:
            sys.modules.pop("common", None)
        sys.path[:] = path


def series(slope_mb_per_h: float, minutes: int, step: float, seed: int = 0):
    """1-s (or `step`-s) RSS readings: a floor rising at the given slope, and in 40 % of the
    readings a request's working memory (1 to 8 MB) on top of it."""
    rng = np.random.default_rng(seed)
    ts = np.arange(0.0, minutes * 60.0 + step / 2, step)  # (n,) s
    busy = rng.random(ts.size) < 0.4
    ys = 160.0 + slope_mb_per_h * ts / 3600.0 + busy * rng.uniform(1.0, 8.0, ts.size)
    return ts.tolist(), ys.tolist()


@pytest.mark.parametrize("slope", [0.0, 3.0, 30.0])
def test_floors_of_1s_readings_recover_the_slope_under_request_spikes(soak, slope):
    ts, ys = series(slope, 10, soak.RSS_SAMPLE_S)
    ft, fy = soak.floors(ts, ys, step=soak.RSS_SAMPLE_S)
    assert len(fy) == 10  # every full minute, the last one included
    assert all(abs(t - (60 * i + 30)) < 1e-9 for i, t in enumerate(ft))
    got, se = soak.slope_fit(ft, fy)
    # the floor of 60 readings is the spike-free floor: exact up to 1 s of the slope
    assert got == pytest.approx(slope, abs=0.05)
    assert se < 0.05
    assert soak.sen_slope(ft, fy)[0] == pytest.approx(slope, abs=0.05)


def test_slope_fit_reports_its_standard_error(soak):
    rng = np.random.default_rng(1)
    t = np.arange(7) * 60.0 + 210.0  # (7,) s: the floors of a 10-minute run after the warm-up
    y = 160.0 + rng.normal(0.0, 1.0, 7)  # (7,) MB: no trend, 1 MB of scatter
    slope, se = soak.slope_fit(t.tolist(), y.tolist())
    # least squares by hand: se = sqrt(SSR / (n - 2) / sum((t - mean)^2)), t in hours
    th = t / 3600.0
    b, a = np.polyfit(th, y, 1)
    want = math.sqrt(((y - (a + b * th)) ** 2).sum() / 5 / ((th - th.mean()) ** 2).sum())
    assert slope == pytest.approx(b)
    assert se == pytest.approx(want)
    assert se > 5.0  # 1 MB of scatter over 7 minutes: the fit cannot tell 5 MB/h from 0
    assert math.isnan(soak.slope_fit([0.0, 60.0], [1.0, 2.0])[1])


FLOORS_T = [210.0 + 60.0 * i for i in range(7)]  # s: the 7 floors of a 10-minute run
FRAME_MB = 0.9  # a 640x480 rgb8 frame, held by requests in flight for a whole minute


@pytest.mark.parametrize("held", [0, 6])
def test_sen_slope_ignores_a_minute_of_requests_in_flight_but_not_a_leak(soak, held):
    """One minute whose every reading held a raw frame (requests in flight all through it) at an
    end of the run moves the least-squares slope past the 5 MB/h target; the Theil-Sen slope
    does not move, and still finds a 6 MB/h leak under that minute."""
    flat = [158.0] * 7
    flat[held] += FRAME_MB
    ols = soak.slope_fit(FLOORS_T, flat)[0]
    assert abs(ols) > 5.0  # why least squares is not the named slope
    assert soak.sen_slope(FLOORS_T, flat)[0] == pytest.approx(0.0, abs=1e-9)
    leak = [y + 6.0 * t / 3600.0 for t, y in zip(FLOORS_T, flat, strict=True)]
    assert soak.sen_slope(FLOORS_T, leak)[0] == pytest.approx(6.0, abs=0.01)
    # two held minutes (of 7) are still ignored; a bounded settle early in the run is not
    two = [158.0, 158.0, 158.0 + FRAME_MB, 158.0, 158.0, 158.0, 158.0 + FRAME_MB]
    assert soak.sen_slope(FLOORS_T, two)[0] == pytest.approx(0.0, abs=1e-9)
    settle = [157.1, 157.9, 157.7, 157.7, 157.9, 157.8, 158.0]  # session 6, run e
    assert soak.sen_slope(FLOORS_T, settle)[0] > 4.0


def test_sen_slope_interval(soak):
    line = [160.0 + 3.0 * t / 3600.0 for t in FLOORS_T]
    assert soak.sen_slope(FLOORS_T, line) == pytest.approx((3.0, 3.0, 3.0))
    rng = np.random.default_rng(2)
    for _ in range(20):
        y = (160.0 + rng.normal(0.0, 0.5, 7)).tolist()  # (7,) MB: no trend
        slope, lo, hi = soak.sen_slope(FLOORS_T, y)
        assert lo <= slope <= hi and hi - lo > 1.0
    # the interval's ends are the 4th and the 18th of the 21 pairwise slopes (Sen 1968)
    y = (160.0 + rng.normal(0.0, 0.5, 7)).tolist()
    th = np.asarray(FLOORS_T) / 3600.0
    pairs = sorted((y[j] - y[i]) / (th[j] - th[i]) for i in range(7) for j in range(i + 1, 7))
    assert soak.sen_slope(FLOORS_T, y) == pytest.approx((np.median(pairs), pairs[3], pairs[17]))
    assert all(math.isnan(v) for v in soak.sen_slope([0.0, 60.0], [1.0, 2.0]))
    assert all(math.isnan(v) for v in soak.sen_slope([60.0] * 3, [1.0, 2.0, 3.0]))


def test_window_slopes_tell_settling_from_steady_growth(soak):
    ft = [30.0 + 60.0 * i for i in range(60)]  # (60,) s: the floors of a 60-minute run
    settling = [160.0 + 2.0 * (1.0 - math.exp(-t / 900.0)) for t in ft]  # bounded: +2 MB
    rising = [160.0 + 4.0 * t / 3600.0 for t in ft]  # 4 MB/h for ever
    s = soak.window_slopes(ft, settling)
    assert len(s) == 5  # full 10-minute windows only
    assert all(a > b for a, b in zip(s, s[1:], strict=False)) and s[-1] < 0.5
    assert soak.window_slopes(ft, rising) == pytest.approx([4.0] * 5, abs=0.01)
    assert soak.window_slopes(ft[:7], rising[:7]) == []  # a 10-minute run has no full window


def run_series(soak, own: dict, shmem: dict, minutes: int = 10):
    """summarise() over a synthetic run: per node, functions of t (s) giving its own memory
    and its shared memory in MB; every 1-s reading, and a 10-s sample."""
    rss_series, samples = [], []
    for t in np.arange(0.0, minutes * 60.0 + 0.5, 1.0):  # (n,) s
        r = {"t": float(t)}
        for name in soak.NODES:
            r[name] = [own[name](t) + shmem[name](t), own[name](t) - 50.0, shmem[name](t)]
        rss_series.append(r)
        if t % soak.SAMPLE_S == 0:
            samples.append({"t": float(t), "nodes": {name: {
                "rss_mb": r[name][0], "rss_anon_mb": r[name][1], "rss_shmem_mb": r[name][2],
                "fds": 22, "threads": 64} for name in soak.NODES}})
    return summarise_run(soak, samples, minutes, rss_series)


def summarise_run(soak, samples, minutes, rss_series, rss_series_1s=None):
    """summarise() of a synthetic run of `minutes` (no requests, no frames)."""
    duration = minutes * 60.0
    return soak.summarise(samples, soak.Ledger(), duration, 0.3 * duration,
                          {"start": [0.0] * 3, "end": [0.0] * 3},
                          {name: 0 for name in soak.NODES}, rss_series, rss_series_1s)


def test_the_slope_is_of_the_nodes_own_memory_and_still_finds_a_leak(soak):
    """Another process's DDS segment, read into a node's RSS page by page (here 1 MB over the
    run: 6 MB/h), is not the node's growth; the named slope leaves it out and reports it beside
    (rss_total_slope_mb_per_hour). A leak of the node's own memory is still found."""
    flat = {name: (lambda t: 158.0) for name in soak.NODES}
    shmem = {"raw": lambda t: 1.4, "compressed": lambda t: 0.2 + t / 600.0}  # MB
    res = run_series(soak, flat, shmem)
    assert abs(res["rss_slope_mb_per_hour"]) < 0.1
    assert res["rss_total_slope_mb_per_hour"] == pytest.approx(6.0, abs=0.1)
    assert res["nodes"]["compressed"]["rss_shmem_end_mb"] == pytest.approx(1.2)
    leak = dict(flat, raw=lambda t: 158.0 + 6.0 * t / 3600.0)  # 6 MB/h of the node's own
    res = run_series(soak, leak, shmem)
    assert res["rss_slope_mb_per_hour"] == pytest.approx(6.0, abs=0.1)
    assert res["nodes"]["raw"]["rss_slope_mb_per_hour"] == pytest.approx(6.0, abs=0.1)
    assert "rss_total_slope_mb_per_hour" in soak.table(res)


def test_the_named_slope_is_theil_sen_with_least_squares_beside_it(soak):
    """A raw frame held through the last minute (9 to 10 min after the start: 158.9 MB in every
    reading) is reported by least squares (about 6 MB/h), not by the named slope."""
    held = {name: (lambda t: 158.0) for name in soak.NODES}
    held["raw"] = lambda t: 158.0 + (FRAME_MB if 540.0 <= t < 600.0 else 0.0)
    res = run_series(soak, held, {name: (lambda t: 1.4) for name in soak.NODES})
    assert res["rss_slope_mb_per_hour"] == pytest.approx(0.0, abs=1e-9)
    assert res["rss_slope_ols_mb_per_hour"] == pytest.approx(2.7 / 28 * 60, abs=0.01)
    lo, hi = res["rss_slope_ci95_mb_per_hour"]
    assert lo <= 0.0 <= hi
    assert res["rss_slope_ols_stderr_mb_per_hour"] > 0.0
    text = soak.table(res)
    assert "Theil-Sen" in text and "rss_slope_ols_mb_per_hour" in text


def test_lowest_keeps_the_reading_with_the_least_own_memory(soak):
    a, b = [150.0, 70.0, 1.0], [150.5, 70.0, 2.0]  # [RSS, RssAnon, RssShmem] MB
    assert soak.lowest(None, a) == a
    assert soak.lowest(a, b) == b  # more RSS, but 0.5 MB less of the node's own
    assert soak.lowest(b, a) == b


def record(soak, minutes: int, own, idle_share: float, seed: int = 3):
    """An RssRecord of a raw-camera-like node read every 0.1 s: its own memory `own(t)` MB
    while idle (the latest frame alone), which is `idle_share` of the readings, one at a time;
    otherwise 0.5 to 6 MB more (frames in transit, requests' working memory)."""
    rng = np.random.default_rng(seed)
    rec = soak.RssRecord()
    ticks = int(round(minutes * 60.0 / soak.RSS_READ_S))
    per_s = int(round(soak.RSS_SAMPLE_S / soak.RSS_READ_S))
    for i in range(ticks + 1):
        t = i * soak.RSS_SAMPLE_S / per_s  # s: whole seconds exactly every per_s readings
        busy = 0.0 if rng.random() < idle_share else rng.uniform(0.5, 6.0)
        rec.add(t, {name: [own(t) + busy + 1.4, 70.0, 1.4] for name in soak.NODES})
    rec.close()
    return rec


def summarise_record(soak, rec, minutes: int = 10):
    samples = [{"t": r["t"], "nodes": {name: {
        "rss_mb": r[name][0], "rss_anon_mb": r[name][1], "rss_shmem_mb": r[name][2],
        "fds": 22, "threads": 64} for name in soak.NODES}}
        for r in rec.series_1s if r["t"] % soak.SAMPLE_S == 0]
    return summarise_run(soak, samples, minutes, rec.series, rec.series_1s)


@pytest.mark.parametrize("leak", [0.0, 6.0])
def test_ten_readings_a_second_find_the_idle_floor_that_one_a_second_misses(soak, leak):
    """Session 8's hour run: the raw-camera node is at its floor about 1.5 % of the time (here
    2 %). One reading a second misses that state for a whole minute in about 30 % of minutes
    (0.98 ** 60), and raises those floors by 0.5 MB or more; the lowest of ten readings a
    second does not."""
    line = lambda t: 150.0 + leak * t / 3600.0  # noqa: E731
    rec = record(soak, 10, line, idle_share=0.02)
    assert len(rec.series) == len(rec.series_1s) == 601
    res = summarise_record(soak, rec)
    node = res["nodes"]["raw"]
    ft = [210.0 + 60.0 * i for i in range(7)]  # the middles of the 7 minutes after warm-up
    assert node["rss_floors_mb"] == pytest.approx([round(line(t), 1) for t in ft], abs=0.11)
    assert res["rss_slope_mb_per_hour"] == pytest.approx(leak, abs=0.3)
    # the same readings, one a second: some floors raised by a request's memory
    one = [r for r in rec.series_1s if r["t"] >= 180.0]
    _, fy = soak.floors([r["t"] for r in one], [soak.own_mb(r["raw"][0], r["raw"][2])
                                                for r in one], step=soak.RSS_SAMPLE_S)
    raised = [y - line(t) for t, y in zip(ft, fy, strict=True)]
    assert max(raised) > 0.5, raised
    assert res["rss_slope_1s_readings_mb_per_hour"] is not None
    assert "rss_slope_1s_readings_mb_per_hour" in soak.table(res)
