"""`cliplora.export`: merge a CLIP-LoRA adapter into CLIP and publish a verified ONNX classifier.

`pipeline` runs the stage in order with the model library (`cliplora.model`: base model,
adapters, merge, reference, head, graph); `verify` compares the exported graph with the
unmerged reference; `model_config` writes the Triton ``config.pbtxt`` from its protobuf;
`engine_key` keys the TensorRT engine cache to the weights; `publish` moves a verified
version into the repository atomically.
"""
