"""Exporters: one module per target (onnx, and later openvino, tensorrt), parity, the runner.

The package is `exporters`, not `export`, so that it never shadows the `kiln.export()`
function once imported.
"""
