"""Execution backends: one module each (torch, onnxruntime, coreml), one surface (``base``)."""
