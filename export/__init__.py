"""Freeze a trained momkd run into a deployable model folder (ONNX, TensorRT)."""
