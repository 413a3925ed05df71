"""Test helpers: a tiny model's pipelines on both backends, and a Session recorder."""

from __future__ import annotations

import contextlib

from internvl_ros.backends import fake_axengine
from internvl_ros.core import Pipeline
from internvl_ros.export.testing import tiny_model_dirs


@contextlib.contextmanager
def both_backends(tmp_path_factory, spec: str = "a"):
    """(hf_dir, {"onnxruntime": pipeline, "axengine": pipeline over the double, "axengine-rows":
    the same with kv_feed="rows"}) of tiny model `spec`; the double has the published build's
    limits (2047 / 9 slices of 128). "axengine" feeds the whole cache (kv_feed="full"), so a
    Recorder around a layer sees every run; rows mode bypasses session.run."""
    hf_dir, onnx_dir = tiny_model_dirs(spec)
    axera = tmp_path_factory.mktemp(f"axera-{spec}")
    fake_axengine.make_fake_axera_dir(onnx_dir, axera)
    host = Pipeline.from_model_dir(onnx_dir, num_threads=1)
    with fake_axengine.installed():
        npu = Pipeline.from_model_dir(axera, backend="axengine", kv_feed="full")
        rows = Pipeline.from_model_dir(axera, backend="axengine", kv_feed="rows")
    assert rows.kv_feed.mode == "rows", rows.kv_feed
    try:
        yield hf_dir, {"onnxruntime": host, "axengine": npu, "axengine-rows": rows}
    finally:
        host.close()
        npu.close()
        rows.close()


class Recorder:
    """Wraps a Session; records (shape group, {input: shape}) of every run."""

    def __init__(self, session):
        self.inner = session
        self.calls = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run(self, output_names, feed, shape_group=0):
        self.calls.append((shape_group, {k: v.shape for k, v in feed.items()}))
        return self.inner.run(output_names, feed, shape_group=shape_group)
