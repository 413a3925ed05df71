"""HF InternVL checkpoint -> ONNX model directory (docs/MODEL_DIR.md), and the tiny test model.

- `exporter`: `export_model()` and the `internvl-export` CLI (numpy + onnx, no torch).
- `tiny`: `make_tiny_model()` and the `internvl-make-tiny-model` CLI (torch + transformers).
- `testing`: cached tiny models and a transformers greedy oracle for tests.

Nothing is imported here, so `import internvl_ros.export` stays cheap.
"""
