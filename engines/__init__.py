"""Segment engines (ONNX Runtime, TensorRT), the manifest and the model repository.

The bottom layer: it imports nothing else of armdi."""
