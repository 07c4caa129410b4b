"""The model as a file: its JSON contract, its safetensors weights, the contract inside ONNX."""
