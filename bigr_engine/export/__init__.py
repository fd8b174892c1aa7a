"""Deployment: ONNX export (onnx_export), the host loop over exported graphs (pipeline: ONNX Runtime; tensorrt)."""
