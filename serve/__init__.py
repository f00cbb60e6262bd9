"""`cliplora.serve`: serving, in two parts (docs/architecture.md).

- `cliplora.serve.gateway`: the asyncio gRPC gateway in front of Triton, and all the
  gateway image runs. It never imports the stack (an import-linter contract).
- `cliplora.serve.stack`: the local stack of `cliplora serve`: a supervised Triton (with
  the Python-based ``onnxruntime`` backend of `stack/triton_backend/`) and Prometheus,
  each under a guard so that no child outlives it, and the gateway in front of them.
- `cliplora.serve.cli`: the ``serve`` command's flags and its entry point.
"""
