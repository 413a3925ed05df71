"""The runtime imports (and runs) without torch, transformers or rclpy."""

from __future__ import annotations

import json
import subprocess
import sys

from internvl_ros.export.testing import tiny_model_dirs

FORBIDDEN = ("torch", "transformers", "rclpy")


def test_runtime_imports_and_runs_without_torch_transformers_rclpy(tmp_path):
    onnx_dir = tiny_model_dirs("a")[1]  # built (or found) here, outside the subprocess
    code = f"""
import sys, json
import internvl_ros.core
import internvl_ros.backends.onnxruntime_backend
import internvl_ros.backends.axengine_backend
import internvl_ros.backends.fake_axengine
import internvl_ros.tools.caption as caption
after_import = [m for m in {FORBIDDEN!r} if m in sys.modules]
rc = caption.main(["--model-dir", {str(onnx_dir)!r}, "--prompt", "hi", "--max-new-tokens", "3",
                   "--threads", "1"])
after_run = [m for m in {FORBIDDEN!r} if m in sys.modules]
print(json.dumps({{"rc": rc, "import": after_import, "run": after_run}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"rc": 0, "import": [], "run": []}
