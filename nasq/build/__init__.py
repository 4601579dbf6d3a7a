"""Model builds: checkpoint -> ONNX -> simplified -> device artifact."""
