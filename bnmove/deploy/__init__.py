"""Deployment: ONNX export of the variants, forward folding, onnxruntime comparison."""
