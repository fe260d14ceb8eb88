"""L3: deployment artifacts: ONNX files with their contract, parity, TensorRT engine files, ``latprune bench``."""
