"""The core every other layer stands on: the tensor contract, the error types,
preprocessing, the model-repository layout, ONNX Runtime sessions, the typed records
that cross stage boundaries (`manifest`, `run_record`), and the gateway's client.

Nothing here imports torch, open_clip or any other cliplora layer (docs/architecture.md).
"""
