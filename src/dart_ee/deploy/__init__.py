"""Deployment: ONNX export, int8 quantisation, and the onnxruntime runner (importable without torch)."""
