"""Export of a trained VLA-Cabin to the car: PyTorch mirror, weight conversion, ONNX, parity checks.

  torch_model   the PyTorch mirror of the inference path (no JAX; `load_mirror(dir)`)
  torch_layers  its building blocks and the anchor (HF names)
  convert       Flax param trees → the mirror's state dict (one explicit table, strict)
  onnx_export   ONNX fp32/fp16 from the mirror, checked (opset 17-19, dynamic batch, no loops)
  verify        JAX vs PyTorch vs ONNX Runtime on the same inputs; ORT CPU latency
  trt_report    TensorRT 10 op support and trtexec command lines
  source        checkpoints (Orbax) and fresh inits as export inputs, validated
  bundle        `export(...)`: the verified export directory, written atomically

The command line is `tools/export.py` (`python -m tools.export`) over `bundle.export`. Nothing is imported here, so
`vlacabin_jax.export.torch_model` loads with torch and safetensors alone.
"""
