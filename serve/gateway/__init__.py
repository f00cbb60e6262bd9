"""The gateway: ``cliplora.v1.Classifier`` over gRPC in front of Triton.

`server` wires the process (gRPC server, health, reflection, metrics, shutdown);
`service` is the servicer: `admission` (concurrency limit, metrics, the error table of
`errors`) around the `handlers` (validate, resolve, prepare, infer, rank), with the
`catalogue` answering ListModels. `triton` is the one long-lived Triton client and model
discovery, and `models` what it discovers; `backend` declares what the gateway needs of
it. `text_encoder` and `text_cache` embed request-time labels; `images` decodes and crops
off the event loop; `health`, `metrics`, `security` and `settings` do what they say.
"""
