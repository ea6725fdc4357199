"""Torch side of sdrt: load a checkpoint, trace it to ONNX, validate, write an engine directory."""
