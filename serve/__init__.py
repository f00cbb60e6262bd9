"""`cliplora.serve`: the local Triton stack and the asyncio gRPC classification gateway.

`triton_backend/` is the small Python-based ``onnxruntime`` backend that lets the
``tritonserver`` binary of the nvidia-pytriton wheel serve the exported ONNX models on
CPU; `triton_launcher` starts that server; `gateway` answers ``cliplora.v1.Classifier``
calls by way of `triton` (one long-lived client, model discovery); `errors` maps
domain errors to status codes; `metrics` and `health` report; `security` checks TLS
and tokens; `server` wires them; `text_encoder` and `text_cache` embed request-time
labels; `stack` is `cliplora serve`, whose `supervisor` restarts Triton and Prometheus
and whose `child_guard` keeps any child from outliving it.
"""
