"""internvl_ros: describe what the camera sees with InternVL3.5 (AX650N NPU or onnxruntime)."""

__version__ = "0.1.0"
