"""The gateway's HTTP door: REST classify, OpenAI-compatible embeddings, the model list,
health, the OpenAPI document and the playground page (docs/architecture.md, "HTTP door").

It is a second way into the same service, not a second implementation: each route turns
its body into the gRPC message and calls `ClassifierService` under the same admission,
limits, deadlines, error table and metrics (`app`: routes and answers; `guard`: what a
`/v1/` call passes first; `bodies`: reading bodies and forms; `responses`: the error answers; `convert`: JSON and forms to
messages and back; `calls`: the call context; `openapi`: the document).
"""
