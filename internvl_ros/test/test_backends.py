"""Backends: registry, onnxruntime options, axengine import errors, the axengine test double."""

from __future__ import annotations

import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from internvl_ros.backends import BACKENDS, fake_axengine, get_backend
from internvl_ros.backends.axengine_backend import AxEngineSession
from internvl_ros.core.errors import BackendError, ConfigError, ModelDirError
from internvl_ros.core.modeldir import discover

BF16 = np.dtype(ml_dtypes.bfloat16)


def test_registry_is_lazy():
    code = ("import sys; import internvl_ros.backends as b; "
            "print('onnxruntime' in sys.modules, 'axengine' in sys.modules, sorted(b.BACKENDS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "['axengine',", "'onnxruntime']"]
    assert set(BACKENDS) == {"onnxruntime", "axengine"}
    with pytest.raises(BackendError, match="unknown backend 'tensorrt'"):
        get_backend("tensorrt")


def test_onnxruntime_session_options(host_dir):
    backend = get_backend("onnxruntime", num_threads=2)
    sess = backend.open(str(host_dir / "qwen3_p128_l0_together.onnx"))
    opts = sess._sess.get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.intra_op_num_threads == 2
    # a memory pattern per decode length would stay for the session's life (issue 16)
    assert not opts.enable_mem_pattern
    vit = backend.open(str(host_dir / "internvl_vit_model_1x3x448x448.onnx"), role="vit")
    assert not vit._sess.get_session_options().enable_mem_pattern
    assert sess.dynamic_shapes and sess.num_shape_groups == 1
    names = [i.name for i in sess.get_inputs()]
    assert names == ["K_cache", "V_cache", "indices", "input", "mask"]
    assert sess.get_inputs()[2].dtype == np.uint32 and sess.get_inputs()[0].shape[1] is None
    with pytest.raises(ConfigError):
        get_backend("onnxruntime", num_threads=0)
    with pytest.raises(ModelDirError, match="does not exist"):
        backend.open(str(host_dir / "missing.onnx"))
    with pytest.raises(BackendError, match="could not load"):
        backend.open(str(host_dir / "config.json"))


def test_axengine_missing_gives_install_hint():
    code = ("import sys; sys.modules['axengine'] = None\n"
            "from internvl_ros.backends import get_backend\n"
            "from internvl_ros.core.errors import BackendError\n"
            "try:\n    get_backend('axengine')\n"
            "except BackendError as e:\n    print('BackendError:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("BackendError:") and "pyaxengine" in out.stdout
    assert "--backend onnxruntime" in out.stdout


def test_fake_axengine_enforces_pyaxengine_contract(axera_dir):
    paths = discover(axera_dir, "axengine")
    with fake_axengine.installed() as ax:
        sess = ax.InferenceSession(str(paths.layers[0]), providers=["AxEngineExecutionProvider"])
        inputs = sess.get_inputs(0)
        assert [i.name for i in inputs] == ["K_cache", "V_cache", "indices", "input", "mask"]
        assert inputs[0].shape == (1, 511, 32) and inputs[0].dtype == BF16
        assert sess.get_inputs(1)[0].shape == (1, 1, 32)  # dummy cache of the first slice
        assert sess.get_inputs(2)[4].shape == (1, 128, 256)
        feed = {i.name: np.zeros(i.shape, i.dtype) for i in inputs}
        out = sess.run(None, feed, shape_group=0)
        assert [o.shape for o in out] == [(1, 1, 32), (1, 1, 32), (1, 1, 64)]
        assert all(o.dtype == BF16 for o in out)
        first = out[0].astype(np.float32)
        out[0][...] = 1  # outputs are copies: changing them does not change the next result
        again = sess.run(None, feed, shape_group=0)[0]
        assert np.array_equal(again.astype(np.float32), first) and again is not out[0]
        missing = dict(feed)
        del missing["mask"]
        with pytest.raises(ValueError, match=r"Required inputs \(\['mask'\]\) are missing"):
            sess.run(None, missing)
        wrong = dict(feed, input=np.zeros((1, 1, 64), np.float32))
        with pytest.raises(AssertionError, match=r"model inputs\(input\) expect shape"):
            sess.run(None, wrong)
        with pytest.raises(AssertionError, match=r"model inputs\(K_cache\) expect shape"):
            sess.run(None, dict(feed, K_cache=np.zeros((1, 10, 32), BF16)))
        with pytest.raises(ValueError, match="Invalid shape group"):
            sess.run(None, feed, shape_group=5)
        with pytest.raises(ValueError, match="not available"):
            ax.InferenceSession(str(paths.layers[0]), providers=["CUDAExecutionProvider"])


def test_axengine_session_wrapper_reads_shape_groups(axera_dir):
    paths = discover(axera_dir, "axengine")
    with fake_axengine.installed():
        backend = get_backend("axengine", provider="AxEngineExecutionProvider")
        sess = backend.open(str(paths.layers[0]))
        assert isinstance(sess, AxEngineSession) and not sess.dynamic_shapes
        assert sess.num_shape_groups == 1 + 512 // 128  # decode + 4 prefill groups
        assert sess.get_inputs(4)[0].shape == (1, 384, 32)
        with pytest.raises(BackendError, match="out of range"):
            sess.get_inputs(5)
        vit = backend.open(str(paths.vit))
        assert vit.num_shape_groups == 1 and vit.get_inputs(0)[0].shape == (1, 3, 448, 448)
        with pytest.raises(BackendError, match="unknown axengine provider"):
            get_backend("axengine", provider="CPU")


def test_fake_matches_onnx_on_a_padded_slice(axera_dir, host_dir):
    """The fake computes what the ONNX model does on the valid rows of a padded slice."""
    backend = get_backend("onnxruntime", num_threads=1)
    onnx = backend.open(str(host_dir / "qwen3_p128_l0_together.onnx"))
    paths = discover(axera_dir, "axengine")
    rng = np.random.default_rng(0)
    n_valid = 5
    x = rng.normal(size=(1, n_valid, 64)).astype(np.float32)
    mask = np.triu(np.full((n_valid, n_valid), -65536.0, np.float32), 1)[None]
    ref = onnx.run(None, {"K_cache": np.zeros((1, 0, 32), np.float32),
                          "V_cache": np.zeros((1, 0, 32), np.float32),
                          "indices": np.arange(n_valid, dtype=np.uint32)[None],
                          "input": x, "mask": mask})
    with fake_axengine.installed() as ax:
        sess = ax.InferenceSession(str(paths.layers[0]))
        xp = np.zeros((1, 128, 64), BF16)
        xp[:, :n_valid] = x.astype(BF16)
        mp = np.full((1, 128, 128), -65536.0, np.float32)
        mp[:, :n_valid, :n_valid] = mask
        out = sess.run(None, {"K_cache": np.zeros((1, 1, 32), BF16),
                              "V_cache": np.zeros((1, 1, 32), BF16),
                              "indices": np.arange(128, dtype=np.uint32)[None],
                              "input": xp, "mask": mp.astype(BF16)}, shape_group=1)
    for a, b in zip(out, ref, strict=True):
        np.testing.assert_allclose(a[:, :n_valid].astype(np.float32), b, rtol=0.05, atol=0.05)
